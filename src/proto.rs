//! The contract: the messages and the client generated from `proto/` (the client
//! crate's, with the conversions of time between chrono and protobuf), and the service
//! trait the server implements.

pub use generated::*;
pub use krisp_ingest_client::proto::*;

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
