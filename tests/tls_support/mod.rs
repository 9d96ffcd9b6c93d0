//! Helpers for the TLS tests: certificates made at test time (rcgen; nothing on disk in the
//! repository), atomic file replacement, and a grpc-core server (Python `grpcio`) started
//! on loopback. Loopback addresses only.
//!
//! The grpcio interpreter is `TAI_LB_PYTHON`, else the venv `target/grpcio-venv` that
//! `.ci/run` creates (`python3 -m venv target/grpcio-venv && target/grpcio-venv/bin/pip
//! install grpcio grpcio-health-checking`). Without it, tests that need it FAIL when
//! `TAI_LB_REQUIRE_GRPCIO=1` (as in CI) and are skipped with a printed notice otherwise.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

// ===== certificates =====

/// A certificate authority made for one test.
pub(crate) struct Ca {
    pub(crate) pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and the certificate's DER.
#[derive(Clone)]
pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: Vec<u8>,
}

/// Validity of a leaf certificate.
#[derive(Clone, Copy)]
pub(crate) enum Validity {
    /// 2020-01-01 to 2040-06-15.
    Current,
    /// 2020-01-01 to 2021-01-01.
    Expired,
}

/// The `not_after` of [`Validity::Current`] certificates, in seconds from the Unix epoch
/// (2040-06-15T00:00:00Z).
pub(crate) const CURRENT_NOT_AFTER: u64 = 2_223_331_200;

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(
        &self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = match validity {
            Validity::Current => rcgen::date_time_ymd(2040, 6, 15),
            Validity::Expired => rcgen::date_time_ymd(2021, 1, 1),
        };
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub(crate) fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(
            names.first().copied().unwrap_or("server"),
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            Validity::Current,
        )
    }

    /// A server certificate for `names` that expired in 2021.
    pub(crate) fn expired_server(&self, names: &[&str]) -> Leaf {
        self.leaf(
            names.first().copied().unwrap_or("server"),
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            Validity::Expired,
        )
    }

    /// A client certificate with common name `name`.
    pub(crate) fn client(&self, name: &str) -> Leaf {
        self.leaf(
            name,
            &[name],
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Current,
        )
    }
}

/// tonic's server TLS settings: `leaf` as identity, and client certificates signed by one of
/// `client_cas` required when any is given.
pub(crate) fn server_tls(leaf: &Leaf, client_cas: &[&Ca]) -> tonic::transport::ServerTlsConfig {
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        &leaf.cert_pem,
        &leaf.key_pem,
    ));
    if !client_cas.is_empty() {
        let bundle: String = client_cas.iter().map(|ca| ca.pem.as_str()).collect();
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(bundle));
    }
    tls
}

// ===== files =====

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory for one test, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tai-lb-tls-{label}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` atomically: writes a temporary file beside it, then renames it over.
pub(crate) fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ===== grpc-core servers (Python grpcio) =====

/// The Python interpreter with `grpcio` and `grpcio-health-checking`, or `None` (the test
/// is skipped with a notice) when there is none and `TAI_LB_REQUIRE_GRPCIO` is not `1`.
pub(crate) fn grpcio_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("TAI_LB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/grpcio-venv/bin/python"));
    let works = Command::new(&candidate)
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(candidate);
    }
    let help = format!(
        "no Python with grpcio at {} (set TAI_LB_PYTHON, or run: python3 -m venv target/grpcio-venv && \
         target/grpcio-venv/bin/pip install grpcio grpcio-health-checking)",
        candidate.display()
    );
    assert!(
        std::env::var("TAI_LB_REQUIRE_GRPCIO").as_deref() != Ok("1"),
        "TAI_LB_REQUIRE_GRPCIO=1 but {help}"
    );
    eprintln!("SKIPPED (grpcio interop): {help}");
    None
}

/// A grpc-core greeter server (see `grpcio_greeter.py`) on 127.0.0.1, killed on drop.
pub(crate) struct GrpcioServer {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    _dir: TempDir,
}

impl GrpcioServer {
    /// Starts one serving TLS with `leaf`, requiring client certificates signed by one of
    /// `client_cas` when any is given.
    pub(crate) fn start(python: &Path, name: &str, leaf: &Leaf, client_cas: &[&Ca]) -> GrpcioServer {
        let dir = TempDir::new(&format!("grpcio-{name}"));
        std::fs::write(dir.path("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path("key.pem"), &leaf.key_pem).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls_support/grpcio_greeter.py");
        let mut command = Command::new(python);
        command
            .arg(script)
            .arg(name)
            .arg(dir.path("cert.pem"))
            .arg(dir.path("key.pem"));
        if !client_cas.is_empty() {
            let bundle: String = client_cas.iter().map(|ca| ca.pem.as_str()).collect();
            std::fs::write(dir.path("client-ca.pem"), bundle).unwrap();
            command.arg(dir.path("client-ca.pem"));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let ready = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the grpcio server did not start within 30 s");
        let port: u16 = ready
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line from the grpcio server: {ready:?}"));
        GrpcioServer {
            name: name.to_owned(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            stdin,
            lines,
            _dir: dir,
        }
    }

    /// Sets what its health service says for `service` (`""`: the server as a whole).
    pub(crate) fn set_health(&mut self, service: &str, serving: bool) {
        let service = if service.is_empty() { "-" } else { service };
        let status = if serving { "SERVING" } else { "NOT_SERVING" };
        writeln!(self.stdin, "set {service} {status}").unwrap();
        self.stdin.flush().unwrap();
        let answer = self.lines.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(answer, "ok");
    }
}

impl Drop for GrpcioServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
