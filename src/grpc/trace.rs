//! Traces of balanced calls: a `tracing` span per call (`grpc.call`) and a child span per
//! attempt (`grpc.attempt`), and, with the `opentelemetry` feature, the W3C trace context of
//! each attempt's span injected into its request metadata.
//!
//! # Fields
//!
//! | span | field | value |
//! |---|---|---|
//! | both | `otel.name`, `otel.kind` | `Sent.pkg.Service/Method` (call) or `Attempt.pkg.Service/Method` (attempt), as gRPC's own OpenTelemetry tracing names them (gRFC A72); `client` |
//! | both | `rpc.system`, `rpc.service`, `rpc.method` | `grpc`, `pkg.Service`, `Method` |
//! | both | `grpc.status`, `rpc.grpc.status_code` | the status (`OK`, `UNAVAILABLE`, ...) and its number, once known |
//! | both | `latency_ms` | how long it took (to the end of the response body for a call that streams one) |
//! | `grpc.call` | `lb.service` | the balancer's service name |
//! | `grpc.call` | `attempts` | attempts made |
//! | `grpc.attempt` | `endpoint`, `server.address`, `server.port` | the endpoint picked |
//! | `grpc.attempt` | `attempt` | 1 for the first attempt, 2 for its retry... |
//! | `grpc.attempt` | `retry_reason` | why this attempt is a retry (what ended the previous one) |
//! | `grpc.attempt` | `error` | a transport error that ended it |
//! | both | `otel.status_code` | `ERROR` when the call or attempt failed |
//!
//! Spans are `INFO` spans of target `tai_loadbalancer::grpc`, so a subscriber's filter can
//! leave them out; a call whose span is disabled keeps no copy of its path.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;
use tracing::Span;
use tracing::field::Empty;

/// The spans of one call.
pub(crate) struct CallTrace {
    pub(crate) span: Span,
    path: String,
    /// Attempts started so far.
    attempts: u32,
}

/// `/pkg.Service/Method` as `(pkg.Service, Method)`.
fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The canonical name of a gRPC status code (`UNAVAILABLE`).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Records how a span ended: its status (if any), latency, and an error mark.
pub(crate) fn record_end(span: &Span, code: Option<Code>, latency: Duration) {
    if let Some(code) = code {
        span.record("grpc.status", code_name(code));
        span.record("rpc.grpc.status_code", code as i64);
        if code != Code::Ok {
            span.record("otel.status_code", "ERROR");
        }
    } else {
        span.record("otel.status_code", "ERROR");
    }
    span.record("latency_ms", millis(latency));
}

impl CallTrace {
    /// The span of a call to `path` through the balancer's `service`.
    pub(crate) fn new(service: &str, path: &str) -> Self {
        let (rpc_service, rpc_method) = split_path(path);
        let name = path.strip_prefix('/').unwrap_or(path);
        let span = tracing::info_span!(
            target: "tai_loadbalancer::grpc",
            "grpc.call",
            otel.name = %format_args!("Sent.{name}"),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = rpc_service,
            rpc.method = rpc_method,
            lb.service = service,
            attempts = Empty,
            grpc.status = Empty,
            rpc.grpc.status_code = Empty,
            latency_ms = Empty,
        );
        Self {
            path: if span.is_disabled() {
                String::new()
            } else {
                path.to_owned()
            },
            span,
            attempts: 0,
        }
    }

    /// The span of attempt `attempt` (from 1) on `endpoint`; `retry_reason` says what ended
    /// the previous attempt.
    pub(crate) fn attempt(&mut self, endpoint: SocketAddr, attempt: u32, retry_reason: Option<&str>) -> Span {
        let (rpc_service, rpc_method) = split_path(&self.path);
        let name = self.path.strip_prefix('/').unwrap_or(&self.path);
        self.attempts = attempt;
        tracing::info_span!(
            target: "tai_loadbalancer::grpc",
            parent: &self.span,
            "grpc.attempt",
            otel.name = %format_args!("Attempt.{name}"),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = rpc_service,
            rpc.method = rpc_method,
            endpoint = %endpoint,
            server.address = %endpoint.ip(),
            server.port = endpoint.port(),
            attempt = i64::from(attempt),
            retry_reason,
            grpc.status = Empty,
            rpc.grpc.status_code = Empty,
            latency_ms = Empty,
            error = Empty,
        )
    }
}

impl CallTrace {
    /// Records how many attempts the call made (once: an OpenTelemetry span keeps every
    /// value recorded).
    pub(crate) fn record_attempts(&self) {
        self.span.record("attempts", i64::from(self.attempts));
    }
}

/// An attempt whose response is still streaming: its spans end with the body.
pub(crate) struct OpenAttempt {
    pub(crate) attempt: Span,
    pub(crate) call: Span,
    pub(crate) call_started: tokio::time::Instant,
}

impl OpenAttempt {
    /// The body ended with `code` after `latency` (the attempt's).
    pub(crate) fn finish(self, code: Code, latency: Duration) {
        record_end(&self.attempt, Some(code), latency);
        record_end(&self.call, Some(code), self.call_started.elapsed());
        // tracing-opentelemetry ends a span at its last exit when it has one: the call's
        // future was last polled when the response headers came, so enter and leave both
        // spans here, at the end of the body, where the call ends.
        self.attempt.in_scope(|| {});
        self.call.in_scope(|| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/greeter.v1.Greeter/SayHello"),
            ("greeter.v1.Greeter", "SayHello")
        );
        assert_eq!(split_path("odd"), ("odd", ""));
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
