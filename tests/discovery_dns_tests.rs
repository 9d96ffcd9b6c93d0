//! DNS discovery against an in-process authoritative DNS server (`hickory-server` on an
//! ephemeral 127.0.0.1 port, UDP and TCP) whose records the tests change at run time, plus
//! the composition of file, DNS and hand-written sources in one registry.
//!
//! Loopback addresses only.
#![cfg(feature = "dns")]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tai_loadbalancer::{
    Discovery, DiscoveryRunner, DiscoverySink, DnsConfig, DnsDiscovery, DnsTarget, Endpoint, FileDiscovery,
    IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, MembershipUpdate, ServiceRegistry,
    SourceHealth, SourceStats,
};

// ===== the DNS server =====

/// The zone the server answers from; tests change it while the server runs.
#[derive(Clone, Default)]
struct Zone(Arc<Mutex<ZoneState>>);

#[derive(Default)]
struct ZoneState {
    records: BTreeMap<(String, RecordType), Vec<Record>>,
    servfail: bool,
    /// Queries answered SERVFAIL whatever the zone holds: `(owner, type)`.
    failing: BTreeSet<(String, RecordType)>,
    /// Per owner: how long queries for it wait before they are answered (each request is
    /// its own task in the server, so a delayed answer holds back no other).
    delays: BTreeMap<String, Duration>,
    /// Delayed queries being answered now, and the most there were at once.
    delayed_now: usize,
    delayed_peak: usize,
    /// Whether SRV answers carry the targets' A records (glue) in the additional section.
    no_glue: bool,
}

fn name(text: &str) -> Name {
    Name::from_str(text).unwrap()
}

impl Zone {
    fn set(&self, owner: &str, kind: RecordType, records: Vec<Record>) {
        let mut state = self.0.lock().unwrap();
        if records.is_empty() {
            state.records.remove(&(owner.to_owned(), kind));
        } else {
            state.records.insert((owner.to_owned(), kind), records);
        }
    }

    fn set_a(&self, owner: &str, ips: &[Ipv4Addr], ttl: u32) {
        let records = ips
            .iter()
            .map(|ip| Record::from_rdata(name(owner), ttl, RData::A(A(*ip))))
            .collect();
        self.set(owner, RecordType::A, records);
    }

    fn set_aaaa(&self, owner: &str, ips: &[Ipv6Addr], ttl: u32) {
        let records = ips
            .iter()
            .map(|ip| Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(*ip))))
            .collect();
        self.set(owner, RecordType::AAAA, records);
    }

    /// `(priority, weight, port, target)` per record.
    fn set_srv(&self, owner: &str, entries: &[(u16, u16, u16, &str)], ttl: u32) {
        let records = entries
            .iter()
            .map(|(p, w, port, target)| {
                Record::from_rdata(
                    name(owner),
                    ttl,
                    RData::SRV(SRV::new(*p, *w, *port, name(target))),
                )
            })
            .collect();
        self.set(owner, RecordType::SRV, records);
    }

    fn set_servfail(&self, on: bool) {
        self.0.lock().unwrap().servfail = on;
    }

    fn set_glue(&self, on: bool) {
        self.0.lock().unwrap().no_glue = !on;
    }

    /// Makes `(owner, kind)` queries fail with SERVFAIL (`on`), or answer again.
    fn set_failing(&self, owner: &str, kind: RecordType, on: bool) {
        let mut state = self.0.lock().unwrap();
        if on {
            state.failing.insert((owner.to_owned(), kind));
        } else {
            state.failing.remove(&(owner.to_owned(), kind));
        }
    }

    fn set_delay(&self, owner: &str, delay: Duration) {
        self.0.lock().unwrap().delays.insert(owner.to_owned(), delay);
    }

    fn delay(&self, owner: &str) -> Option<Duration> {
        self.0.lock().unwrap().delays.get(owner).copied()
    }

    /// The most delayed queries the server was holding at once.
    fn delayed_peak(&self) -> usize {
        self.0.lock().unwrap().delayed_peak
    }

    fn delayed_query(&self, started: bool) {
        let mut state = self.0.lock().unwrap();
        if started {
            state.delayed_now += 1;
            state.delayed_peak = state.delayed_peak.max(state.delayed_now);
        } else {
            state.delayed_now -= 1;
        }
    }

    /// The response code, answers and additionals for a query.
    fn answer(&self, owner: &str, kind: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        let state = self.0.lock().unwrap();
        if state.servfail || state.failing.contains(&(owner.to_owned(), kind)) {
            return (ResponseCode::ServFail, vec![], vec![]);
        }
        let Some(answers) = state.records.get(&(owner.to_owned(), kind)) else {
            // NODATA when the name has records of another type, else NXDOMAIN.
            let exists = state.records.keys().any(|(o, _)| o == owner);
            let code = if exists {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            return (code, vec![], vec![]);
        };
        let mut additionals = Vec::new();
        if kind == RecordType::SRV && !state.no_glue {
            for record in answers {
                if let RData::SRV(srv) = &record.data {
                    let host = srv.target.to_ascii();
                    if let Some(glue) = state.records.get(&(host, RecordType::A)) {
                        additionals.extend(glue.iter().cloned());
                    }
                }
            }
        }
        (ResponseCode::NoError, answers.clone(), additionals)
    }
}

