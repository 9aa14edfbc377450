//! Code generated from `proto/` by `build.rs`.

#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]

tonic::include_proto!("krisp.ingest.v1");

/// The encoded descriptor set of every file under `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/krisp_ingest_descriptor.bin"));
