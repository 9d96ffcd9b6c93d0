//! The health event log: one structured [`HealthEvent`] per endpoint transition.
//!
//! This module owns the event types, the bounded per-subscriber queue the control plane
//! fills ([`EventQueue`]), the public subscription [`HealthEvents`] (a `Stream`, with blocking
//! and non-blocking reads too), and the JSON-lines file sink with rotation by size
//! ([`log`]).
//!
//! Events are made by the control plane (its thread, or a writer applying its own change
//! before `start`), from the decisions it takes while rebuilding routing tables: an endpoint
//! added or removed, failing or passing its active checks (with the check's error), ejected
//! by outlier detection (with the ejection's duration) and returned, draining, released,
//! marked down or up by an operator, and the service entering or leaving panic mode. Nothing
//! on the pick path makes, formats or queues an event: an ejection is decided from the
//! failure run the data plane already reports to the control plane.
//!
//! # Invariants
//!
//! * Per balancer, `seq` increases by one per event, in the order the control plane took its
//!   decisions; a subscriber sees the events of its lifetime in that order.
//! * A subscriber's queue holds at most `health_events.buffer` events: one that falls behind
//!   loses the oldest (counted in [`HealthEvents::lost`]), never blocks the control plane.
//! * When the balancer stops, every subscription ends (its reads return `None` once empty).
#![deny(unsafe_code)]

pub(crate) mod log;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::sync::{Condvar, DataArc, Mutex};

/// Longest failure reason kept in an event (longer ones are cut at a character boundary and
/// end with `…`), so one line of the log stays small.
pub const MAX_REASON_LEN: usize = 512;

/// One transition of an endpoint (or of a service's panic state), as the control plane
/// decided it.
///
/// # JSON
///
/// [`to_json_line`](Self::to_json_line) (the file sink, `/status.json`) writes one object:
///
/// ```json
/// {"seq":7,"time":"2025-01-01T12:00:00.250Z","unix_ms":1735732800250,"service":"greeter","endpoint":"127.0.0.1:50051","event":"unhealthy","reason":"connect: Connection refused (os error 111)"}
/// ```
///
/// `event` is [`HealthEventKind::name`]; the kind's data follow as fields: `reason`
/// (unhealthy), `duration_ms` and `ejections` (ejected), `in_flight_abandoned` and
/// `timed_out` (released), `healthy` and `eligible` (panic). `endpoint` is absent for panic
/// events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    /// Position in this balancer's event sequence (from 1).
    pub seq: u64,
    /// When the control plane took the decision.
    pub time: SystemTime,
    /// The service.
    pub service: String,
    /// The endpoint, `None` for a service's panic transitions.
    pub endpoint: Option<SocketAddr>,
    /// What happened.
    pub kind: HealthEventKind,
}

/// What happened to an endpoint (or a service).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthEventKind {
    /// It joined the service (routable unless something below says otherwise).
    Added,
    /// It left the service (deregistered, or the service was removed). Requests in flight
    /// finish; `Released` follows.
    Removed,
    /// Its active checks pass again (`healthy_threshold` in a row).
    Healthy,
    /// Its active checks fail (`unhealthy_threshold` in a row): out of routing.
    Unhealthy {
        /// The last check's error, as the checker said it.
        reason: Option<String>,
    },
    /// Ejected by outlier detection after a run of reported failures.
    Ejected {
        /// How long the ejection lasts.
        duration: Duration,
        /// Ejections so far (the duration grows with it).
        ejections: u32,
    },
    /// Its ejection ended: back in routing.
    Returned,
    /// A drain started: no new picks, requests in flight finish.
    Draining,
    /// A drain was ended by the operator (`undrain`): routed by its health again.
    Undrained,
    /// A removed endpoint's requests are all done (or abandoned at the drain timeout): the
    /// balancer has let go of it.
    Released {
        /// Requests still in flight when it was released (0 unless `timed_out`).
        in_flight_abandoned: u64,
        /// Whether the drain timeout expired first.
        timed_out: bool,
    },
    /// An operator marked it down.
    MarkedDown,
    /// An operator marked it up again.
    MarkedUp,
    /// Too few endpoints of the service are healthy: picks go to all of them.
    PanicEntered {
        /// Healthy endpoints.
        healthy: usize,
        /// Endpoints not marked down or draining.
        eligible: usize,
    },
    /// Enough endpoints are healthy again: panic mode is over.
    PanicLeft {
        /// Healthy endpoints.
        healthy: usize,
        /// Endpoints not marked down or draining.
        eligible: usize,
    },
}

