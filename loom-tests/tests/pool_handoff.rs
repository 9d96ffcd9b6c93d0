//! The connection pool's slot protocol (acquire, release, waiter handoff, cancellation,
//! failed connects) in every interleaving: no lost wakeup (a waiter whose connection or slot
//! was handed over always wakes), no lost connection or slot (a cancelled grant is passed
//! on), and `open` never exceeds `max`.

#[cfg(tai_loadbalancer_loom)]
mod model {
    use std::sync::Arc;

    use loom::future::block_on;
    use tai_loadbalancer::__loom::{PoolAcquired, PoolSlots};

    /// A holder releases while a newcomer acquires: the newcomer gets the connection, from
    /// the idle stack or handed over while it waits, and is always woken.
    #[test]
    fn release_hands_over_to_a_waiter_without_lost_wakeup() {
        loom::model(|| {
            let slots = Arc::new(PoolSlots::new(1, 4));
            assert_eq!(slots.acquire(), PoolAcquired::Create);
            slots.connected();
            let newcomer = {
                let slots = slots.clone();
                loom::thread::spawn(move || match slots.acquire() {
                    PoolAcquired::Idle(conn) => conn,
                    PoolAcquired::Wait(ticket) => {
                        block_on(slots.wait(ticket)).unwrap().expect("a connection")
                    }
                    other => panic!("unexpected {other:?}"),
                })
            };
            slots.release(7, true);
            assert_eq!(newcomer.join().unwrap(), 7);
            let (open, idle, connecting, waiters) = slots.counts();
            assert_eq!((open, idle, connecting, waiters), (1, 0, 0, 0));
        });
    }

    /// A waiter gives up while the holder releases: whichever wins, the connection ends up
    /// idle (not lost) and `open` stays 1.
    #[test]
    fn a_cancelled_waiter_never_loses_the_connection() {
        loom::model(|| {
            let slots = Arc::new(PoolSlots::new(1, 4));
            assert_eq!(slots.acquire(), PoolAcquired::Create);
            slots.connected();
            let PoolAcquired::Wait(ticket) = slots.acquire() else {
                panic!("must queue")
            };
            let quitter = {
                let slots = slots.clone();
                loom::thread::spawn(move || slots.cancel(ticket))
            };
            slots.release(7, true);
            quitter.join().unwrap();
            assert_eq!(slots.counts(), (1, 1, 0, 0));
            assert_eq!(slots.acquire(), PoolAcquired::Idle(7));
        });
    }

    /// A connect fails while another caller waits: the waiter is woken with the slot and
    /// connects itself; two racing acquirers never both create beyond `max`.
    #[test]
    fn a_failed_connect_passes_its_slot_and_max_holds() {
        loom::model(|| {
            let slots = Arc::new(PoolSlots::new(1, 4));
            let racer = {
                let slots = slots.clone();
                loom::thread::spawn(move || slots.acquire())
            };
            let mine = slots.acquire();
            let theirs = racer.join().unwrap();
            let (creator_is_me, ticket) = match (&mine, &theirs) {
                (PoolAcquired::Create, PoolAcquired::Wait(t)) => (true, *t),
                (PoolAcquired::Wait(t), PoolAcquired::Create) => (false, *t),
                other => panic!("exactly one may create with max 1: {other:?}"),
            };
            let _ = creator_is_me;
            assert_eq!(slots.counts().0, 1);
            let waiter = {
                let slots = slots.clone();
                loom::thread::spawn(move || {
                    let grant = block_on(slots.wait(ticket)).unwrap();
                    assert_eq!(grant, None, "a slot, not a connection");
                    slots.connected();
                })
            };
            slots.connect_failed();
            waiter.join().unwrap();
            assert_eq!(slots.counts(), (1, 0, 0, 0));
        });
    }
}
