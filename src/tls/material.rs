//! TLS material: PEM in, validated client configurations out.
//!
//! This module owns turning PEM bytes (read from files or given in memory) into one
//! [`Material`]: the rustls client configuration (for HTTPS checks and [`TlsConnector`]
//! pools), the equivalent tonic `ClientTlsConfig` (for gRPC channels and checks), and the
//! client certificate's expiry.
//!
//! # Invariants
//!
//! * A `Material` is whole or not built: every CA certificate is a usable trust anchor, the
//!   identity has at least one certificate and exactly one private key, and the key belongs
//!   to the first certificate. A problem is a typed [`Error`] naming its origin (the file).
//! * Nothing here panics on input, and nothing blocks: the caller reads the files.
//! * The crypto provider is rustls' `ring` provider, always: the process-wide default
//!   provider (if some other crate installed one) is not consulted, so the crate's TLS does
//!   not change with unrelated dependencies.
//!
//! [`TlsConnector`]: crate::TlsConnector
#![deny(unsafe_code)]

use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::Error;
use crate::sync::DataArc;

/// PEM bytes and where they came from (a file's path, or `PEM given in memory`).
#[derive(Clone, Copy)]
pub(crate) struct Pem<'a> {
    pub(crate) origin: &'a str,
    pub(crate) bytes: &'a [u8],
}

/// The origin named in errors for PEM given in memory.
pub(crate) const IN_MEMORY: &str = "PEM given in memory";

/// Validated TLS client material.
pub(crate) struct Material {
    /// The rustls client configuration, without ALPN (each use sets its own).
    pub(crate) rustls: DataArc<rustls::ClientConfig>,
    /// The same roots and identity for tonic, without a server name.
    pub(crate) tonic: ClientTlsConfig,
    /// When the client certificate (the first of the identity's chain) expires.
    pub(crate) client_not_after: Option<SystemTime>,
    /// When the first CA certificate to expire does.
    pub(crate) ca_not_after: Option<SystemTime>,
}

/// The crate's crypto provider: rustls' `ring` (see the module's invariants).
pub(crate) fn provider() -> DataArc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<DataArc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| DataArc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Parses every certificate of a PEM bundle; at least one is required.
pub(crate) fn certificates(pem: Pem<'_>, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |reason: String| Error::TlsPem {
        what,
        origin: pem.origin.to_owned(),
        reason,
    };
    let mut certs = Vec::new();
    for (index, cert) in CertificateDer::pem_slice_iter(pem.bytes).enumerate() {
        let cert = cert.map_err(|e| bad(format!("PEM block {}: {e}", index + 1)))?;
        not_after(&cert).map_err(|e| {
            bad(format!(
                "certificate {}: not an X.509 certificate ({e})",
                index + 1
            ))
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(bad("no `-----BEGIN CERTIFICATE-----` block".to_owned()));
    }
    Ok(certs)
}

/// Parses the one private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn private_key(pem: Pem<'_>) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.bytes).map_err(|e| Error::TlsPem {
        what: "private key",
        origin: pem.origin.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no `PRIVATE KEY` block (PKCS#8, PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`)"
                    .to_owned()
            }
            other => other.to_string(),
        },
    })
}

/// Builds the material from CA certificates (PEM), optional system roots, and an optional
/// identity (certificate chain and key, PEM).
pub(crate) fn build(
    ca: Option<Pem<'_>>,
    native_roots: bool,
    identity: Option<(Pem<'_>, Pem<'_>)>,
) -> Result<Material, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let mut tonic = ClientTlsConfig::new();
    let mut ca_not_after = None;
    if let Some(ca) = ca {
        for (index, cert) in certificates(ca, "CA certificate")?.into_iter().enumerate() {
            let expires = not_after(&cert).ok();
            roots.add(cert).map_err(|e| Error::TlsPem {
                what: "CA certificate",
                origin: ca.origin.to_owned(),
                reason: format!("certificate {} is not a usable trust anchor: {e}", index + 1),
            })?;
            ca_not_after = match (ca_not_after, expires) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
        }
        tonic = tonic.ca_certificate(Certificate::from_pem(ca.bytes));
    }
    if native_roots {
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let detail = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), ToString::to_string);
            return Err(Error::TlsConfig {
                reason: format!(
                    "the system's root certificates were asked for, but none could be loaded: {detail}"
                ),
            });
        }
        tonic = tonic.with_native_roots();
    }
    if roots.is_empty() {
        return Err(Error::TlsConfig {
            reason: "no CA certificates: give a CA bundle or ask for the system's roots".to_owned(),
        });
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig {
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut client_not_after = None;
    let config = match identity {
        Some((cert, key)) => {
            let chain = certificates(cert, "certificate")?;
            client_not_after = not_after(&chain[0]).ok();
            let key_der = private_key(key)?;
            let config = builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        Error::TlsKeyMismatch {
                            certificate: cert.origin.to_owned(),
                            key: key.origin.to_owned(),
                        }
                    }
                    other => Error::TlsPem {
                        what: "private key",
                        origin: key.origin.to_owned(),
                        reason: other.to_string(),
                    },
                })?;
            tonic = tonic.identity(Identity::from_pem(cert.bytes, key.bytes));
            config
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Material {
        rustls: DataArc::new(config),
        tonic,
        client_not_after,
        ca_not_after,
    })
}

