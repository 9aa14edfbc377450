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

use sqlx::PgPool;
use tokio::sync::RwLockReadGuard;

use crate::helpers::{TestApp, spawn_app_on};

/// The real server over the database the tests share, with the hold that keeps worker
/// restarts off until it is dropped (bind it for the whole test).
pub async fn shared_app(
    cluster: &cluster::Cluster,
) -> (RwLockReadGuard<'static, ()>, PgPool, TestApp) {
    let shared = cluster.shared().await;
    let db = cluster.shared_database().await;
    let app = spawn_app_on(db.clone()).await;
    (shared, db, app)
}