/// Answers from a [`Zone`], authoritatively; counts queries per name.
struct Handler {
    zone: Zone,
    queries: Arc<Mutex<BTreeMap<String, u64>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let Ok(info) = request.request_info() else {
            metadata.response_code = ResponseCode::FormErr;
            let response = builder.build_no_records(metadata);
            return response_handle.send_response(response).await.unwrap();
        };
        let owner = info.query.name().to_string().to_ascii_lowercase();
        *self.queries.lock().unwrap().entry(owner.clone()).or_default() += 1;
        if let Some(delay) = self.zone.delay(&owner) {
            self.zone.delayed_query(true);
            tokio::time::sleep(delay).await;
            self.zone.delayed_query(false);
        }
        let (code, answers, additionals) = self.zone.answer(&owner, info.query.query_type());
        metadata.response_code = code;
        // An empty answer carries the zone's SOA in its authority section, as real
        // authoritative servers send (it is what makes "no records" authoritative).
        let soa = answers.is_empty().then(|| {
            let apex = Name::root();
            let soa = SOA::new(apex.clone(), apex.clone(), 1, 60, 60, 600, 1);
            Record::from_rdata(apex, 1, RData::SOA(soa))
        });
        let response = builder.build(metadata, answers.iter(), [], soa.iter(), additionals.iter());
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => panic!("cannot send a DNS response: {e}"),
        }
    }
}

/// A DNS server on 127.0.0.1 (UDP and TCP, one port), stoppable and restartable on the same
/// port with the same zone.
struct DnsServer {
    zone: Zone,
    port: u16,
    queries: Arc<Mutex<BTreeMap<String, u64>>>,
    server: Option<Server<Handler>>,
}

impl DnsServer {
    async fn start() -> Self {
        let zone = Zone::default();
        let queries = Arc::new(Mutex::new(BTreeMap::new()));
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await else {
                continue; // the TCP port is taken: try another
            };
            let mut server = DnsServer {
                zone: zone.clone(),
                port,
                queries: queries.clone(),
                server: None,
            };
            server.serve(udp, tcp);
            return server;
        }
        panic!("no free UDP+TCP port pair on 127.0.0.1");
    }

    fn serve(&mut self, udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener) {
        let mut server = Server::new(Handler {
            zone: self.zone.clone(),
            queries: self.queries.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        self.server = Some(server);
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.shutdown_gracefully().await;
        }
    }

    async fn restart(&mut self) {
        let addr = self.address();
        for _ in 0..100 {
            if let (Ok(udp), Ok(tcp)) = (
                tokio::net::UdpSocket::bind(addr).await,
                tokio::net::TcpListener::bind(addr).await,
            ) {
                self.serve(udp, tcp);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot rebind {addr}");
    }

    fn queries(&self, owner: &str) -> u64 {
        self.queries.lock().unwrap().get(owner).copied().unwrap_or(0)
    }
}

// ===== helpers =====

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A config for the test server: fast refresh bounds and backoff, short timeouts.
fn config(server: &DnsServer) -> DnsConfig {
    DnsConfig::default()
        .with_nameserver(server.address())
        .with_refresh_bounds(Duration::from_millis(200), Duration::from_secs(2))
        .with_timeout(Duration::from_millis(300))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(200))
}

async fn balancer(
    registry: &Arc<ServiceRegistry>,
    strategy: LoadBalancingStrategy,
) -> IntegratedLoadBalancer {
    IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default())
        .await
        .unwrap()
}

