//! The read-your-writes handoff through the control-plane thread: a registry call queues the
//! change, the control thread publishes the new table and only then acknowledges, so a pick
//! that starts after the call returned never sees the removed endpoint; and the ack never
//! gets lost (a lost wakeup would deadlock the model, which loom reports).

#[cfg(tai_loadbalancer_loom)]
mod model {
    use std::sync::Arc;

    use loom::future::block_on;
    use tai_loadbalancer::__loom::HandoffQueue;
    use tai_loadbalancer::{
        Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
    };

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    #[test]
    fn deregistered_endpoint_is_never_picked_after_the_call_returns() {
        loom::model(|| {
            let registry = Arc::new(ServiceRegistry::new());
            block_on(registry.register_batch("svc", vec![ep(1), ep(2)])).unwrap();
            let lb = block_on(IntegratedLoadBalancer::new(
                registry.clone(),
                LoadBalancingStrategy::RoundRobin,
                LoadBalancerConfig::default(),
            ))
            .unwrap();
            block_on(lb.start()).unwrap(); // the control plane is now a loom thread
            block_on(registry.deregister("svc", &ep(1))).unwrap();
            for _ in 0..2 {
                assert_eq!(lb.pick("svc").unwrap().address().port(), 2);
            }
            block_on(lb.stop()).unwrap();
        });
    }

    #[test]
    fn ack_is_never_lost() {
        loom::model(|| {
            let queue = Arc::new(HandoffQueue::new());
            let consumer = {
                let queue = queue.clone();
                loom::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while queue.wait_pending() {
                        seen.extend(queue.take(8));
                    }
                    seen
                })
            };
            assert!(block_on(queue.push(1)));
            assert!(block_on(queue.push(2)));
            queue.close();
            assert_eq!(consumer.join().unwrap(), vec![1, 2]);
        });
    }
}
