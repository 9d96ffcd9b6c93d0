//! In-flight guards balance across republication and removal: a guard taken before its
//! endpoint is deregistered still ends cleanly, the count returns to 0, the endpoint's
//! selection stays in the service totals, and every pin is freed (loom checks its `Arc`s).

#[cfg(tai_loadbalancer_loom)]
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
    fn guard_balances_across_republish_and_removal() {
        loom::model(|| {
            let registry = Arc::new(ServiceRegistry::new());
            block_on(registry.register("svc", ep(1))).unwrap();
            let lb = Arc::new(
                block_on(IntegratedLoadBalancer::new(
                    registry.clone(),
                    LoadBalancingStrategy::LeastConnections,
                    LoadBalancerConfig::default(),
                ))
                .unwrap(),
            );
            let lb2 = lb.clone();
            let picker = loom::thread::spawn(move || match lb2.pick("svc") {
                Ok(pick) => {
                    assert_eq!(pick.address().port(), 1);
                    assert_eq!(pick.in_flight(), 1);
                    pick.success();
                    true
                }
                Err(tai_loadbalancer::Error::NoEndpoints { .. }) => false,
                Err(e) => panic!("{e}"),
            });
            block_on(registry.deregister("svc", &ep(1))).unwrap();
            let picked = picker.join().unwrap();
            let m = lb.metrics();
            assert_eq!(m.in_flight, 0);
            assert_eq!(m.total_requests, u64::from(picked));
            assert_eq!(m.successful_requests, u64::from(picked));
            assert!(m.services[0].endpoints.is_empty());
            block_on(lb.stop()).unwrap();
        });
    }
}
