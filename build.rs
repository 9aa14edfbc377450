//! Compiles `proto/` into the service trait with a pure-Rust protobuf compiler (protox),
//! so the build needs no system `protoc`, and writes the descriptor set that server
//! reflection serves. The messages are the client crate's (`krisp_ingest_client::proto`):
//! one set of types for the server, the command-line clients and the benchmark.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/krisp/ingest/v1/resources.proto",
    "proto/krisp/ingest/v1/ingest_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("krisp_ingest_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".krisp.ingest.v1", "::krisp_ingest_client::proto")
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
