//! Helpers shared by the integration tests. Loopback addresses only.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};

/// The `i`-th loopback address (127.0.0.0/8, never 127.0.0.0).
pub(crate) fn addr(i: usize) -> SocketAddr {
    let host = (i / 64) as u32 + 1;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0x7f00_0000 | (host & 0x00ff_ffff)),
        30_000 + (i % 64) as u16,
    ))
}

pub(crate) fn ep(i: usize) -> Endpoint {
    Endpoint::new(addr(i), None)
}

pub(crate) fn weighted(i: usize, weight: u32) -> Endpoint {
    Endpoint::new(addr(i), Some(EndpointMetadata::new().with_weight(weight)))
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A registry with service `svc` holding `endpoints`, and a balancer over it.
pub(crate) async fn setup(
    strategy: LoadBalancingStrategy,
    endpoints: Vec<Endpoint>,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("svc", endpoints).await.unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default())
        .await
        .unwrap();
    (registry, lb)
}

/// Key `i` as bytes.
pub(crate) fn key(i: usize) -> String {
    format!("user-{i}")
}

/// Runs Debian's `promtool check metrics` on `text` and fails the test on any problem it
/// reports. Without promtool the check is skipped with a note, unless
/// `TAI_LB_REQUIRE_PROMTOOL` is set (as `.ci/run` does): then its absence fails the test.
pub(crate) fn promtool_check(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            assert!(
                std::env::var_os("TAI_LB_REQUIRE_PROMTOOL").is_none(),
                "promtool is required here (TAI_LB_REQUIRE_PROMTOOL) but cannot run: {e}"
            );
            eprintln!("promtool not found ({e}); install Debian's `prometheus` to run this check");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads its input");
    let out = child.wait_with_output().expect("promtool runs");
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool check metrics found problems:\n{problems}\nin:\n{text}"
    );
}
