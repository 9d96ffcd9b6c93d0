//! The seed README's Quick Start, runnable: `cargo run --example quickstart`.
//!
//! Two endpoints on loopback (nothing needs to listen there: the balancer only chooses), a
//! round-robin balancer, one pick.

use std::sync::Arc;

use tai_loadbalancer::{
    Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Create service registry
    let registry = Arc::new(ServiceRegistry::new());

    // Register endpoints
    registry
        .register(
            "api-service".to_string(),
            Endpoint::new("127.0.0.1:5001".parse()?, None),
        )
        .await?;

    registry
        .register(
            "api-service".to_string(),
            Endpoint::new("127.0.0.1:5002".parse()?, None),
        )
        .await?;

    // Create load balancer
    let lb = IntegratedLoadBalancer::new(
        registry,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await?;

    // Start background processes (health checks, rebalancing)
    lb.start().await?;

    // Get next endpoint
    let endpoint = lb.next_endpoint("api-service").await?;
    println!("Selected endpoint: {}", endpoint.address);

    // Cleanup
    lb.stop().await?;

    Ok(())
}
