//! The counter arena's reclamation: a slot is reused for another endpoint only once no view
//! (routing table) contains it and nothing is in flight on it. A lease taken through a view
//! keeps reading its own endpoint's record, whatever the control plane does meanwhile; the
//! control plane never recycles too early (the picker would then read the next endpoint's
//! record) and never waits for ever (the slot is recycled once the lease ends).

#[cfg(tai_loadbalancer_loom)]
mod model {
    use loom::sync::Arc;
    use tai_loadbalancer::__loom::SlotArena;
    use tai_loadbalancer::{
        Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
        ServiceRegistry,
    };

    #[test]
    fn a_slot_is_not_reused_while_a_lease_of_its_previous_owner_is_alive() {
        loom::model(|| {
            let mut arena = SlotArena::new();
            let a = arena.alloc(1);
            let view = Arc::new(arena.view(&[a]));
            let picker = {
                let view = view.clone();
                loom::thread::spawn(move || {
                    let lease = view.lease(0);
                    drop(view); // the picker's table is gone; the lease lives on
                    let record = lease.record();
                    loom::thread::yield_now();
                    assert_eq!(lease.record(), record, "the record changed under a live lease");
                    record
                })
            };
            // The control plane: the endpoint leaves, its table is replaced, and the slot is
            // reused by a new endpoint as soon as the arena allows.
            arena.retire(a);
            drop(view);
            let early = arena.recycle();
            if !early.is_empty() {
                // Only possible once the picker's view and lease are gone.
                assert_eq!(early, vec![1]);
                let b = arena.alloc(2);
                assert_eq!(b, a, "a freed slot is reused");
            }
            assert_eq!(picker.join().unwrap(), 1, "the picker read its own endpoint");
            if early.is_empty() {
                assert_eq!(arena.recycle(), vec![1], "recycled once the lease ended");
            }
        });
    }

    #[test]
    fn a_retire_racing_a_pick_never_hands_out_a_reused_slot() {
        loom::model(|| {
            let mut arena = SlotArena::new();
            let a = arena.alloc(1);
            let b = arena.alloc(2);
            // The published table: a cell the picker loads from (an Arc, as in the balancer).
            let table = Arc::new(loom::sync::RwLock::new(Arc::new(arena.view(&[a, b]))));
            let picker = {
                let table = table.clone();
                loom::thread::spawn(move || {
                    let view = table.read().unwrap().clone();
                    let lease = view.lease(0);
                    drop(view);
                    lease.record()
                })
            };
            // The control plane publishes a table without `a`, retires it, keeps the old
            // table until nothing else holds it, then recycles and reuses.
            let old = std::mem::replace(&mut *table.write().unwrap(), Arc::new(arena.view(&[b])));
            arena.retire(a);
            let old_unread = Arc::strong_count(&old) == 1;
            drop(old);
            let freed = arena.recycle();
            if !freed.is_empty() {
                assert!(old_unread, "recycled while a picker still held the old table");
                arena.alloc(3);
            }
            let record = picker.join().unwrap();
            assert!(
                record == 1 || record == 2,
                "the picker leased a reused slot: {record}"
            );
        });
    }

    fn ep(port: u16, generation: &str) -> Endpoint {
        Endpoint::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Some(EndpointMetadata::new().with_tag("generation", generation)),
        )
    }

    #[test]
    fn a_pick_keeps_its_endpoint_while_the_registry_replaces_it() {
        loom::model(|| {
            let registry = std::sync::Arc::new(ServiceRegistry::new());
            loom::future::block_on(registry.register("svc", ep(1, "old"))).unwrap();
            let lb = std::sync::Arc::new(
                loom::future::block_on(IntegratedLoadBalancer::new(
                    registry.clone(),
                    LoadBalancingStrategy::RoundRobin,
                    LoadBalancerConfig::default(),
                ))
                .unwrap(),
            );
            let picker = {
                let lb = lb.clone();
                loom::thread::spawn(move || {
                    let Ok(pick) = lb.pick("svc") else { return };
                    // Whatever slot the pick holds belongs to the endpoint it was picked as.
                    assert_eq!(pick.endpoint().address, pick.address());
                    let generation = pick.endpoint().tag("generation").map(str::to_owned);
                    loom::thread::yield_now();
                    assert_eq!(pick.endpoint().tag("generation").map(str::to_owned), generation);
                })
            };
            // The endpoint leaves and another one takes its place (its slot, once free).
            loom::future::block_on(registry.deregister("svc", &ep(1, "old"))).unwrap();
            loom::future::block_on(registry.register("svc", ep(2, "new"))).unwrap();
            picker.join().unwrap();
            assert_eq!(lb.metrics().in_flight, 0);
            loom::future::block_on(lb.stop()).unwrap();
        });
    }
}
