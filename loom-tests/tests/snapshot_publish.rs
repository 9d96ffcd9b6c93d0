//! A reader sees one whole routing snapshot: a batch that adds two endpoints is seen as both
//! or neither, never one of them (no torn view), whatever the interleaving.

#[cfg(tai_loadbalancer_loom)] // a module, not #![cfg]: see crossbeam-epoch/tests/loom.rs
mod model {
    use std::sync::Arc;

    use loom::future::block_on;
    use tai_loadbalancer::{
        Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
    };

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    #[test]
    fn batch_is_seen_whole() {
        loom::model(|| {
            let registry = Arc::new(ServiceRegistry::new());
            block_on(registry.register("svc", ep(1))).unwrap();
            let lb = Arc::new(
                block_on(IntegratedLoadBalancer::new(
                    registry.clone(),
                    LoadBalancingStrategy::RoundRobin,
                    LoadBalancerConfig::default(),
                ))
                .unwrap(),
            );
            let handle = lb.service("svc").unwrap();
            let reader = loom::thread::spawn(move || {
                let seen: Vec<u16> = handle.endpoints().iter().map(|(e, _)| e.address.port()).collect();
                assert!(seen == [1] || seen == [1, 2, 3], "torn view: {seen:?}");
                let picked = handle.pick().unwrap().address().port();
                assert!([1, 2, 3].contains(&picked));
            });
            block_on(registry.register_batch("svc", vec![ep(2), ep(3)])).unwrap();
            reader.join().unwrap();
            // Read-your-writes on the writer's side.
            let after: Vec<u16> = lb
                .service("svc")
                .unwrap()
                .endpoints()
                .iter()
                .map(|(e, _)| e.address.port())
                .collect();
            assert_eq!(after, [1, 2, 3]);
        });
    }
}
