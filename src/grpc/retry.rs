//! Retries on the request path: which failed attempts may be sent again ([`RetryPolicy`],
//! [`Idempotent`]), the retry budget, and the `grpc-timeout` deadline.
//!
//! Invariants: an attempt is only retried when it cannot have reached the server (the connect
//! failed, or the server refused the stream with a trailers-only `UNAVAILABLE`), or when the
//! method is idempotent; every retry is paid for from a budget that grows with the requests
//! sent (Finagle's and Envoy's rule), so a failing fleet never sees more than
//! `1 + budget_percent` times its normal load.

use std::fmt;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::error::Error;

/// Marks one call as safe to send twice: insert it in the request's extensions
/// (`request.extensions_mut().insert(Idempotent)` on a `tonic::Request`), and the
/// [`BalancedChannel`](crate::BalancedChannel) may retry it on another endpoint even after it
/// may have reached a server.
///
/// Methods that are always idempotent are better named once with
/// [`RetryPolicy::idempotent_method`].
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.extensions_mut().insert(tai_loadbalancer::Idempotent);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Idempotent;

/// When a [`BalancedChannel`](crate::BalancedChannel) sends a failed call again, to another
/// endpoint.
///
/// A call is retried when all of these hold:
/// - it failed before reaching a server (connect refused or timed out, or a trailers-only
///   `UNAVAILABLE` answer), or it failed in any other transport way (connection reset, stream
///   error) or with `UNAVAILABLE` *and* its method is idempotent;
/// - fewer than [`max_attempts`](Self::max_attempts) attempts were made;
/// - the retry budget allows it: retries may add at most `budget_percent` % to the requests
///   sent over the last 10 s, plus `min_retries_per_second` (Finagle's and Envoy's defaults:
///   20 % and 10/s);
/// - its deadline has not passed, and its request body was small enough to keep
///   ([`max_replay_bytes`](Self::max_replay_bytes)) and already complete when it was sent
///   (unary and server-streaming calls; client streams are never retried).
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(3)
///     .idempotent_method("/greeter.v1.Greeter/SayHello")
///     .idempotent_method("/catalog.v1.Catalog/*");
/// policy.validate()?;
/// # Ok::<_, tai_loadbalancer::Error>(())
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) budget_percent: f32,
    pub(crate) min_retries_per_second: u32,
    pub(crate) max_replay_bytes: usize,
    pub(crate) idempotent: Vec<String>,
}

impl Default for RetryPolicy {
    /// 3 attempts, a budget of 20 % plus 10 retries per second, 64 KiB of request body kept,
    /// no method idempotent.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_percent: 20.0,
            min_retries_per_second: 10,
            max_replay_bytes: 64 * 1024,
            idempotent: Vec::new(),
        }
    }
}

/// The most attempts a policy may allow per call.
pub const MAX_ATTEMPTS: u32 = 10;

impl RetryPolicy {
    /// No retries at all (one attempt per call).
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Attempts per call, the first included (1 to [`MAX_ATTEMPTS`]).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The share of requests (in percent, 0 to 100) that may be retried over a 10 s window.
    pub fn budget_percent(mut self, percent: f32) -> Self {
        self.budget_percent = percent;
        self
    }

    /// Retries allowed per second whatever the request rate.
    pub fn min_retries_per_second(mut self, retries: u32) -> Self {
        self.min_retries_per_second = retries;
        self
    }

    /// The largest request body kept to be sent again (bigger calls are not retried).
    pub fn max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Marks a method as idempotent: its calls may be retried even after they may have reached
    /// a server. `path` is the gRPC path, `/package.Service/Method`, or `/package.Service/*`
    /// for every method of a service.
    pub fn idempotent_method(mut self, path: impl Into<String>) -> Self {
        self.idempotent.push(path.into());
        self
    }

