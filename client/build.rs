//! Compiles the contract (`../proto`) into the messages and the client, with a pure-Rust
//! protobuf compiler (protox): the build needs no system `protoc`. The server crate
//! generates only its service trait and uses these messages.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "krisp/ingest/v1/resources.proto",
    "krisp/ingest/v1/ingest_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(PROTOS, [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