impl HealthEventKind {
    /// The kind's name in JSON (`"added"`, `"unhealthy"`, `"panic_entered"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            HealthEventKind::Added => "added",
            HealthEventKind::Removed => "removed",
            HealthEventKind::Healthy => "healthy",
            HealthEventKind::Unhealthy { .. } => "unhealthy",
            HealthEventKind::Ejected { .. } => "ejected",
            HealthEventKind::Returned => "returned",
            HealthEventKind::Draining => "draining",
            HealthEventKind::Undrained => "undrained",
            HealthEventKind::Released { .. } => "released",
            HealthEventKind::MarkedDown => "marked_down",
            HealthEventKind::MarkedUp => "marked_up",
            HealthEventKind::PanicEntered { .. } => "panic_entered",
            HealthEventKind::PanicLeft { .. } => "panic_left",
        }
    }

    /// Whether the endpoint leaves routing by it (for timelines).
    pub fn leaves_routing(&self) -> bool {
        matches!(
            self,
            HealthEventKind::Removed
                | HealthEventKind::Unhealthy { .. }
                | HealthEventKind::Ejected { .. }
                | HealthEventKind::Draining
                | HealthEventKind::MarkedDown
        )
    }
}

/// The wire form of an event (flat, optional fields left out).
#[derive(Serialize)]
struct Wire<'a> {
    seq: u64,
    time: String,
    unix_ms: u64,
    service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ejections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight_abandoned: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timed_out: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eligible: Option<usize>,
}

impl HealthEvent {
    /// Milliseconds since the Unix epoch (0 for a time before it).
    pub fn unix_ms(&self) -> u64 {
        unix_ms(self.time)
    }

    fn wire(&self) -> Wire<'_> {
        let mut wire = Wire {
            seq: self.seq,
            time: rfc3339_ms(self.time),
            unix_ms: self.unix_ms(),
            service: &self.service,
            endpoint: self.endpoint.map(|a| a.to_string()),
            event: self.kind.name(),
            reason: None,
            duration_ms: None,
            ejections: None,
            in_flight_abandoned: None,
            timed_out: None,
            healthy: None,
            eligible: None,
        };
        match &self.kind {
            HealthEventKind::Unhealthy { reason } => wire.reason = reason.as_deref(),
            HealthEventKind::Ejected { duration, ejections } => {
                wire.duration_ms = Some(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
                wire.ejections = Some(*ejections);
            }
            HealthEventKind::Released {
                in_flight_abandoned,
                timed_out,
            } => {
                wire.in_flight_abandoned = Some(*in_flight_abandoned);
                wire.timed_out = Some(*timed_out);
            }
            HealthEventKind::PanicEntered { healthy, eligible }
            | HealthEventKind::PanicLeft { healthy, eligible } => {
                wire.healthy = Some(*healthy);
                wire.eligible = Some(*eligible);
            }
            _ => {}
        }
        wire
    }

