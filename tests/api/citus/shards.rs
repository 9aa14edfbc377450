//! What one call of each RPC costs the workers: the statements they run on shards,
//! counted from their logs, with 32 and with 128 shards per distributed table. A call
//! that runs on one shard group costs the same with both; one that fans out to every
//! shard costs four times as much with 128.

use std::collections::BTreeMap;

use krisp_ingest::proto;
use uuid::Uuid;

use crate::{
    citus::cluster::Cluster,
    helpers::{at, current_database, leave, sentiments, spawn_app_on, t0},
    live::{FeedCall, append, close},
    require_citus,
};

/// Statements on the workers per RPC, for a database of `shards` shards per table.
async fn statements_per_rpc(cluster: &Cluster, shards: u32) -> BTreeMap<&'static str, usize> {
    let db = cluster.database_with_shards(shards).await;
    let name = current_database(&db).await;
    let app = spawn_app_on(db.clone()).await;
    let mut client = app.client.clone();
    app.upsert_timezone("UTC", 0).await;
    // Warm up: the first calls of a server open its connections and prepare statements.
    let warm = app.participation().await;
    app.stream_sentiments(&warm.id, vec![sentiments(0, 10)])
        .await;

    let mut counts = BTreeMap::new();
    let user = app
        .create_user(&format!("counted-{}", Uuid::new_v4()))
        .await;
    let session = app.create_session(t0()).await;
    let participation = app.join(&user, &session, t0()).await.unwrap();
    let id = participation.id.clone();

    macro_rules! count {
        ($name:literal, $work:expr) => {
            let statements = cluster
                .worker_statements(&name, async {
                    $work;
                })
                .await;
            counts.insert($name, statements.len());
        };
    }
    count!("CreateUser", {
        app.create_user(&format!("another-{}", Uuid::new_v4()))
            .await;
    });
    count!("GetUser", {
        client
            .get_user(proto::GetUserRequest {
                user_id: user.id.clone(),
            })
            .await
            .unwrap();
    });
    count!("CreateSession", {
        app.create_session(t0()).await;
    });
    let other = app.create_user(&format!("joiner-{}", Uuid::new_v4())).await;
    count!("JoinSession", {
        app.join(&other, &session, t0()).await.unwrap();
    });
    count!("GetParticipation", {
        client
            .get_participation(proto::GetParticipationRequest {
                participation_id: id.clone(),
            })
            .await
            .unwrap();
    });
    count!("RecordSentiment", {
        client
            .record_sentiment(proto::RecordSentimentRequest {
                participation_id: id.clone(),
                sentiment: sentiments(500, 1).pop(),
                request_id: Uuid::new_v4().to_string(),
            })
            .await
            .unwrap();
    });
    count!("StreamSentiments (100 items)", {
        app.stream_sentiments(&id, vec![sentiments(1_000, 100)])
            .await;
    });
    count!("LiveFeed (open, 2 appends, close)", {
        let feed_id = Uuid::new_v4().to_string();
        let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &id).await;
        call.ack(append(1, 5)).await;
        call.ack(append(6, 5)).await;
        call.send(close(10)).await.unwrap();
    });
    count!("GetTimeline", {
        let mut stream = client
            .get_timeline(proto::GetTimelineRequest {
                participation_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
    });
    count!("LeaveSession", {
        client.leave_session(leave(&id, 3_000, 60)).await.unwrap();
    });
    count!("EndSession", {
        client
            .end_session(proto::EndSessionRequest {
                session_id: session.id.clone(),
                ended_at: at(t0(), 4_000),
            })
            .await
            .unwrap();
    });
    count!("DeleteUser", {
        client
            .delete_user(proto::DeleteUserRequest {
                user_id: user.id.clone(),
            })
            .await
            .unwrap();
    });
    counts
}

#[tokio::test]
async fn the_statements_of_each_rpc_on_the_workers_by_shard_count() {
    let cluster = require_citus!();
    let _shared = cluster.shared().await;
    let few = statements_per_rpc(cluster, 32).await;
    let many = statements_per_rpc(cluster, 128).await;
    eprintln!("| RPC | statements on the workers, 32 shards | 128 shards |");
    eprintln!("| --- | ---: | ---: |");
    for (rpc, count) in &few {
        eprintln!("| {rpc} | {count} | {} |", many[rpc]);
    }
    // Every call runs on one user's shard group, and JoinSession on its session's shard
    // as well: it costs the same whatever the number of shards, and no more than its
    // own few statements. A participation's user comes from the server's routes
    // (`storage::routes`), learned when it joined.
    for (rpc, count) in &few {
        assert_eq!(*count, many[rpc], "{rpc}: {few:?} against {many:?}");
    }
    for (rpc, most) in [
        ("GetUser", 1),
        ("GetParticipation", 1),
        ("GetTimeline", 2),
        ("JoinSession", 3),
        ("CreateSession", 1),
        ("EndSession", 2),
        ("CreateUser", 3),
        ("DeleteUser", 3),
        ("RecordSentiment", 3),
        ("LeaveSession", 4),
        ("StreamSentiments (100 items)", 4),
        ("LiveFeed (open, 2 appends, close)", 11),
    ] {
        assert!(
            few[rpc] <= most,
            "{rpc}: {} statements, {most} expected",
            few[rpc]
        );
    }
}
