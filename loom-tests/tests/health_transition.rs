//! A health transition published while picks run: a pick made from the table before the
//! transition may return the endpoint; one made from the table after it never does; and once
//! the transition call returned, every new pick sees it.

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
    fn transition_is_seen_whole_and_in_order() {
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
            let before = lb.metrics().services[0].table_version;
            let picker = {
                let lb = lb.clone();
                loom::thread::spawn(move || {
                    let pick = lb.pick("svc").unwrap();
                    // From the table after the transition, endpoint 1 is never returned.
                    if pick.table_version() > before {
                        assert_eq!(pick.address().port(), 2);
                    }
                    pick.success();
                })
            };
            block_on(lb.mark_down("svc", &ep(1))).unwrap();
            for _ in 0..2 {
                assert_eq!(lb.pick("svc").unwrap().address().port(), 2);
            }
            picker.join().unwrap();
            assert_eq!(lb.metrics().in_flight, 0);
        });
    }
}
