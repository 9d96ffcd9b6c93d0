//! A fleet on one machine: registrants announce themselves in etcd, two balancer processes
//! follow them and agree on the consistent-hash owner of every key.
//!
//! Start etcd on loopback first (see the README, "Running across a fleet (etcd)"):
//!
//! ```sh
//! etcd --data-dir "$(mktemp -d)" --listen-client-urls http://127.0.0.1:2379 \
//!      --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
//! cargo run --example etcd_fleet --features etcd -- [--etcd http://127.0.0.1:2379]
//! ```
//!
//! Without a subcommand it runs the whole show as child processes of itself: two
//! `balancer`s, three `registrant`s; it waits until both balancers see the three instances
//! with the same owners for 10,000 keys, SIGKILLs one registrant (it disappears when its
//! lease expires), stops another cleanly (it disappears at once), and exits non-zero if
//! anything takes too long. The subcommands can be run by hand in several terminals:
//!
//! ```sh
//! etcd_fleet registrant --service api --instance api-1 [--ttl 2]   # "stop" on stdin deregisters
//! etcd_fleet balancer --service api --name b1
//! ```
//!
//! Loopback only: registrants listen on 127.0.0.1 ephemeral ports.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tai_loadbalancer::{
    DiscoveryRunner, Endpoint, EtcdConfig, EtcdDiscovery, EtcdRegistration, IntegratedLoadBalancer,
    LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const KEYS: usize = 10_000;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let etcd = flag("--etcd", "http://127.0.0.1:2379");
    let service = flag("--service", "api");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("registrant") => {
            let ttl: u64 = flag("--ttl", "2").parse()?;
            rt.block_on(registrant(&etcd, &service, &flag("--instance", "api-1"), ttl))
        }
        Some("balancer") => rt.block_on(balancer(&etcd, &service, &flag("--name", "b1"))),
        Some(other) if !other.starts_with("--") => Err(format!("unknown subcommand {other:?}").into()),
        _ => orchestrate(&etcd, &service),
    }
}

/// Listens on a loopback port, registers it, and deregisters on `stop` (or stdin closing).
async fn registrant(etcd: &str, service: &str, instance: &str, ttl: u64) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        // A stand-in server: accepts and closes.
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let config = EtcdConfig::new([etcd]);
    let registration = EtcdRegistration::register(
        &config,
        service,
        instance,
        Endpoint::new(address, None),
        Duration::from_secs(ttl),
    )
    .await?;
    println!(
        "{instance}: registered {address} under {} (lease TTL {ttl} s)",
        registration.key()
    );
    let stdin = tokio::task::spawn_blocking(|| {
        std::io::stdin()
            .lines()
            .map_while(Result::ok)
            .any(|line| line.trim() == "stop")
    });
    let _ = stdin.await;
    registration
        .drain_and_deregister(Duration::from_millis(200))
        .await?;
    println!("{instance}: deregistered");
    Ok(())
}

/// Follows `service` and prints a line whenever its membership changes: the endpoint count
/// and a digest of the owners of keys `user-0..user-9999`.
async fn balancer(etcd: &str, service: &str, name: &str) -> Result<(), BoxError> {
    let registry = Arc::new(ServiceRegistry::new());
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancerConfig::default(),
    )
    .await?;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(EtcdDiscovery::new(EtcdConfig::new([etcd]), [service])?);
    runner.synced().await;
    let stdin_closed = tokio::task::spawn_blocking(|| std::io::stdin().lines().for_each(drop));
    tokio::pin!(stdin_closed);
    let members = |lb: &IntegratedLoadBalancer| -> Vec<_> {
        let endpoints: Vec<(Endpoint, bool)> = lb.service(service).map(|h| h.endpoints()).unwrap_or_default();
        endpoints.iter().map(|(e, _)| (e.address, e.weight())).collect()
    };
    let mut last = None;
    loop {
        let current = members(&lb);
        if last.as_ref() != Some(&current) {
            let digest = owners_digest(&lb, service);
            if members(&lb) != current {
                continue; // changed while hashing: report the settled view
            }
            println!("{name}: {} endpoints, owners digest {digest}", current.len());
            std::io::stdout().flush()?;
            last = Some(current);
        }
        tokio::select! {
            _ = &mut stdin_closed => break,
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    runner.shutdown().await;
    Ok(())
}

fn owners_digest(lb: &IntegratedLoadBalancer, service: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for i in 0..KEYS {
        match lb.select_with_hash(service, format!("user-{i}")) {
            Ok(owner) => owner.address.hash(&mut hasher),
            Err(_) => "none".hash(&mut hasher),
        }
    }
    format!("{:016x}", hasher.finish())
}

/// A child process of this example whose stdout lines arrive on a channel.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    args: &[&str],
    name: &str,
    lines: &std::sync::mpsc::Sender<(String, String)>,
) -> Result<Proc, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, tag) = (lines.clone(), name.to_owned());
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((tag.clone(), line)).is_err() {
                return;
            }
        }
    });
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

/// Runs two balancers and three registrants as child processes and narrates.
fn orchestrate(etcd: &str, service: &str) -> Result<(), BoxError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let balancers = ["b1", "b2"]
        .iter()
        .map(|name| {
            spawn(
                &["balancer", "--etcd", etcd, "--service", service, "--name", name],
                name,
                &tx,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut registrants = ["api-1", "api-2", "api-3"]
        .iter()
        .map(|id| {
            spawn(
                &[
                    "registrant",
                    "--etcd",
                    etcd,
                    "--service",
                    service,
                    "--instance",
                    id,
                ],
                id,
                &tx,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The latest report of each balancer: (endpoints, digest).
    let mut views: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut wait_for = |count: usize, what: &str, since: Instant| -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let agreed = balancers
                .iter()
                .all(|b| views.get(&b.name).is_some_and(|v| v.0 == count))
                && views
                    .values()
                    .map(|v| &v.1)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    == 1;
            if agreed {
                let digest = &views["b1"].1;
                println!(
                    "==> {what}: both balancers see {count} endpoints after {:?}, same owners for {KEYS} keys (digest {digest})",
                    since.elapsed()
                );
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let (who, line) = rx
                .recv_timeout(left)
                .map_err(|_| format!("timed out waiting for: {what}"))?;
            println!("    [{who}] {line}");
            if let Some((count, digest)) = parse_view(&line) {
                views.insert(who, (count, digest));
            }
        }
    };

    let start = Instant::now();
    wait_for(3, "converged", start)?;

    let mut killed = registrants.remove(0);
    println!(
        "==> SIGKILL {} (no deregistration: its lease must expire)",
        killed.name
    );
    let killed_at = Instant::now();
    killed.child.kill()?;
    killed.child.wait()?;
    wait_for(2, "lease expired", killed_at)?;

    let stopped = &mut registrants[0];
    println!("==> {}: clean shutdown (deregister)", stopped.name);
    let stopped_at = Instant::now();
    if let Some(stdin) = stopped.child.stdin.as_mut() {
        writeln!(stdin, "stop")?;
    }
    wait_for(1, "deregistered", stopped_at)?;
    println!("==> done in {:?}", start.elapsed());
    Ok(())
}

/// `b1: 3 endpoints, owners digest 0123...` → (3, "0123...").
fn parse_view(line: &str) -> Option<(usize, String)> {
    let (_, rest) = line.split_once(": ")?;
    let (count, rest) = rest.split_once(" endpoints, owners digest ")?;
    Some((count.parse().ok()?, rest.trim().to_owned()))
}
