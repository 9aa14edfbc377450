//! Every RPC against a real Citus cluster (a coordinator and two workers on loopback), set
//! up as docs/SCALING.md says, with rows checked on the coordinator. The planner decides
//! what runs: a statement Citus cannot plan fails here, whatever its documentation
//! suggests. `cargo test citus::` runs this part alone.

mod binary;
pub mod cluster;
mod faults;
mod keys;
mod partitions;
mod rpcs;
mod scale_out;
mod schema;
mod shards;
