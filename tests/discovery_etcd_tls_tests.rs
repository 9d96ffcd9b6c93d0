//! etcd discovery and registration over mTLS, against a REAL etcd (Debian's `etcd-server`)
//! started by the test on loopback with `--client-cert-auth` and certificates made at test
//! time (rcgen). Without `etcd` on PATH the test FAILS, unless `TAI_LB_SKIP_ETCD=1` (then it
//! prints a note and passes); `.ci/run` installs it.
//!
//! What it shows: with the right client certificate, registration and discovery work; with
//! a wrong one (rotated in through the watched files, then a reconnect), the source is
//! `Degraded` with a reason that says what failed, routing keeps the last membership, and
//! the source recovers once the right certificate is back. A registration with a wrong
//! certificate is a typed error saying so.
#![cfg(all(feature = "etcd", feature = "tls"))]

mod tls_support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tai_loadbalancer::{
    DiscoveryRunner, Endpoint, Error, EtcdConfig, EtcdDiscovery, EtcdRegistration, IntegratedLoadBalancer,
    LoadBalancingStrategy, ServiceRegistry, SourceHealth, TlsFiles,
};
use tls_support::{Ca, Leaf, TempDir, replace_file};

/// A real etcd serving https on loopback, requiring client certificates of `ca`.
struct EtcdTls {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdTls {
    fn start_or_skip(ca: &Ca, server: &Leaf) -> Option<EtcdTls> {
        if let Err(error) = Command::new("etcd").arg("--version").output() {
            if std::env::var("TAI_LB_SKIP_ETCD").as_deref() == Ok("1") {
                eprintln!("etcd not found ({error}): skipped because TAI_LB_SKIP_ETCD=1");
                return None;
            }
            panic!(
                "this test needs a real etcd on PATH (Debian: apt-get install etcd-server; .ci/run installs it): \
                 {error}. Set TAI_LB_SKIP_ETCD=1 to skip it."
            );
        }
        let dir = TempDir::new("etcd");
        std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path("server.key"), &server.key_pem).unwrap();
        let mut etcd = EtcdTls {
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
        };
        for attempt in 0.. {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            let _ = std::fs::remove_dir_all(etcd.dir.path("data"));
            match etcd.spawn() {
                Ok(()) => return Some(etcd),
                Err(log) if attempt < 3 => eprintln!("etcd did not start, retrying on other ports:\n{log}"),
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path("etcd.log");
        let _ = std::fs::remove_file(&log_path);
        let log = std::fs::File::create(&log_path).unwrap();
        let path = |name: &str| self.dir.path(name).display().to_string();
        let child = Command::new("etcd")
            .arg("--name=tai-lb-tls")
            .arg(format!("--data-dir={}", path("data")))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tai-lb-tls={peer}"))
            .arg(format!("--cert-file={}", path("server.pem")))
            .arg(format!("--key-file={}", path("server.key")))
            .arg(format!("--trusted-ca-file={}", path("ca.pem")))
            .arg("--client-cert-auth")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("etcd exited ({status}):\n{text}"));
            }
            if text.contains("ready to serve client requests") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(format!(
            "etcd was not ready within 20 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdTls {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Client files in `dir`, holding `leaf` (and trusting `ca`).
fn write_client_files(dir: &TempDir, ca: &Ca, leaf: &Leaf) -> (PathBuf, PathBuf, PathBuf) {
    let files = (dir.path("ca.pem"), dir.path("client.pem"), dir.path("client.key"));
    replace_file(&files.0, &ca.pem);
    replace_file(&files.1, &leaf.cert_pem);
    replace_file(&files.2, &leaf.key_pem);
    files
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_registration_over_mtls_and_a_wrong_certificate_degrades() {
    let ca = Ca::new("etcd CA");
    let Some(mut etcd) = EtcdTls::start_or_skip(&ca, &ca.server(&["localhost", "127.0.0.1"])) else {
        return;
    };
    let stranger = Ca::new("unknown CA");
    let (good, wrong) = (ca.client("tai-lb"), stranger.client("intruder"));

    // The right certificate: register an instance, discover it.
    let dir = TempDir::new("etcd-client");
    let (ca_file, cert_file, key_file) = write_client_files(&dir, &ca, &good);
    let tls = TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert_file, &key_file)
        .poll_interval(Duration::from_millis(50))
        .watch()
        .unwrap();
    let config = EtcdConfig::new([etcd.url()])
        .with_tls(tls.clone())
        .with_request_timeout(Duration::from_secs(3))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(300));
    let instance = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
    let registration =
        EtcdRegistration::register(&config, "api", "api-1", instance.clone(), Duration::from_secs(30))
            .await
            .unwrap();

    let registry = Arc::new(ServiceRegistry::new());
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await
    .unwrap();
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(EtcdDiscovery::new(config.clone(), ["api"]).unwrap());
    runner.synced().await;
    assert_eq!(runner.stats()[0].health, SourceHealth::Healthy);
    assert_eq!(registry.endpoints("api").await.unwrap(), vec![instance.clone()]);

    // A registration with a certificate etcd does not trust fails, and says why.
    let wrong_dir = TempDir::new("etcd-wrong");
    let (wca, wcert, wkey) = write_client_files(&wrong_dir, &ca, &wrong);
    let wrong_tls = TlsFiles::new()
        .ca_file(&wca)
        .identity_files(&wcert, &wkey)
        .load()
        .unwrap();
    let wrong_config = config.clone().with_tls(wrong_tls);
    match EtcdRegistration::register(
        &wrong_config,
        "api",
        "api-2",
        instance.clone(),
        Duration::from_secs(30),
    )
    .await
    {
        Err(Error::Etcd { reason, .. }) => {
            eprintln!("registration refused: {reason}");
            assert!(
                reason.contains("TLS") && reason.contains("client certificate"),
                "{reason}"
            )
        }
        other => panic!("a wrong certificate must be refused: {:?}", other.map(|_| ())),
    }

    // The wrong certificate rotated in, then a reconnect (etcd restarted): Degraded with the
    // reason; routing keeps the last membership.
    replace_file(&cert_file, &wrong.cert_pem);
    replace_file(&key_file, &wrong.key_pem);
    wait_until("the wrong certificate is loaded", || tls.generation() >= 2).await;
    etcd.stop();
    etcd.spawn().unwrap();
    wait_until(
        "the source is degraded",
        || matches!(&runner.stats()[0].health, SourceHealth::Degraded { reason } if reason.contains("TLS")),
    )
    .await;
    let SourceHealth::Degraded { reason } = runner.stats()[0].health.clone() else {
        unreachable!()
    };
    eprintln!("source degraded: {reason}");
    assert!(
        reason.contains("client certificate"),
        "the reason says what failed: {reason}"
    );
    assert_eq!(registry.endpoints("api").await.unwrap(), vec![instance.clone()]);
    assert_eq!(lb.select("api").unwrap().address, instance.address);

    // The right certificate back: the next reconnect heals the source.
    replace_file(&cert_file, &good.cert_pem);
    replace_file(&key_file, &good.key_pem);
    wait_until("the source is healthy again", || {
        runner.stats()[0].health == SourceHealth::Healthy
    })
    .await;
    registration.deregister().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !registry.endpoints("api").await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the deregistration was not seen");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
