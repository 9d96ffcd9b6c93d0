//! Unit tests of the control plane against an in-memory membership source, with faults
//! injected by `super::fault`: a panicking source, a panicking rebuild, a panicking
//! subscriber, a control thread that dies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::endpoint::Endpoint;
use crate::sync::Mutex as SyncMutex;
use crate::table::DirectoryCell;

fn ep(port: u16) -> Endpoint {
    Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), None)
}

/// A service's membership version and endpoints.
type Membership = (u64, DataArc<Vec<Endpoint>>);

/// The registry's role, in memory: memberships by service, and services whose reads panic.
#[derive(Default)]
struct Memberships {
    services: SyncMutex<HashMap<String, Membership>>,
    panicking: SyncMutex<Vec<String>>,
}

impl Memberships {
    fn set(&self, service: &str, version: u64, endpoints: Vec<Endpoint>) {
        self.services
            .lock()
            .insert(service.to_owned(), (version, DataArc::new(endpoints)));
    }

    fn panic_on(&self, service: &str, on: bool) {
        let mut panicking = self.panicking.lock();
        panicking.retain(|s| s != service);
        if on {
            panicking.push(service.to_owned());
        }
    }
}

impl MembershipSource for Memberships {
    fn membership(&self, service: &str) -> Option<Membership> {
        if self.panicking.lock().iter().any(|s| s == service) {
            panic!("injected fault: reading `{service}` panics");
        }
        self.services.lock().get(service).cloned()
    }
}

struct NoOutliers;

impl OutlierSink for NoOutliers {
    fn consecutive_failures(&self, _: &DataArc<str>, _: SocketAddr) {}
}

fn control_plane(thread_name: &str) -> ControlPlane {
    let mut config = LoadBalancerConfig::default();
    config.control_plane.thread_name = thread_name.to_owned();
    let sink: DataWeak<dyn OutlierSink> = DataWeak::<NoOutliers>::new();
    ControlPlane::new(Settings::new(config, LoadBalancingStrategy::RoundRobin, sink).unwrap())
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The addresses routable in `service`'s published table (empty if unpublished).
fn routable(directory: &DirectoryCell, service: &str) -> Vec<u16> {
    let directory = directory.load();
    let Some(slot) = directory.get(service) else {
        return Vec::new();
    };
    let table = slot.table.load();
    table
        .routable
        .entries()
        .iter()
        .map(|e| table.address(&e.payload).port())
        .collect()
}

fn sources(m: &Memberships) -> Sources<'_> {
    Sources {
        membership: m,
        health: None,
    }
}