/// Service `api` discovered from the SRV name `_api._tcp.test.` of `server` into a new
/// registry, with a balancer using `strategy` on it; returns once the source has published.
async fn follow_api_srv(
    server: &DnsServer,
    strategy: LoadBalancingStrategy,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer, DiscoveryRunner) {
    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, strategy).await;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(server), [DnsTarget::srv("api", "_api._tcp.test.")]).unwrap());
    runner.synced().await;
    (registry, lb, runner)
}

/// The addresses the balancer routes `service` over (empty if it has none or is unknown).
fn routed(lb: &IntegratedLoadBalancer, service: &str) -> BTreeSet<SocketAddr> {
    lb.service(service)
        .map(|s| s.endpoints().into_iter().map(|(e, _)| e.address).collect())
        .unwrap_or_default()
}

fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns the time it took.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn stats(runner: &DiscoveryRunner, index: usize) -> SourceStats {
    runner.stats()[index].clone()
}

fn is_degraded(stats: &SourceStats) -> bool {
    matches!(stats.health, SourceHealth::Degraded { .. })
}

// ===== tests =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_and_aaaa_records_become_endpoints() {
    let server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1), v4(2)], 60);
    server.zone.set_aaaa("web.test.", &[Ipv6Addr::LOCALHOST], 60);
    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, LoadBalancingStrategy::RoundRobin).await;
    let runner = DiscoveryRunner::new(registry.clone());
    let source = DnsDiscovery::new(
        config(&server),
        [
            DnsTarget::a("web", "web.test.", 8080),
            DnsTarget::aaaa("web", "web.test.", 8080),
        ],
    )
    .unwrap();
    runner.spawn(source);
    runner.synced().await;
    eventually(Duration::from_secs(3), "A + AAAA union", || {
        routed(&lb, "web") == addrs(&["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080"])
    })
    .await;
    let endpoints = registry.endpoints("web").await.unwrap();
    assert!(endpoints.iter().all(|e| e.weight() == 1));
    assert_eq!(stats(&runner, 0).health, SourceHealth::Healthy);
    assert_eq!(stats(&runner, 0).malformed, 0);
    // Picks go to the resolved endpoints.
    let picked: BTreeSet<SocketAddr> = (0..30).map(|_| lb.select("web").unwrap().address).collect();
    assert_eq!(picked.len(), 3);
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_weights_and_priorities_map_to_weights_and_priority_levels() {
    let server = DnsServer::start().await;
    server.zone.set_srv(
        "_api._tcp.test.",
        &[
            (10, 90, 7001, "a.test."),
            (10, 10, 7002, "b.test."),
            (20, 0, 7003, "c.test."),
        ],
        60,
    );
    server.zone.set_a("a.test.", &[v4(1)], 60);
    server.zone.set_a("b.test.", &[v4(2)], 60);
    server.zone.set_a("c.test.", &[v4(3)], 60);
    let (registry, lb, runner) = follow_api_srv(&server, LoadBalancingStrategy::Weighted).await;

    let endpoints: BTreeMap<SocketAddr, Endpoint> = registry
        .endpoints("api")
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.address, e))
        .collect();
    // SRV priorities 10 and 20 become priority levels 0 and 1 (by rank).
    let expect = [
        ("127.0.0.1:7001", 90, "10", 0, "a.test"),
        ("127.0.0.2:7002", 10, "10", 0, "b.test"),
        ("127.0.0.3:7003", 1, "20", 1, "c.test"), // SRV weight 0 becomes the smallest weight
    ];
    assert_eq!(endpoints.len(), expect.len());
    for (address, weight, priority, level, target) in expect {
        let e = &endpoints[&address.parse().unwrap()];
        assert_eq!(e.weight(), weight, "{address}");
        assert_eq!(e.tag("srv_priority"), Some(priority), "{address}");
        assert_eq!(e.priority(), level, "{address}");
        assert_eq!(e.tag("srv_target"), Some(target), "{address}");
    }

    // The weighted strategy follows the SRV weights inside the best priority (90 : 10 over
    // 10,000 picks); the priority-20 record is standby while priority 10 is healthy.
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for _ in 0..10_000 {
        *counts.entry(lb.select("api").unwrap().address).or_default() += 1;
    }
    for (address, weight, _, level, _) in expect {
        let got = f64::from(counts.get(&address.parse().unwrap()).copied().unwrap_or(0));
        let want = if level == 0 {
            10_000.0 * f64::from(weight) / 100.0
        } else {
            0.0
        };
        assert!(
            (got - want).abs() <= want * 0.05 + 5.0,
            "{address}: {got} picks, expected ~{want}"
        );
    }
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_without_glue_resolves_hosts_and_can_keep_the_lowest_priority_only() {
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    server.zone.set_srv(
        "_api._tcp.test.",
        &[
            (10, 5, 7001, "a.test."),
            (10, 5, 0, "a.test."),       // port 0: malformed, skipped
            (10, 5, 7009, "gone.test."), // a host with no addresses: skipped
            (20, 5, 7003, "c.test."),    // a backup priority
        ],
        60,
    );
    server.zone.set_a("a.test.", &[v4(1), v4(11)], 60);
    server.zone.set_a("c.test.", &[v4(3)], 60);
    let registry = Arc::new(ServiceRegistry::new());
    let runner = DiscoveryRunner::new(registry.clone());
    let config = config(&server).with_lowest_srv_priority_only(true);
    runner.spawn(DnsDiscovery::new(config, [DnsTarget::srv("api", "_api._tcp.test.")]).unwrap());
    runner.synced().await;
    let got: BTreeSet<SocketAddr> = registry
        .endpoints("api")
        .await
        .unwrap()
        .iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(got, addrs(&["127.0.0.1:7001", "127.0.0.11:7001"]));
    let stats = stats(&runner, 0);
    assert!(stats.malformed >= 2, "{stats:?}");
    assert_eq!(stats.health, SourceHealth::Healthy);
    assert!(server.queries("a.test.") >= 1, "host resolved without glue");
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_removal_is_applied_at_the_next_ttl_driven_refresh() {
    let server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1), v4(2), v4(3)], 1);
    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, LoadBalancingStrategy::RoundRobin).await;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::a("web", "web.test.", 80)]).unwrap());
    runner.synced().await;
    assert_eq!(routed(&lb, "web").len(), 3);

    // TTL 1 s (min bound 200 ms, max 2 s): about one query per second, not one per 200 ms.
    let before = server.queries("web.test.");
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let refreshes = server.queries("web.test.") - before;
    assert!(
        (2..=5).contains(&refreshes),
        "{refreshes} refreshes in 3.3 s with TTL 1 s"
    );

    server.zone.set_a("web.test.", &[v4(1), v4(3)], 1);
    let took = eventually(Duration::from_secs(3), "removal applied", || {
        routed(&lb, "web") == addrs(&["127.0.0.1:80", "127.0.0.3:80"])
    })
    .await;
    assert!(
        took <= Duration::from_millis(1_500),
        "removal took {took:?} with TTL 1 s"
    );

    // TTL 0: refreshes at the minimum bound (200 ms), several per second.
    server.zone.set_a("web.test.", &[v4(1), v4(3)], 0);
    tokio::time::sleep(Duration::from_millis(1_200)).await; // the TTL-1 answer expires
    let before = server.queries("web.test.");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refreshes = server.queries("web.test.") - before;
    assert!(
        (6..=12).contains(&refreshes),
        "{refreshes} refreshes in 2 s at the 200 ms bound"
    );
    assert_eq!(stats(&runner, 0).health, SourceHealth::Healthy);
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authoritative_empty_answer_empties_the_service() {
    let server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1), v4(2)], 1);
    server
        .zone
        .set_srv("_api._tcp.test.", &[(1, 1, 7001, "a.test.")], 1);
    server.zone.set_a("a.test.", &[v4(1)], 1);
    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, LoadBalancingStrategy::RoundRobin).await;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(
        DnsDiscovery::new(
            config(&server),
            [
                DnsTarget::a("web", "web.test.", 80),
                DnsTarget::srv("api", "_api._tcp.test."),
            ],
        )
        .unwrap(),
    );
    runner.synced().await;
    assert_eq!(routed(&lb, "web").len(), 2);
    assert_eq!(routed(&lb, "api").len(), 1);

    // NXDOMAIN for web (no records at all), NODATA for api (the name keeps an A record).
    server.zone.set("web.test.", RecordType::A, vec![]);
    server.zone.set_srv("_api._tcp.test.", &[], 1);
    server.zone.set_a("_api._tcp.test.", &[v4(9)], 1);
    eventually(Duration::from_secs(4), "both services emptied", || {
        routed(&lb, "web").is_empty() && routed(&lb, "api").is_empty()
    })
    .await;
    // The services stay known (empty), and the source is healthy: DNS answered.
    assert!(lb.service("web").is_ok());
    assert!(lb.pick("web").is_err());
    let s = stats(&runner, 0);
    assert_eq!(s.health, SourceHealth::Healthy, "{s:?}");
    assert_eq!(s.degradations, 0);

    // Records back: the service fills again.
    server.zone.set_a("web.test.", &[v4(4)], 1);
    eventually(Duration::from_secs(4), "records back", || {
        routed(&lb, "web") == addrs(&["127.0.0.4:80"])
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_keeps_the_last_membership_then_recovers() {
    let mut server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1), v4(2)], 1);
    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, LoadBalancingStrategy::RoundRobin).await;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::a("web", "web.test.", 80)]).unwrap());
    runner.synced().await;
    assert_eq!(routed(&lb, "web").len(), 2);

    server.stop().await;
    eventually(
        Duration::from_secs(5),
        "degraded while the server is down",
        || is_degraded(&stats(&runner, 0)),
    )
    .await;
    // Routing continues on the last membership through several failed retries.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(routed(&lb, "web"), addrs(&["127.0.0.1:80", "127.0.0.2:80"]));
    assert!(lb.pick("web").is_ok());
    let down = stats(&runner, 0);
    assert!(is_degraded(&down), "{down:?}");
    assert_eq!(down.degradations, 1, "one degradation however many retries fail");
    assert!(
        down.last_error
            .as_deref()
            .is_some_and(|e| e.contains("web.test.")),
        "{down:?}"
    );

    // Changed while down, applied once the server is back.
    server.zone.set_a("web.test.", &[v4(2), v4(3)], 1);
    server.restart().await;
    eventually(Duration::from_secs(5), "recovered with the new records", || {
        routed(&lb, "web") == addrs(&["127.0.0.2:80", "127.0.0.3:80"])
            && stats(&runner, 0).health == SourceHealth::Healthy
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_keeps_the_last_membership_and_degrades() {
    let server = DnsServer::start().await;
    server
        .zone
        .set_srv("_api._tcp.test.", &[(1, 1, 7001, "a.test.")], 1);
    server.zone.set_a("a.test.", &[v4(1)], 1);
    let registry = Arc::new(ServiceRegistry::new());
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::srv("api", "_api._tcp.test.")]).unwrap());
    runner.synced().await;

    server.zone.set_servfail(true);
    eventually(Duration::from_secs(4), "degraded on SERVFAIL", || {
        is_degraded(&stats(&runner, 0))
    })
    .await;
    assert_eq!(
        registry.endpoints("api").await.unwrap().len(),
        1,
        "SERVFAIL never empties"
    );
    server.zone.set_servfail(false);
    eventually(Duration::from_secs(4), "healthy again", || {
        stats(&runner, 0).health == SourceHealth::Healthy
    })
    .await;
    assert_eq!(registry.endpoints("api").await.unwrap().len(), 1);
    runner.shutdown().await;
}

