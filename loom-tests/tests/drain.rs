//! Drain completion vs the last in-flight guard: a drainer that sees the endpoint's in-flight
//! count reach 0 also sees everything the finished request recorded (its outcome), in every
//! interleaving; and new picks never return the draining endpoint.

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
    fn last_guard_release_vs_drain_completion() {
        loom::model(|| {
            let registry = Arc::new(ServiceRegistry::new());
            block_on(registry.register_batch("svc", vec![ep(1), ep(2)])).unwrap();
            let config = LoadBalancerConfig {
                panic_threshold_percent: 0,
                ..Default::default()
            };
            let lb = Arc::new(
                block_on(IntegratedLoadBalancer::new(
                    registry,
                    LoadBalancingStrategy::RoundRobin,
                    config,
                ))
                .unwrap(),
            );
            // The request in flight on endpoint 1 (round robin's first pick).
            let pick = lb.pick("svc").unwrap();
            assert_eq!(pick.address().port(), 1);
            let worker = loom::thread::spawn(move || pick.success());
            // Drain: no new picks on endpoint 1 from here on...
            block_on(lb.mark_down("svc", &ep(1))).unwrap();
            assert_eq!(lb.pick("svc").unwrap().address().port(), 2);
            // ...and once its in-flight count reads 0, the outcome is visible.
            let addr = ep(1).address;
            while lb.in_flight("svc", addr) != Some(0) {
                loom::thread::yield_now();
            }
            let m = lb.metrics();
            let e = m.services[0].endpoint(addr).unwrap();
            assert_eq!((e.in_flight, e.successes), (0, 1));
            worker.join().unwrap();
        });
    }
}
