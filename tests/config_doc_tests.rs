//! CONFIGURATION.md's "all defaults" example is what `LoadBalancerConfig::default()` is.

use tai_loadbalancer::LoadBalancerConfig;

#[test]
fn the_documented_full_example_is_the_default() {
    let doc = include_str!("../CONFIGURATION.md");
    let section = doc
        .split("## Full example (all defaults)")
        .nth(1)
        .expect("section present");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a toml block");
    let parsed = LoadBalancerConfig::from_toml_str(toml).unwrap();
    assert_eq!(parsed, LoadBalancerConfig::default());
}