/// The addresses and weights the balancer routes `service` over.
fn routed_weights(lb: &IntegratedLoadBalancer, service: &str) -> BTreeMap<SocketAddr, u32> {
    lb.service(service)
        .map(|s| {
            s.endpoints()
                .into_iter()
                .map(|(e, _)| (e.address, e.weight()))
                .collect()
        })
        .unwrap_or_default()
}

fn weighted(list: &[(&str, u32)]) -> BTreeMap<SocketAddr, u32> {
    list.iter().map(|(a, w)| (a.parse().unwrap(), *w)).collect()
}

fn degraded_by(stats: &SourceStats, host: &str) -> bool {
    is_degraded(stats) && stats.last_error.as_deref().is_some_and(|e| e.contains(host))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_srv_host_keeps_its_addresses_while_the_rest_of_the_answer_applies() {
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    server.zone.set_srv(
        "_api._tcp.test.",
        &[(10, 5, 7001, "a.test."), (10, 5, 7002, "b.test.")],
        1,
    );
    server.zone.set_a("a.test.", &[v4(1)], 1);
    server.zone.set_a("b.test.", &[v4(2)], 1);
    let (_registry, lb, runner) = follow_api_srv(&server, LoadBalancingStrategy::Weighted).await;
    eventually(Duration::from_secs(3), "both hosts routed", || {
        routed_weights(&lb, "api") == weighted(&[("127.0.0.1:7001", 5), ("127.0.0.2:7002", 5)])
    })
    .await;
    assert_eq!(stats(&runner, 0).health, SourceHealth::Healthy);

    // b's A lookup fails; meanwhile a moves and b's SRV weight changes. The change to a and
    // the new weight apply; b keeps its last address.
    server.zone.set_failing("b.test.", RecordType::A, true);
    server.zone.set_a("a.test.", &[v4(3)], 1);
    server.zone.set_srv(
        "_api._tcp.test.",
        &[(10, 5, 7001, "a.test."), (10, 7, 7002, "b.test.")],
        1,
    );
    let expected = weighted(&[("127.0.0.3:7001", 5), ("127.0.0.2:7002", 7)]);
    eventually(
        Duration::from_secs(4),
        "a's new address and b's new weight applied, b's address kept",
        || routed_weights(&lb, "api") == expected,
    )
    .await;
    eventually(Duration::from_secs(2), "degraded naming b.test", || {
        degraded_by(&stats(&runner, 0), "b.test")
    })
    .await;

    // While b fails, the target is retried on the backoff (50..200 ms), not the TTL (1 s),
    // and nothing is lost.
    let before = server.queries("b.test.");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let retries = server.queries("b.test.") - before;
    assert!(retries >= 3, "{retries} lookups of b in 1.2 s");
    assert_eq!(routed_weights(&lb, "api"), expected);
    let down = stats(&runner, 0);
    assert!(degraded_by(&down, "b.test"), "{down:?}");
    assert_eq!(down.degradations, 1, "{down:?}");

    // b recovers (at a new address): healthy again, with b's new address.
    server.zone.set_a("b.test.", &[v4(4)], 1);
    server.zone.set_failing("b.test.", RecordType::A, false);
    eventually(Duration::from_secs(4), "b recovered, healthy", || {
        routed_weights(&lb, "api") == weighted(&[("127.0.0.3:7001", 5), ("127.0.0.4:7002", 7)])
            && stats(&runner, 0).health == SourceHealth::Healthy
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_resolution_publishes_the_srv_hosts_that_resolve() {
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    server.zone.set_srv(
        "_api._tcp.test.",
        &[(10, 5, 7001, "a.test."), (10, 5, 7002, "b.test.")],
        1,
    );
    server.zone.set_a("a.test.", &[v4(1)], 1);
    server.zone.set_a("b.test.", &[v4(2)], 1);
    server.zone.set_failing("b.test.", RecordType::A, true);
    let (registry, lb, runner) = follow_api_srv(&server, LoadBalancingStrategy::RoundRobin).await;

    // a is not held hostage by b: published at the first answer.
    let registered: BTreeSet<SocketAddr> = registry
        .endpoints("api")
        .await
        .expect("the first answer is published without the failing host")
        .iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(registered, addrs(&["127.0.0.1:7001"]));
    let s = stats(&runner, 0);
    assert!(degraded_by(&s, "b.test"), "{s:?}");

    server.zone.set_failing("b.test.", RecordType::A, false);
    eventually(Duration::from_secs(4), "b appears once it resolves", || {
        routed(&lb, "api") == addrs(&["127.0.0.1:7001", "127.0.0.2:7002"])
            && stats(&runner, 0).health == SourceHealth::Healthy
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_targets_renamed_during_a_dns_outage_do_not_empty_the_service() {
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    server
        .zone
        .set_srv("_api._tcp.test.", &[(10, 5, 7001, "a.test.")], 1);
    server.zone.set_a("a.test.", &[v4(1)], 1);
    let (_registry, lb, runner) = follow_api_srv(&server, LoadBalancingStrategy::RoundRobin).await;
    eventually(Duration::from_secs(2), "a routed", || {
        routed(&lb, "api") == addrs(&["127.0.0.1:7001"])
    })
    .await;

    // Every SRV record now names a new host, and that host's lookup fails: publishing the
    // partial answer would empty the service. The last answer stays; the source degrades.
    server.zone.set_a("c.test.", &[v4(3)], 1);
    server.zone.set_failing("c.test.", RecordType::A, true);
    server
        .zone
        .set_srv("_api._tcp.test.", &[(10, 5, 7003, "c.test.")], 1);
    eventually(Duration::from_secs(4), "degraded by c", || {
        degraded_by(&stats(&runner, 0), "c.test")
    })
    .await;
    let queried = server.queries("c.test.");
    eventually(Duration::from_secs(4), "c retried", || {
        server.queries("c.test.") > queried
    })
    .await;
    assert_eq!(
        routed(&lb, "api"),
        addrs(&["127.0.0.1:7001"]),
        "the last answer stays"
    );

    // Once c resolves, the new membership applies and the source is healthy.
    server.zone.set_failing("c.test.", RecordType::A, false);
    eventually(Duration::from_secs(4), "c replaces a", || {
        routed(&lb, "api") == addrs(&["127.0.0.3:7003"]) && stats(&runner, 0).health == SourceHealth::Healthy
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_is_counted_when_it_appears_not_at_every_refresh() {
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    // TTL 0: refreshed at the 200 ms bound.
    let mut entries = vec![
        (10, 5, 7001, "a.test."),
        (10, 5, 0, "a.test."),       // port 0: malformed
        (10, 5, 7009, "gone.test."), // a host with no addresses: malformed
    ];
    server.zone.set_srv("_api._tcp.test.", &entries, 0);
    server.zone.set_a("a.test.", &[v4(1)], 0);
    let registry = Arc::new(ServiceRegistry::new());
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::srv("api", "_api._tcp.test.")]).unwrap());
    runner.synced().await;
    assert_eq!(stats(&runner, 0).malformed, 2);

    // Several refreshes find the same bad records: not counted again.
    let before = server.queries("_api._tcp.test.");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refreshes = server.queries("_api._tcp.test.") - before;
    assert!(
        refreshes >= 3,
        "{refreshes} refreshes in 1.5 s at the 200 ms bound"
    );
    let s = stats(&runner, 0);
    assert_eq!((s.malformed, &s.health), (2, &SourceHealth::Healthy), "{s:?}");

    // A new bad record is counted, once.
    entries.push((10, 5, 7010, "gone2.test."));
    server.zone.set_srv("_api._tcp.test.", &entries, 0);
    eventually(Duration::from_secs(3), "the new bad record counted", || {
        stats(&runner, 0).malformed == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(stats(&runner, 0).malformed, 3);

    // One that goes away and comes back is new again.
    entries.pop();
    server.zone.set_srv("_api._tcp.test.", &entries, 0);
    let before = server.queries("_api._tcp.test.");
    eventually(Duration::from_secs(3), "a refresh without it", || {
        server.queries("_api._tcp.test.") >= before + 2
    })
    .await;
    entries.push((10, 5, 7010, "gone2.test."));
    server.zone.set_srv("_api._tcp.test.", &entries, 0);
    eventually(Duration::from_secs(3), "the returning bad record counted", || {
        stats(&runner, 0).malformed == 4
    })
    .await;
    let got: BTreeSet<SocketAddr> = registry
        .endpoints("api")
        .await
        .unwrap()
        .iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(got, addrs(&["127.0.0.1:7001"]));
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_target_hosts_are_looked_up_concurrently() {
    const HOSTS: u8 = 6;
    const DELAY: Duration = Duration::from_millis(400);
    let server = DnsServer::start().await;
    server.zone.set_glue(false);
    let hosts: Vec<String> = (0..HOSTS).map(|i| format!("h{i}.test.")).collect();
    let entries: Vec<(u16, u16, u16, &str)> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| (10, 5, 7000 + i as u16, host.as_str()))
        .collect();
    server.zone.set_srv("_api._tcp.test.", &entries, 60);
    for (i, host) in (0..HOSTS).zip(&hosts) {
        server.zone.set_a(host, &[v4(10 + i)], 60);
        server.zone.set_delay(host, DELAY);
    }
    let registry = Arc::new(ServiceRegistry::new());
    let runner = DiscoveryRunner::new(registry.clone());
    let config = config(&server).with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    runner.spawn(DnsDiscovery::new(config, [DnsTarget::srv("api", "_api._tcp.test.")]).unwrap());
    runner.synced().await;
    let took = start.elapsed();
    assert_eq!(registry.endpoints("api").await.unwrap().len(), usize::from(HOSTS));
    assert_eq!(stats(&runner, 0).health, SourceHealth::Healthy);
    // The server saw every host's query waiting at the same time (one after another, it
    // would never hold more than one); timing is printed, not asserted (a noisy machine).
    assert!(
        server.zone.delayed_peak() >= usize::from(HOSTS),
        "at most {} of {HOSTS} host lookups in flight at once",
        server.zone.delayed_peak()
    );
    eprintln!("{HOSTS} hosts answering after {DELAY:?} each: synced in {took:?}");
    runner.shutdown().await;
}

#[cfg(feature = "prometheus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_health_is_exported_as_metrics() {
    let mut server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1)], 1);
    let registry = Arc::new(ServiceRegistry::new());
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::a("web", "web.test.", 80)]).unwrap());
    runner.synced().await;
    let text = tai_loadbalancer::encode_discovery_prometheus(&runner);
    assert!(
        text.contains("tai_lb_discovery_source_healthy{source=\"dns:web.test.\"} 1"),
        "{text}"
    );
    server.stop().await;
    eventually(Duration::from_secs(5), "degraded", || {
        is_degraded(&stats(&runner, 0))
    })
    .await;
    let text = tai_loadbalancer::encode_discovery_prometheus(&runner);
    assert!(
        text.contains("tai_lb_discovery_source_healthy{source=\"dns:web.test.\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("tai_lb_discovery_degradations_total{source=\"dns:web.test.\"} 1"),
        "{text}"
    );
    runner.shutdown().await;
}

// ===== composition =====

/// A hand-written source: publishes one snapshot, then waits.
struct Fixed {
    name: &'static str,
    service: &'static str,
    endpoints: Vec<Endpoint>,
}

#[async_trait::async_trait]
impl Discovery for Fixed {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    async fn run(self: Box<Self>, sink: DiscoverySink) {
        sink.publish(MembershipUpdate::Snapshot {
            service: self.service.to_owned(),
            endpoints: self.endpoints,
        });
        sink.set_health(SourceHealth::Healthy);
        sink.closed().await;
    }
}

fn ep(address: &str) -> Endpoint {
    Endpoint::new(address.parse().unwrap(), None)
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_dns_and_hand_written_sources_compose_and_conflicts_are_counted() {
    let server = DnsServer::start().await;
    server.zone.set_a("web.test.", &[v4(1), v4(2)], 60);
    let dir = std::env::temp_dir().join(format!(
        "tai-lb-compose-{}-{}",
        std::process::id(),
        NEXT_FILE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("services.toml");
    std::fs::write(
        &path,
        "[[services]]\nname = \"files\"\n[[services.endpoints]]\naddress = \"127.0.0.5:6000\"\n",
    )
    .unwrap();

    let registry = Arc::new(ServiceRegistry::new());
    let lb = balancer(&registry, LoadBalancingStrategy::RoundRobin).await;
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(FileDiscovery::new(&path).with_poll_interval(Duration::from_millis(50)));
    runner.spawn(DnsDiscovery::new(config(&server), [DnsTarget::a("web", "web.test.", 80)]).unwrap());
    runner.spawn(Fixed {
        name: "manual",
        service: "manual",
        endpoints: vec![ep("127.0.0.6:7000")],
    });
    runner.synced().await;
    // A conflicting source for a service the DNS source owns: skipped and counted.
    runner.spawn(Fixed {
        name: "intruder",
        service: "web",
        endpoints: vec![ep("127.0.0.66:80")],
    });
    runner.synced().await;

    assert_eq!(routed(&lb, "files"), addrs(&["127.0.0.5:6000"]));
    assert_eq!(routed(&lb, "web"), addrs(&["127.0.0.1:80", "127.0.0.2:80"]));
    assert_eq!(routed(&lb, "manual"), addrs(&["127.0.0.6:7000"]));
    let stats = runner.stats();
    assert_eq!(stats.len(), 4);
    assert!(
        stats.iter().all(|s| s.health == SourceHealth::Healthy),
        "{stats:?}"
    );
    assert_eq!(stats[3].name, "intruder");
    assert_eq!(stats[3].conflicts, 1);
    assert_eq!(stats[3].applied, 0);
    assert!(
        stats[..3].iter().all(|s| s.conflicts == 0 && s.applied >= 1),
        "{stats:?}"
    );
    runner.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