    /// The event as one line of JSON, without the newline (see the type's docs).
    pub fn to_json_line(&self) -> String {
        // A struct of strings, integers and booleans always serializes.
        serde_json::to_string(&self.wire()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl Serialize for HealthEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.wire().serialize(serializer)
    }
}

impl fmt::Display for HealthEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json_line())
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `time` in RFC 3339 with milliseconds, UTC (`2025-01-01T12:00:00.250Z`).
pub(crate) fn rfc3339_ms(time: SystemTime) -> String {
    let ms = unix_ms(time);
    let (days, rest) = (ms / 86_400_000, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days as i64);
    let (h, min, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `reason` cut to [`MAX_REASON_LEN`] bytes at a character boundary.
pub(crate) fn short_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_LEN {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_LEN - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

// ===== impl EventQueue =====

/// One subscriber's queue: filled by the control plane, read by [`HealthEvents`] (or the
/// file sink's thread). Bounded: when full, the oldest event is dropped and counted.
pub(crate) struct EventQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

struct QueueState {
    events: VecDeque<HealthEvent>,
    lost: u64,
    /// The balancer stopped: nothing more will come.
    closed: bool,
    /// The reader is gone: the control plane drops the queue.
    abandoned: bool,
    waker: Option<Waker>,
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> DataArc<Self> {
        DataArc::new(Self {
            state: Mutex::new(QueueState {
                events: VecDeque::new(),
                lost: 0,
                closed: false,
                abandoned: false,
                waker: None,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    /// Queues `event` (dropping the oldest when full). Returns `false` once the reader is
    /// gone, so the control plane forgets the queue.
    pub(crate) fn push(&self, event: &HealthEvent) -> bool {
        let mut state = self.state.lock();
        if state.abandoned {
            return false;
        }
        if state.events.len() >= self.capacity {
            state.events.pop_front();
            state.lost += 1;
        }
        state.events.push_back(event.clone());
        let waker = state.waker.take();
        drop(state);
        self.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// No more events will come (the balancer stopped).
    pub(crate) fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        let waker = state.waker.take();
        drop(state);
        self.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn abandon(&self) {
        let mut state = self.state.lock();
        state.abandoned = true;
        state.events.clear();
    }

    pub(crate) fn try_pop(&self) -> Option<HealthEvent> {
        self.state.lock().events.pop_front()
    }

    /// Everything queued now.
    pub(crate) fn take_all(&self) -> Vec<HealthEvent> {
        self.state.lock().events.drain(..).collect()
    }

    /// Waits up to `timeout` for events; returns what is queued and whether the queue is
    /// closed (and empty).
    pub(crate) fn wait(&self, timeout: Duration) -> (Vec<HealthEvent>, bool) {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock();
        loop {
            if !state.events.is_empty() {
                return (state.events.drain(..).collect(), false);
            }
            if state.closed {
                return (Vec::new(), true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (Vec::new(), false);
            }
            state = self.ready.wait_timeout(state, deadline - now).0;
        }
    }

    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<HealthEvent>> {
        let mut state = self.state.lock();
        if let Some(event) = state.events.pop_front() {
            return Poll::Ready(Some(event));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn lost(&self) -> u64 {
        self.state.lock().lost
    }
}

impl fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("EventQueue")
            .field("queued", &state.events.len())
            .field("lost", &state.lost)
            .field("closed", &state.closed)
            .finish()
    }
}

// ===== impl HealthEvents =====

/// A subscription to a balancer's [`HealthEvent`]s (see
/// [`IntegratedLoadBalancer::health_events`](crate::IntegratedLoadBalancer::health_events)):
/// every event from the moment it was taken, in order. A `futures_core::Stream`; also read
/// with [`next`](Self::next) (async), [`next_timeout`](Self::next_timeout) (blocking) or
/// [`try_next`](Self::try_next). It ends (`None`) once the balancer stopped and everything
/// queued was read. Drop it to unsubscribe.
///
/// It holds at most `health_events.buffer` unread events: a reader that falls behind loses
/// the oldest ones, counted by [`lost`](Self::lost) (and visible as gaps in `seq`).
pub struct HealthEvents {
    queue: DataArc<EventQueue>,
}

impl HealthEvents {
    pub(crate) fn new(queue: DataArc<EventQueue>) -> Self {
        Self { queue }
    }

    /// The next event if one is waiting.
    pub fn try_next(&self) -> Option<HealthEvent> {
        self.queue.try_pop()
    }

    /// Every event waiting now.
    pub fn drain(&self) -> Vec<HealthEvent> {
        self.queue.take_all()
    }

    /// Waits up to `timeout` for the next event (blocking the thread).
    pub fn next_timeout(&self, timeout: Duration) -> Option<HealthEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.queue.try_pop() {
                return Some(event);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let mut state = self.queue.state.lock();
            if state.events.is_empty() {
                if state.closed {
                    return None;
                }
                state = self.queue.ready.wait_timeout(state, deadline - now).0;
            }
            if let Some(event) = state.events.pop_front() {
                return Some(event);
            }
        }
    }

    /// The next event (waits for one); `None` once the balancer stopped and nothing is left.
    pub async fn next(&mut self) -> Option<HealthEvent> {
        std::future::poll_fn(|cx| self.queue.poll_pop(cx)).await
    }

    /// Events this subscription lost because it fell more than `health_events.buffer`
    /// events behind.
    pub fn lost(&self) -> u64 {
        self.queue.lost()
    }
}

impl futures_core::Stream for HealthEvents {
    type Item = HealthEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HealthEvent>> {
        self.queue.poll_pop(cx)
    }
}

impl Drop for HealthEvents {
    fn drop(&mut self) {
        self.queue.abandon();
    }
}

impl fmt::Debug for HealthEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HealthEvents").field(&self.queue).finish()
    }
}

// ===== the control plane's side =====

/// An event as a service's control records it, before it gets its number and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingEvent {
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) kind: HealthEventKind,
}

impl PendingEvent {
    pub(crate) fn endpoint(address: SocketAddr, kind: HealthEventKind) -> Self {
        Self {
            endpoint: Some(address),
            kind,
        }
    }

    pub(crate) fn service(kind: HealthEventKind) -> Self {
        Self { endpoint: None, kind }
    }
}

/// The control plane's subscribers and event numbering.
#[derive(Debug, Default)]
pub(crate) struct EventHub {
    subscribers: Vec<DataArc<EventQueue>>,
    next_seq: u64,
}

impl EventHub {
    /// A new subscriber.
    pub(crate) fn subscribe(&mut self, queue: DataArc<EventQueue>) {
        self.subscribers.push(queue);
    }

    /// Numbers, stamps and delivers the events of `service` (in order).
    pub(crate) fn deliver(&mut self, service: &str, pending: impl IntoIterator<Item = PendingEvent>) {
        let time = SystemTime::now();
        for p in pending {
            self.next_seq += 1;
            if self.subscribers.is_empty() {
                continue;
            }
            let event = HealthEvent {
                seq: self.next_seq,
                time,
                service: service.to_owned(),
                endpoint: p.endpoint,
                kind: p.kind,
            };
            self.subscribers.retain(|q| q.push(&event));
        }
    }

    /// Whether anyone subscribes.
    pub(crate) fn has_subscribers(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Ends every subscription (the balancer stopped).
    pub(crate) fn close(&mut self) {
        for q in self.subscribers.drain(..) {
            q.close();
        }
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |ms: u64| rfc3339_ms(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_735_732_800_250), "2025-01-01T12:00:00.250Z");
        assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn json_lines_carry_the_kind_and_its_data() {
        let event = HealthEvent {
            seq: 7,
            time: UNIX_EPOCH + Duration::from_millis(1_735_732_800_250),
            service: "greeter".into(),
            endpoint: Some("127.0.0.1:50051".parse().unwrap()),
            kind: HealthEventKind::Ejected {
                duration: Duration::from_secs(30),
                ejections: 2,
            },
        };
        let line = event.to_json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event"], "ejected");
        assert_eq!(v["duration_ms"], 30_000);
        assert_eq!(v["ejections"], 2);
        assert_eq!(v["endpoint"], "127.0.0.1:50051");
        assert_eq!(v["time"], "2025-01-01T12:00:00.250Z");
        assert!(v.get("reason").is_none());
        let panic = HealthEvent {
            endpoint: None,
            kind: HealthEventKind::PanicEntered {
                healthy: 1,
                eligible: 4,
            },
            ..event
        };
        let v: serde_json::Value = serde_json::from_str(&panic.to_json_line()).unwrap();
        assert!(v.get("endpoint").is_none());
        assert_eq!(
            (v["healthy"].as_u64(), v["eligible"].as_u64()),
            (Some(1), Some(4))
        );
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_LEN);
        let cut = short_reason(&long);
        assert!(cut.len() <= MAX_REASON_LEN && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(short_reason("short"), "short");
    }

    fn event(seq: u64) -> HealthEvent {
        HealthEvent {
            seq,
            time: SystemTime::now(),
            service: "s".into(),
            endpoint: None,
            kind: HealthEventKind::Added,
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let queue = EventQueue::new(3);
        let events = HealthEvents::new(queue.clone());
        for seq in 1..=5 {
            assert!(queue.push(&event(seq)));
        }
        assert_eq!(events.lost(), 2);
        let seqs: Vec<u64> = events.drain().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        drop(events);
        assert!(!queue.push(&event(6)), "an abandoned queue is forgotten");
    }

    #[test]
    fn a_closed_queue_ends_the_subscription_after_its_events() {
        let queue = EventQueue::new(8);
        let events = HealthEvents::new(queue.clone());
        queue.push(&event(1));
        queue.close();
        assert_eq!(
            events.next_timeout(Duration::from_secs(5)).map(|e| e.seq),
            Some(1)
        );
        assert_eq!(events.next_timeout(Duration::from_secs(5)), None);
    }
}