#[test]
fn a_service_whose_application_panics_fails_its_writers_and_the_others_are_published() {
    let cp = control_plane("t-panicking-source");
    let directory = DirectoryCell::new();
    let m = Memberships::default();
    m.set("good", 1, vec![ep(1), ep(2)]);
    m.set("bad", 2, vec![ep(3)]);
    m.panic_on("bad", true);
    let good = cp.submit(Command::Changed("good".into()));
    let bad = cp.submit(Command::Changed("bad".into()));
    assert!(cp.process(&sources(&m), &directory), "one batch with both");
    assert_eq!(block_on(good), AckOutcome::Applied);
    match block_on(bad) {
        AckOutcome::Failed(reason) => assert!(reason.contains("reading `bad` panics"), "{reason}"),
        other => panic!("a false {other:?} for an unpublished change"),
    }
    assert_eq!(routable(&directory, "good"), vec![1, 2]);
    assert!(
        routable(&directory, "bad").is_empty(),
        "nothing published for `bad`"
    );

    // The source recovers: the next change of `bad` is published (nothing stays stuck).
    m.panic_on("bad", false);
    let again = cp.submit(Command::Changed("bad".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(again), AckOutcome::Applied);
    assert_eq!(routable(&directory, "bad"), vec![3]);
}

#[test]
fn a_panic_inside_a_rebuild_does_not_leave_the_service_dirty_for_good() {
    let cp = control_plane("t-panicking-rebuild");
    let directory = DirectoryCell::new();
    let m = Memberships::default();
    m.set("fault-rebuild", 1, vec![ep(1)]);
    let first = cp.submit(Command::Changed("fault-rebuild".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(first), AckOutcome::Applied);

    fault::panic_in_rebuild("fault-rebuild", 1);
    m.set("fault-rebuild", 2, vec![ep(1), ep(2)]);
    let failed = cp.submit(Command::Changed("fault-rebuild".into()));
    cp.help(&sources(&m), &directory);
    assert!(matches!(block_on(failed), AckOutcome::Failed(_)));
    assert_eq!(
        routable(&directory, "fault-rebuild"),
        vec![1],
        "the old table stays"
    );

    // Any later command of the service rebuilds it (before the fix the service stayed
    // marked dirty and was never rebuilt again).
    m.set("fault-rebuild", 3, vec![ep(1), ep(2), ep(3)]);
    let next = cp.submit(Command::Changed("fault-rebuild".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(next), AckOutcome::Applied);
    assert_eq!(routable(&directory, "fault-rebuild"), vec![1, 2, 3]);
    let health = cp.submit(Command::HealthChanged("fault-rebuild".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(health), AckOutcome::Applied);
}

#[test]
fn a_panicking_subscriber_is_dropped_and_publication_goes_on() {
    let cp = control_plane("t-panicking-watcher");
    let directory = DirectoryCell::new();
    let m = Memberships::default();
    cp.subscribe(Box::new(|_: &ControlEvent| {
        panic!("injected fault: a subscriber")
    }));
    let updates = cp.watch();
    m.set("svc", 1, vec![ep(1)]);
    let ack = cp.submit(Command::Changed("svc".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(ack), AckOutcome::Applied);
    assert_eq!(routable(&directory, "svc"), vec![1]);
    assert_eq!(updates.try_recv().unwrap().routable.len(), 1);
    m.set("svc", 2, vec![ep(1), ep(2)]);
    let ack = cp.submit(Command::Changed("svc".into()));
    cp.help(&sources(&m), &directory);
    assert_eq!(block_on(ack), AckOutcome::Applied);
    assert_eq!(updates.try_recv().unwrap().routable.len(), 2);
}

#[test]
fn a_control_thread_that_dies_fails_what_it_held_and_is_restarted_by_the_next_write() {
    let name = "t-dying-thread";
    let cp = DataArc::new(control_plane(name));
    let directory = DataArc::new(DirectoryCell::new());
    let m = DataArc::new(Memberships::default());
    m.set("svc", 1, vec![ep(1)]);
    let runner: Runner = {
        let (cp, directory, m) = (DataArc::downgrade(&cp), directory.clone(), m.clone());
        DataArc::new(move || {
            if let Some(cp) = cp.upgrade() {
                cp.run(&sources(&m), &directory);
            }
        })
    };
    cp.start(runner).unwrap();
    assert!(cp.is_running());

    fault::kill_thread(name);
    let ack = cp.submit(Command::Changed("svc".into()));
    cp.help(&sources(&m), &directory);
    // Bounded wait: a hang here is the bug this guards against.
    let outcome = block_on(async { tokio::time::timeout(Duration::from_secs(10), ack).await })
        .expect("a writer whose command a dying thread held is answered");
    match outcome {
        AckOutcome::Failed(reason) => assert!(reason.contains("died"), "{reason}"),
        other => panic!("a false {other:?}: nothing was published"),
    }
    assert!(!cp.is_running(), "the death is visible");
    // Let the dying thread finish unwinding (a write racing with that is failed, never
    // left hanging; this test wants the next write to meet a dead thread).
    for _ in 0..10_000 {
        if cp.thread.lock().as_ref().is_some_and(|h| h.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    // The next write revives the thread and is published by it.
    let ack = cp.submit(Command::Changed("svc".into()));
    cp.help(&sources(&m), &directory);
    let outcome = block_on(async { tokio::time::timeout(Duration::from_secs(10), ack).await }).unwrap();
    assert_eq!(outcome, AckOutcome::Applied);
    assert!(cp.is_running(), "restarted");
    assert_eq!(routable(&directory, "svc"), vec![1]);
    cp.shutdown(&sources(&m), &directory);
    assert!(!cp.is_running());
}

#[test]
fn commands_after_shutdown_resolve_stopped() {
    let cp = control_plane("t-stopped");
    let directory = DirectoryCell::new();
    let m = Memberships::default();
    cp.shutdown(&sources(&m), &directory);
    let ack = cp.submit(Command::Changed("svc".into()));
    assert_eq!(block_on(ack), AckOutcome::Stopped);
}
