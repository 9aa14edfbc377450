//! Scale-out while ingesting: a fourth node joins and Citus moves shards onto it
//! (`citus_rebalance_start`, online, by logical replication) while client streams, live
//! feeds and unary records run. Nothing acknowledged is lost, nothing is stored twice,
//! and a call that meets a moving shard gets at most a status that says retry.

use crate::{
    citus::faults::{ingest_through, participations},
    helpers::{current_database, spawn_app_on},
    require_citus,
};

#[tokio::test]
async fn shards_move_to_a_new_node_while_ingest_goes_on() {
    let cluster = require_citus!();
    let _alone = cluster.exclusive().await;
    // Eight shards per table: four shard groups a worker, some of which move; each
    // group holds every table and its day partitions.
    let db = cluster.database_with_shards(8).await;
    let name = current_database(&db).await;
    let app = spawn_app_on(db.clone()).await;
    app.upsert_timezone("UTC", 0).await;
    // Users on both workers, so that some of their shards move.
    let mut ids = participations(&app, &db, cluster.port(1), 3, 0).await;
    ids.extend(participations(&app, &db, cluster.port(2), 3, 0).await);
    let mut moved = 0;
    let scale_out = async { moved = cluster.scale_out(&name).await };
    ingest_through(&app, &db, &ids, scale_out).await;
    assert!(moved > 0, "no shard moved to the new node");
    eprintln!("shard placements moved to the new node: {moved}");
}
