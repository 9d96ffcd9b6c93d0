//! The health event log against real servers on loopback (tokio TCP listeners started by the
//! tests): a backend killed and restarted, an operator's mark-down and drain, an outlier
//! ejection and its end, panic mode, a deregistration; the same events from the
//! `health_events()` stream and from the JSON-lines file, in order and parseable; the file's
//! rotation bound; a subscriber that falls behind; a bad log path.
#![cfg(feature = "runtime")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tai_loadbalancer::{
    Endpoint, Error, HealthCheckConfig, HealthCheckKind, HealthEvent, HealthEventKind, HealthEvents,
    IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, OutlierDetectionConfig,
    ServiceRegistry,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP backend accepting (and closing) connections; `kill` closes the listening socket.
struct TcpBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpBackend {
    async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        Self { addr, task }
    }

    async fn kill(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tai-lb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fast_tcp_checks() -> HealthCheckConfig {
    HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(200),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        grace_period: Duration::ZERO,
        jitter: Duration::from_millis(5),
        max_concurrent: 16,
        check: HealthCheckKind::Tcp,
    }
}

/// Reads events until one matches `what` (returning every event read), or panics.
async fn until(events: &mut HealthEvents, seen: &mut Vec<HealthEvent>, what: impl Fn(&HealthEvent) -> bool) {
    let started = Instant::now();
    loop {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        let next = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("no matching event within 10 s; seen: {seen:#?}"))
            .expect("the stream ended early");
        let done = what(&next);
        seen.push(next);
        if done {
            return;
        }
    }
}

fn is(event: &HealthEvent, endpoint: Option<SocketAddr>, name: &str) -> bool {
    event.endpoint == endpoint && event.kind.name() == name
}

/// Every line of the log and its rotated copies, oldest first, parsed.
fn read_log(path: &Path, files: u32) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for i in (0..files).rev() {
        let file = if i == 0 {
            path.to_owned()
        } else {
            PathBuf::from(format!("{}.{i}", path.display()))
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends mid-line",
            file.display()
        );
        for line in text.lines() {
            lines.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: {line:?} is not JSON: {e}", file.display())),
            );
        }
    }
    lines
}

