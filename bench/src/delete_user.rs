//! delete-user: DeleteUser of a user with S streams of R rows, in a sentiments table that
//! already holds N rows of other users spread over several daily partitions. Its time
//! must depend on the user's rows, not on N (migrations/0004).
//!
//! Also the price of that schema for stream ingest: `copy` rows/s with and without the
//! stream keys that 0004 dropped, measured in alternating rounds.

use std::time::{Duration, Instant};

use anyhow::Context;
use krisp_ingest::proto::{self, ingest_service_client::IngestServiceClient};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    fixtures::{Fixtures, settle},
    scenarios::bench_copy,
    server::Server,
};

/// Rows, users and spread of the other users' data.
pub struct Shape {
    pub table_rows: u64,
    pub streams: u64,
    pub stream_rows: u64,
}

/// Loads `shape.table_rows` rows of other users: users of 10 streams each, over the
/// last 3 days (so over several daily partitions), written as the service writes them.
async fn fill(pool: &PgPool, shape: &Shape) -> anyhow::Result<()> {
    let per_user: u64 = 40_000;
    let users = shape.table_rows.div_ceil(per_user).max(1);
    let per_stream = (shape.table_rows / users / 10).max(1);
    let statements = [
        "INSERT INTO sessions (id, session_type, started_at) \
         VALUES ('00000000-0000-0000-0000-00000000f111', 'call', now() - interval '5 days')",
        "INSERT INTO user_external_ids (external_id, user_id) \
         SELECT 'filler-' || u, md5('filler-user-' || u)::uuid FROM generate_series(1, $1) u",
        "INSERT INTO users (id, external_id) \
         SELECT md5('filler-user-' || u)::uuid, 'filler-' || u FROM generate_series(1, $1) u",
        "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
         SELECT md5('filler-p-' || u)::uuid, md5('filler-user-' || u)::uuid, \
                '00000000-0000-0000-0000-00000000f111', 'UTC', now() - interval '4 days' \
         FROM generate_series(1, $1) u",
        "INSERT INTO ingest_streams \
             (user_id, stream_id, participation_id, kind, items_stored, committed_at) \
         SELECT md5('filler-user-' || u)::uuid, md5('filler-s-' || u || '-' || s)::uuid, \
                md5('filler-p-' || u)::uuid, 'sentiments', $2, now() \
         FROM generate_series(1, $1) u, generate_series(1, 10) s",
        // Row k of all lies k/N of the way through the last 3 days.
        "INSERT INTO sentiments \
             (id, user_id, participation_id, stream_id, started_at, ended_at, label, score) \
         SELECT gen_random_uuid(), md5('filler-user-' || u)::uuid, md5('filler-p-' || u)::uuid, \
                md5('filler-s-' || u || '-' || s)::uuid, t, t + interval '100 ms', \
                'neutral', 0.25 \
         FROM generate_series(1, $1) u, generate_series(1, 10) s, generate_series(1, $2) r, \
              LATERAL (SELECT now() - interval '3 days' + interval '259000 seconds' \
                       * (((u - 1) * 10 + s - 1) * $2 + r) / ($1 * 10 * $2) AS t) x",
    ];
    for statement in statements {
        sqlx::query(statement)
            .bind(i64::try_from(users)?)
            .bind(i64::try_from(per_stream)?)
            .execute(pool)
            .await
            .with_context(|| format!("filling: {statement}"))?;
    }
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// A new user with one participation and `streams` committed streams of `rows` rows.
async fn doomed_user(pool: &PgPool, shape: &Shape) -> anyhow::Result<(Uuid, Uuid)> {
    let user = Uuid::now_v7();
    let participation = Uuid::now_v7();
    let statements = [
        "INSERT INTO user_external_ids (external_id, user_id) VALUES ($1::text, $1)",
        "INSERT INTO users (id, external_id) VALUES ($1, $1::text)",
        "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
         VALUES ($2, $1, '00000000-0000-0000-0000-00000000f111', 'UTC', \
                 now() - interval '4 days')",
        "INSERT INTO ingest_streams \
             (user_id, stream_id, participation_id, kind, items_stored, committed_at) \
         SELECT $1, md5($1::text || s)::uuid, $2, 'sentiments', $4, now() \
         FROM generate_series(1, $3) s",
        "INSERT INTO sentiments \
             (id, user_id, participation_id, stream_id, started_at, ended_at, label, score) \
         SELECT gen_random_uuid(), $1, $2, md5($1::text || s)::uuid, t, \
                t + interval '100 ms', 'positive', 0.5 \
         FROM generate_series(1, $3) s, generate_series(1, $4) r, \
              LATERAL (SELECT now() - interval '2 days' + (s * $4 + r) * interval '100 ms' AS t) x",
    ];
    for statement in statements {
        sqlx::query(statement)
            .bind(user)
            .bind(participation)
            .bind(i64::try_from(shape.streams)?)
            .bind(i64::try_from(shape.stream_rows)?)
            .execute(pool)
            .await
            .with_context(|| format!("the user to delete: {statement}"))?;
    }
    Ok((user, participation))
}

/// Seconds each DeleteUser took, one per round.
pub async fn bench_delete(
    fx: &Fixtures,
    server: &Server,
    shape: &Shape,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let started = Instant::now();
    fill(&fx.pool, shape).await?;
    eprintln!(
        "delete-user: {} rows of other users loaded in {:.1} s",
        shape.table_rows,
        started.elapsed().as_secs_f64()
    );
    let mut client = IngestServiceClient::new(server.channel().await?);
    let mut times = Vec::new();
    for round in 1..=rounds {
        let (user, participation) = doomed_user(&fx.pool, shape).await?;
        sqlx::query("CHECKPOINT").execute(&fx.pool).await?;
        let started = Instant::now();
        let deleted = client
            .delete_user(proto::DeleteUserRequest {
                user_id: user.to_string(),
            })
            .await?
            .into_inner();
        let elapsed = started.elapsed();
        anyhow::ensure!(deleted.participations_deleted == 1, "{deleted:?}");
        let left: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sentiments WHERE user_id = $1 AND participation_id = $2)",
        )
        .bind(user)
        .bind(participation)
        .fetch_one(&fx.pool)
        .await?;
        anyhow::ensure!(!left, "rows of the deleted user are left");
        eprintln!("round {round}: delete-user {:.3} s", elapsed.as_secs_f64());
        times.push(elapsed);
    }
    times.sort();
    Ok(times)
}

/// Median rows/s of `copy` (one session, `rows` rows) without and with the stream keys
/// that migration 0004 dropped, in alternating rounds on the same database.
pub async fn bench_stream_keys(
    fx: &std::sync::Arc<Fixtures>,
    rows: u64,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        settle(&fx.pool).await?;
        without.push(bench_copy(fx, rows, 1).await?.rows_per_second());
        // The tables are empty now: adding the keys back validates nothing.
        settle(&fx.pool).await?;
        for table in ["sentiments", "events"] {
            sqlx::query(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {table}_stream_fkey \
                 FOREIGN KEY (user_id, stream_id) REFERENCES ingest_streams (user_id, stream_id) \
                 ON DELETE CASCADE"
            ))
            .execute(&fx.pool)
            .await?;
        }
        with.push(bench_copy(fx, rows, 1).await?.rows_per_second());
        for table in ["sentiments", "events"] {
            sqlx::query(&format!(
                "ALTER TABLE {table} DROP CONSTRAINT {table}_stream_fkey"
            ))
            .execute(&fx.pool)
            .await?;
        }
    }
    settle(&fx.pool).await?;
    Ok((median(without), median(with)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