// ===== the expiry of a certificate =====

/// A tiny DER reader: enough of X.509 to find `tbsCertificate.validity.notAfter`.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// Reads one TLV; returns its tag and contents.
    fn next(&mut self) -> Result<(u8, &'a [u8]), &'static str> {
        let [tag, first, rest @ ..] = self.0 else {
            return Err("truncated");
        };
        let (len, rest) = if first & 0x80 == 0 {
            (usize::from(*first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("bad length");
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err("truncated");
        }
        let (contents, after) = rest.split_at(len);
        self.0 = after;
        Ok((*tag, contents))
    }

    fn expect(&mut self, tag: u8) -> Result<&'a [u8], &'static str> {
        match self.next()? {
            (t, contents) if t == tag => Ok(contents),
            _ => Err("unexpected structure"),
        }
    }
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// When `cert` stops being valid (its `notAfter`).
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, &'static str> {
    let certificate = Der(cert.as_ref()).expect(SEQUENCE)?;
    let mut tbs = Der(Der(certificate).expect(SEQUENCE)?);
    let (tag, _) = tbs.next()?;
    if tag == 0xa0 {
        tbs.next()?; // the serial number follows the explicit version
    }
    tbs.next()?; // signature algorithm
    tbs.next()?; // issuer
    let mut validity = Der(tbs.expect(SEQUENCE)?);
    validity.next()?; // notBefore
    match validity.next()? {
        (UTC_TIME, text) => parse_time(text, false),
        (GENERALIZED_TIME, text) => parse_time(text, true),
        _ => Err("notAfter is not a time"),
    }
}

/// `YYMMDDHHMMSSZ` (UTCTime: 1950-2049) or `YYYYMMDDHHMMSSZ` (GeneralizedTime), as RFC 5280
/// requires them.
fn parse_time(text: &[u8], generalized: bool) -> Result<SystemTime, &'static str> {
    let digits = |s: &[u8]| -> Result<u64, &'static str> {
        s.iter().try_fold(0u64, |acc, b| {
            b.is_ascii_digit()
                .then(|| acc * 10 + u64::from(b - b'0'))
                .ok_or("bad time")
        })
    };
    let (year, rest) = if generalized {
        if text.len() != 15 {
            return Err("bad time");
        }
        (digits(&text[..4])?, &text[4..])
    } else {
        if text.len() != 13 {
            return Err("bad time");
        }
        let yy = digits(&text[..2])?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
    };
    if rest[10] != b'Z' {
        return Err("bad time");
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (hour, minute, second) = (digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || year < 1970
    {
        return Err("bad time");
    }
    let days = days_from_civil(year, month, day);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400 + hour * 3600 + minute * 60 + second))
}

/// Days from 1970-01-01 to the given date (Howard Hinnant's `days_from_civil`), for years
/// from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn times() {
        let t = |s: &str, g| {
            parse_time(s.as_bytes(), g)
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert_eq!(t("700101000000Z", false), 0);
        assert_eq!(t("491231235959Z", false), 2_524_607_999);
        assert_eq!(t("20500101000000Z", true), 2_524_608_000);
        assert!(parse_time(b"701301000000Z", false).is_err());
        assert!(parse_time(b"7001010000Z", false).is_err());
        assert!(parse_time(b"700101000000+", false).is_err());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        for bytes in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x03\x02\x01\x01",
        ] {
            assert!(not_after(&CertificateDer::from(bytes.to_vec())).is_err());
        }
    }
}