/// A kill and a restart under active TCP checks, with panic mode on the way, an operator's
/// mark-down and drain, and a deregistration: the stream and the file carry the same events,
/// numbered without gaps, in the order they happened, each line valid JSON with its fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_are_logged_in_order_on_the_stream_and_in_the_file() {
    let dir = temp_dir("events-kill");
    let path = dir.join("health.jsonl");
    let backends = [
        TcpBackend::start("127.0.0.1:0".parse().unwrap()).await,
        TcpBackend::start("127.0.0.1:0".parse().unwrap()).await,
        TcpBackend::start("127.0.0.1:0".parse().unwrap()).await,
    ];
    let [a, b, c] = backends;
    let (a_addr, b_addr, c_addr) = (a.addr, b.addr, c.addr);
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch(
            "svc",
            [a_addr, b_addr, c_addr].map(|x| Endpoint::new(x, None)).to_vec(),
        )
        .await
        .unwrap();
    let mut config = LoadBalancerConfig {
        health_check: fast_tcp_checks(),
        // Two healthy of three is below 70 %: killing one backend enters panic mode.
        panic_threshold_percent: 70,
        ..Default::default()
    };
    config.health_events.log_path = Some(path.clone());
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    let mut events = lb.health_events();
    lb.start().await.unwrap();
    let mut seen = Vec::new();

    // Kill b: unhealthy, with the TCP check's error, and panic mode.
    let dead = b.kill().await;
    until(&mut events, &mut seen, |e| is(e, Some(dead), "unhealthy")).await;
    match &seen.last().unwrap().kind {
        HealthEventKind::Unhealthy { reason: Some(reason) } => {
            assert!(reason.contains("connect"), "{reason}")
        }
        other => panic!("unhealthy without a reason: {other:?}"),
    }
    until(&mut events, &mut seen, |e| is(e, None, "panic_entered")).await;
    assert_eq!(
        seen.last().unwrap().kind,
        HealthEventKind::PanicEntered {
            healthy: 2,
            eligible: 3
        }
    );

    // Restart it on the same port: healthy again after two passing checks; panic over.
    let revived = TcpBackend::start(dead).await;
    until(&mut events, &mut seen, |e| is(e, Some(dead), "healthy")).await;
    until(&mut events, &mut seen, |e| is(e, None, "panic_left")).await;

    // An operator's decisions.
    let c_ep = Endpoint::new(c_addr, None);
    lb.mark_down("svc", &c_ep).await.unwrap();
    lb.mark_up("svc", &c_ep).await.unwrap();
    let a_ep = Endpoint::new(a_addr, None);
    let report = lb.drain("svc", &a_ep).await.unwrap();
    assert_eq!(report.in_flight_at_end, 0);
    lb.undrain("svc", &a_ep).await.unwrap();
    registry.deregister("svc", &c_ep).await.unwrap();
    until(&mut events, &mut seen, |e| is(e, Some(c_addr), "released")).await;

    lb.stop().await.unwrap();
    // The stream ends with the balancer, after what was queued.
    while let Some(event) = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the stream ends when the balancer stops")
    {
        seen.push(event);
    }
    assert_eq!(events.lost(), 0);

    // In the order they happened.
    let order: Vec<(Option<SocketAddr>, &str)> = seen.iter().map(|e| (e.endpoint, e.kind.name())).collect();
    let expected = [
        (Some(dead), "unhealthy"),
        (None, "panic_entered"),
        (Some(dead), "healthy"),
        (None, "panic_left"),
        (Some(c_addr), "marked_down"),
        (Some(c_addr), "marked_up"),
        (Some(a_addr), "draining"),
        (Some(a_addr), "undrained"),
        (Some(c_addr), "removed"),
        (Some(c_addr), "released"),
    ];
    let mut at = 0;
    for want in expected {
        let found = order[at..]
            .iter()
            .position(|got| *got == want)
            .unwrap_or_else(|| panic!("{want:?} missing after position {at} in {order:?}"));
        at += found + 1;
    }
    assert!(
        seen.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "numbered without gaps: {order:?}"
    );
    assert!(seen.windows(2).all(|w| w[1].time >= w[0].time));
    assert!(seen.iter().all(|e| e.service == "svc"));

    // The file: the three first members, then exactly what the stream saw, line for line.
    let lines = read_log(&path, 4);
    assert!(lines.len() >= seen.len() + 3, "{} lines", lines.len());
    let firsts: Vec<(&str, &str)> = lines[..3]
        .iter()
        .map(|l| (l["event"].as_str().unwrap(), l["endpoint"].as_str().unwrap()))
        .collect();
    let mut added: Vec<String> = [a_addr, b_addr, c_addr].iter().map(|a| a.to_string()).collect();
    added.sort();
    assert_eq!(
        firsts,
        added.iter().map(|a| ("added", a.as_str())).collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "the file starts at 1, no gaps"
    );
    let from_stream: Vec<String> = seen.iter().map(HealthEvent::to_json_line).collect();
    let tail: Vec<String> = lines[lines.len() - seen.len()..]
        .iter()
        .map(|l| l.to_string())
        .collect();
    let reparsed: Vec<String> = from_stream
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().to_string())
        .collect();
    assert_eq!(tail, reparsed, "the file holds the stream's events");
    for line in &lines {
        let time = line["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.len() == 24, "{time}");
        let unix_ms = line["unix_ms"].as_u64().unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(unix_ms <= now && now - unix_ms < 600_000, "{line}");
        assert_eq!(line["service"], "svc");
    }
    let unhealthy = lines.iter().find(|l| l["event"] == "unhealthy").unwrap();
    assert!(
        unhealthy["reason"].as_str().unwrap().contains("connect"),
        "{unhealthy}"
    );
    let entered = lines.iter().find(|l| l["event"] == "panic_entered").unwrap();
    assert!(entered.get("endpoint").is_none());
    assert_eq!(
        (entered["healthy"].as_u64(), entered["eligible"].as_u64()),
        (Some(2), Some(3))
    );
    let released = lines.iter().find(|l| l["event"] == "released").unwrap();
    assert_eq!(released["timed_out"], false);

    drop((a, revived, c));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Failures reported on picks eject an endpoint for `base_ejection_time`, then it returns:
/// `ejected` carries the duration, `returned` follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_is_logged_with_its_duration_and_its_end() {
    let a = TcpBackend::start("127.0.0.1:0".parse().unwrap()).await;
    let b = TcpBackend::start("127.0.0.1:0".parse().unwrap()).await;
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch(
            "svc",
            vec![Endpoint::new(a.addr, None), Endpoint::new(b.addr, None)],
        )
        .await
        .unwrap();
    let config = LoadBalancerConfig {
        outlier_detection: OutlierDetectionConfig {
            enabled: true,
            consecutive_failures: 3,
            base_ejection_time: Duration::from_millis(300),
            max_ejection_percent: 50,
            ..Default::default()
        },
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    let mut events = lb.health_events();
    let mut reported = 0;
    while reported < 3 {
        let pick = lb.pick("svc").unwrap();
        if pick.address() == a.addr {
            pick.failure();
            reported += 1;
        }
    }
    let mut seen = Vec::new();
    until(&mut events, &mut seen, |e| is(e, Some(a.addr), "ejected")).await;
    assert_eq!(
        seen.last().unwrap().kind,
        HealthEventKind::Ejected {
            duration: Duration::from_millis(300),
            ejections: 1
        }
    );
    let ejected_at = seen.last().unwrap().time;
    // The snapshot says how long the ejection has left while it lasts.
    let endpoint = |lb: &IntegratedLoadBalancer| {
        lb.metrics()
            .service("svc")
            .unwrap()
            .endpoints
            .iter()
            .find(|e| e.address == a.addr)
            .cloned()
            .unwrap()
    };
    let during = endpoint(&lb);
    if during.health == tai_loadbalancer::EndpointHealth::Ejected {
        let left = during
            .ejection_remaining
            .expect("an ejected endpoint has a remaining time");
        assert!(left <= Duration::from_millis(300), "{left:?}");
    } else {
        assert_eq!(during.ejection_remaining, None, "{during:?}");
    }
    until(&mut events, &mut seen, |e| is(e, Some(a.addr), "returned")).await;
    let after = seen.last().unwrap().time.duration_since(ejected_at).unwrap();
    assert!(after >= Duration::from_millis(290), "returned after {after:?}");
    assert_eq!(
        endpoint(&lb).ejection_remaining,
        None,
        "returned: no ejection left"
    );
    let v: serde_json::Value = serde_json::from_str(&seen[seen.len() - 2].to_json_line()).unwrap();
    assert_eq!(
        (v["event"].as_str(), v["duration_ms"].as_u64()),
        (Some("ejected"), Some(300))
    );
    lb.stop().await.unwrap();
}

/// The log and its rotated copies never hold more than `log_max_bytes` together, and what
/// they keep is the newest events, every line whole and valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_log_within_its_size() {
    let dir = temp_dir("events-rotation");
    let path = dir.join("health.jsonl");
    let backend = TcpBackend::start("127.0.0.1:0".parse().unwrap()).await;
    let registry = Arc::new(ServiceRegistry::new());
    let endpoint = Endpoint::new(backend.addr, None);
    registry.register("svc", endpoint.clone()).await.unwrap();
    let mut config = LoadBalancerConfig::default();
    config.health_events.log_path = Some(path.clone());
    config.health_events.log_max_bytes = 3 * 4096;
    config.health_events.log_files = 3;
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    let events = lb.health_events();
    // About 150 bytes a line: 600 events are far more than 12 KiB.
    for _ in 0..300 {
        lb.mark_down("svc", &endpoint).await.unwrap();
        lb.mark_up("svc", &endpoint).await.unwrap();
    }
    let last = events.drain().last().unwrap().seq;
    lb.stop().await.unwrap();
    let mut total = 0;
    for i in 0..3 {
        let file = if i == 0 {
            path.clone()
        } else {
            PathBuf::from(format!("{}.{i}", path.display()))
        };
        let size = std::fs::metadata(&file).unwrap().len();
        assert!(size <= 4096, "{} holds {size} bytes", file.display());
        total += size;
    }
    assert!(total <= 3 * 4096, "{total} bytes");
    assert!(total > 2 * 4096, "{total}: the budget is used");
    assert!(!PathBuf::from(format!("{}.3", path.display())).exists());
    let lines = read_log(&path, 3);
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(*seqs.last().unwrap(), last, "the newest event is kept");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "contiguous: {seqs:?}");
    assert!(seqs[0] > 1, "the oldest were rotated away");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A subscriber that does not read loses the oldest events beyond its buffer (counted), and
/// never holds up the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_loses_the_oldest() {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoint = Endpoint::new("127.0.0.1:1".parse().unwrap(), None);
    registry.register("svc", endpoint.clone()).await.unwrap();
    let mut config = LoadBalancerConfig::default();
    config.health_events.buffer = 10;
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    let events = lb.health_events();
    for _ in 0..20 {
        lb.mark_down("svc", &endpoint).await.unwrap();
        lb.mark_up("svc", &endpoint).await.unwrap();
    }
    assert_eq!(events.lost(), 30);
    let kept = events.drain();
    assert_eq!(kept.len(), 10);
    assert!(kept.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert_eq!(kept.last().unwrap().kind, HealthEventKind::MarkedUp);
    // A dropped subscription is forgotten; the balancer goes on.
    drop(events);
    lb.mark_down("svc", &endpoint).await.unwrap();
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn a_log_path_that_cannot_be_opened_is_a_typed_error() {
    let registry = Arc::new(ServiceRegistry::new());
    let mut config = LoadBalancerConfig::default();
    config.health_events.log_path = Some(temp_dir("events-bad").join("missing-dir").join("health.jsonl"));
    match IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config).await {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "health_events.log_path");
            assert!(reason.contains("missing-dir"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
