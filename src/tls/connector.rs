//! TLS connections over TCP (tokio-rustls): the handshake that HTTPS health checks, the
//! diagnosis and `TlsConnector` pools use, and [`describe_error`], which words a handshake
//! failure for a person ("certificate expired", "name mismatch", "unknown CA", "the server
//! requires a client certificate").
//!
//! # Invariants
//!
//! * A handshake is bounded by the caller's timeout (the pool's `connect_timeout`, the
//!   check's `timeout`); a failed handshake is an error of that connection only.
//! * Wording an error never fails: without a TLS cause, the error's own chain is returned.
#![deny(unsafe_code)]

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::sync::DataArc;

/// A TLS connection over TCP, as [`TlsConnector`](crate::TlsConnector) opens it.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS handshake over `stream` with `config`, verifying `name`.
pub(crate) async fn handshake(
    stream: TcpStream,
    config: DataArc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<TlsStream> {
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| {
            let reason = describe_error(&e);
            std::io::Error::new(e.kind(), format!("TLS handshake: {reason}"))
        })
}

// ===== describing handshake failures =====

/// Words the TLS failure in `error`'s chain (a rustls error, possibly inside `io::Error`s,
/// hyper's or tonic's errors) for a person; without a TLS cause, the whole chain joined by
/// `": "`.
pub(crate) fn describe_error(error: &(dyn std::error::Error + 'static)) -> String {
    tls_cause(error).unwrap_or_else(|| chain(error))
}

/// The TLS cause in `error`'s chain, worded, if there is one.
pub(crate) fn tls_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(found) = tls_cause(inner) {
                return Some(found);
            }
        }
        // tonic's own TLS errors are private types, and some paths carry rustls' error as
        // text only: recognised by their words.
        let text = e.to_string();
        if let Some(alert) = text.split("received fatal alert: ").nth(1) {
            let alert = alert
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default();
            return Some(describe_alert_name(alert));
        }
        if text.contains("HTTP/2 was not negotiated") {
            return Some(
                "the server did not negotiate HTTP/2 (ALPN `h2`): it may not speak gRPC over TLS".to_owned(),
            );
        }
        if text.contains("TLS handshake timed out") {
            return Some("the TLS handshake timed out".to_owned());
        }
        next = e.source();
    }
    None
}

/// Whether the peer closed the connection under `error` (reset, broken pipe, end of stream).
pub(crate) fn closed_by_peer(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<hyper::Error>() {
            if http.is_canceled() || http.is_closed() || http.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            ) {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                if closed_by_peer(inner) {
                    return true;
                }
            }
        }
        next = e.source();
    }
    false
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

fn describe_rustls(error: &rustls::Error) -> String {
    use rustls::CertificateError as Cert;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::Expired | Cert::ExpiredContext { .. } => {
                format!("server certificate rejected: certificate expired ({cert})")
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                format!("server certificate rejected: certificate not valid yet ({cert})")
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                format!("server certificate rejected: name mismatch ({cert})")
            }
            Cert::UnknownIssuer => {
                "server certificate rejected: unknown CA (not issued by a trusted root)".to_owned()
            }
            Cert::BadSignature => {
                format!("server certificate rejected: bad signature ({cert})")
            }
            Cert::Revoked => "server certificate rejected: revoked".to_owned(),
            other => format!("server certificate rejected: {other}"),
        },
        rustls::Error::AlertReceived(alert) => describe_alert_name(&format!("{alert:?}")),
        rustls::Error::NoCertificatesPresented => "the server presented no certificate".to_owned(),
        other => format!("TLS error: {other}"),
    }
}

/// Words a TLS alert received from the server, by its name in rustls' `AlertDescription`.
fn describe_alert_name(alert: &str) -> String {
    match alert {
        "CertificateRequired" => {
            "the server requires a client certificate (mTLS) and none was sent (alert: certificate required)"
                .to_owned()
        }
        "BadCertificate"
        | "UnsupportedCertificate"
        | "CertificateRevoked"
        | "CertificateExpired"
        | "CertificateUnknown"
        | "UnknownCA"
        | "AccessDenied" => {
            format!("the server rejected the client certificate (alert: {alert})")
        }
        "NoApplicationProtocol" => {
            "the server supports none of the ALPN protocols offered (alert: no application protocol)"
                .to_owned()
        }
        other => format!("the server ended the connection with TLS alert {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_common_failures() {
        let wrapped = |e: rustls::Error| {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            describe_error(&io)
        };
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
            .contains("unknown CA")
        );
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))
            .contains("certificate expired")
        );
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
            ))
            .contains("name mismatch")
        );
        assert!(
            wrapped(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
            ))
            .contains("requires a client certificate")
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(describe_error(&plain), "refused");
        assert!(tls_cause(&plain).is_none());
    }
}
