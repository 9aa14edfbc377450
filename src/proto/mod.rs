//! The contract: code generated from `proto/` by `build.rs`, and the conversions of
//! time between protobuf and chrono that servers and clients of it share.

mod time;

pub use generated::*;
pub use time::{to_duration, to_timestamp};

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]
mod generated {
    tonic::include_proto!("krisp.ingest.v1");
}

/// The encoded descriptor set of every file under `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/krisp_ingest_descriptor.bin"));