    /// Checks every field (prefix `retry.`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, reason: &str| Error::InvalidConfig {
            field: format!("retry.{field}"),
            reason: reason.to_owned(),
        };
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(bad(
                "max_attempts",
                &format!("must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        if !(0.0..=100.0).contains(&self.budget_percent) {
            return Err(bad("budget_percent", "must be between 0 and 100"));
        }
        if self.min_retries_per_second > 1_000_000 {
            return Err(bad("min_retries_per_second", "must be at most 1000000"));
        }
        if self.max_replay_bytes > 16 * 1024 * 1024 {
            return Err(bad("max_replay_bytes", "must be at most 16 MiB"));
        }
        for path in &self.idempotent {
            let valid = path
                .strip_prefix('/')
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(service, method)| {
                    !service.is_empty()
                        && !method.is_empty()
                        && !method.contains('/')
                        && path.bytes().all(|b| b.is_ascii_graphic())
                });
            if !valid {
                return Err(bad(
                    "idempotent_method",
                    &format!(
                        "{path:?} is not a gRPC path `/package.Service/Method` (or `/package.Service/*`)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether calls to `path` are idempotent by configuration.
    pub(crate) fn is_idempotent(&self, path: &str) -> bool {
        self.idempotent.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => p == path,
        })
    }

    /// A fresh budget for this policy.
    pub(crate) fn budget(&self) -> RetryBudget {
        RetryBudget(TpsBudget::new(
            Duration::from_secs(10),
            self.min_retries_per_second,
            self.budget_percent / 100.0,
        ))
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("budget_percent", &self.budget_percent)
            .field("min_retries_per_second", &self.min_retries_per_second)
            .field("max_replay_bytes", &self.max_replay_bytes)
            .field("idempotent", &self.idempotent)
            .finish()
    }
}

/// The channel's retry budget (tower's Finagle-style token bucket over a 10 s window).
pub(crate) struct RetryBudget(TpsBudget);

impl RetryBudget {
    /// Every call pays in once.
    pub(crate) fn deposit(&self) {
        self.0.deposit();
    }

    /// A retry takes one token; `false` when the budget is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetryBudget")
    }
}

/// Reads a `grpc-timeout` header value (`1-8 digits` then `H`, `M`, `S`, `m`, `u` or `n`).
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.checked_mul(3600)?),
        b'M' => Duration::from_secs(n.checked_mul(60)?),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes `timeout` as a `grpc-timeout` value (milliseconds, rounded up, at most 8 digits).
pub(crate) fn format_grpc_timeout(timeout: Duration) -> String {
    let micros = timeout.as_micros();
    if micros < 100_000_000 {
        format!("{}u", micros.max(1))
    } else {
        let millis = timeout.as_nanos().div_ceil(1_000_000).min(99_999_999);
        format!("{millis}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trips() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1m", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        for d in [
            Duration::from_micros(3),
            Duration::from_millis(250),
            Duration::from_secs(3000),
        ] {
            let back = parse_grpc_timeout(format_grpc_timeout(d).as_bytes()).unwrap();
            assert!(
                back >= d && back - d < Duration::from_millis(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn idempotent_paths() {
        let p = RetryPolicy::default()
            .idempotent_method("/a.B/Get")
            .idempotent_method("/c.D/*");
        assert!(p.validate().is_ok());
        assert!(p.is_idempotent("/a.B/Get"));
        assert!(!p.is_idempotent("/a.B/Put"));
        assert!(p.is_idempotent("/c.D/Anything"));
        for bad in ["a.B/Get", "/a.B", "/a.B/", "//Get", "/a.B/G/x", "/a B/Get"] {
            let e = RetryPolicy::default()
                .idempotent_method(bad)
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains("retry.idempotent_method"), "{e}");
        }
        for (p, field) in [
            (RetryPolicy::default().max_attempts(0), "retry.max_attempts"),
            (RetryPolicy::default().max_attempts(11), "retry.max_attempts"),
            (
                RetryPolicy::default().budget_percent(-1.0),
                "retry.budget_percent",
            ),
            (
                RetryPolicy::default().budget_percent(f32::NAN),
                "retry.budget_percent",
            ),
            (
                RetryPolicy::default().max_replay_bytes(1 << 30),
                "retry.max_replay_bytes",
            ),
        ] {
            assert!(p.validate().unwrap_err().to_string().contains(field), "{field}");
        }
    }
}
