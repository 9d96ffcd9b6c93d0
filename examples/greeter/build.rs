//! Generates the greeter's messages, client and server with `tonic-prost-build`, using the
//! `protoc` binary shipped by `protoc-bin-vendored` unless `PROTOC` names another: a fresh
//! machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/greeter.proto");
    tonic_prost_build::configure().compile_protos(&["proto/greeter.proto"], &["proto"])?;
    Ok(())
}
