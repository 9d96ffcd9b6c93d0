//! Bounded loads' check-and-take (`View::try_lease`): in a one-shard arena the check of an
//! endpoint's load against the cap and the increment are one compare-and-swap, so two
//! threads that both see the last place under the cap cannot both take it. The cap holds
//! under every interleaving, and a thread that loses the place sees why (the load).

#[cfg(tai_loadbalancer_loom)]
mod model {
    use loom::sync::Arc;
    use tai_loadbalancer::__loom::SlotArena;

    #[test]
    fn two_threads_cannot_both_take_the_last_place_under_the_cap() {
        loom::model(|| {
            let mut arena = SlotArena::new();
            let a = arena.alloc(1);
            let view = Arc::new(arena.view(&[a]));
            // One request already in flight; the cap is 2: one place left.
            let standing = view.lease(0);
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let view = view.clone();
                    loom::thread::spawn(move || {
                        let taken = view.try_lease(0, 2);
                        // While this thread holds what it took, the cap holds.
                        assert!(view.in_flight(0) <= 2, "the cap was passed");
                        taken // held until both racers are done
                    })
                })
                .collect();
            let taken: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
            let winners = taken.iter().filter(|t| t.is_ok()).count();
            assert_eq!(winners, 1, "exactly one thread takes the last place");
            for t in &taken {
                if let Err(load) = t {
                    assert_eq!(*load, 2, "the loser saw the place taken");
                }
            }
            drop(taken);
            drop(standing);
            assert_eq!(view.in_flight(0), 0, "every lease ended");
        });
    }

    #[test]
    fn a_place_freed_during_the_race_can_be_taken() {
        loom::model(|| {
            let mut arena = SlotArena::new();
            let a = arena.alloc(1);
            let view = Arc::new(arena.view(&[a]));
            let standing = view.lease(0);
            let taker = {
                let view = view.clone();
                loom::thread::spawn(move || view.try_lease(0, 1).map(|lease| lease.record()))
            };
            drop(standing); // the full endpoint's request ends while the taker looks
            match taker.join().unwrap() {
                Ok(record) => assert_eq!(record, 1),
                Err(load) => assert_eq!(load, 1, "a refusal reports the load it saw"),
            }
            assert_eq!(view.in_flight(0), 0);
        });
    }
}
