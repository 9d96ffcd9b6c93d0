//! Configuration parsing: any text either parses into a configuration that validates and
//! round-trips through TOML unchanged, or is refused with a typed error. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::{Error, LoadBalancerConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match LoadBalancerConfig::from_toml_str(text) {
        Ok(config) => {
            config.validate().expect("a parsed config validates");
            let again =
                LoadBalancerConfig::from_toml_str(&config.to_toml_string()).expect("round trip parses");
            assert_eq!(again, config);
        }
        Err(Error::ConfigParse { message, .. }) => assert!(!message.is_empty()),
        Err(Error::InvalidConfig { field, .. }) => assert!(!field.is_empty()),
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
