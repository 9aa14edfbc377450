//! The benchmark's data (users, a session, participations, the rows to load), and the
//! reset between measurements.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use krisp_ingest::{
    domain::{ItemClock, NewSentiment, Participation, SentimentLabel, TimezoneCode},
    proto::{self, to_timestamp},
    service::{IngestService, StreamLimits},
    storage::{SpoolSettings, Spooler, Storage},
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::probes::Cpu;

/// One line of the results.
pub(crate) struct Measurement {
    pub(crate) method: String,
    pub(crate) concurrency: usize,
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latency: Option<(Duration, Duration)>,
    pub(crate) cpu: Cpu,
}

impl Measurement {
    pub(crate) fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The benchmark's data: each measurement writes to participations of its own.
pub(crate) struct Fixtures {
    pub(crate) pool: PgPool,
    /// The service's use cases over `pool`, for `copy`.
    pub(crate) service: IngestService,
    pub(crate) session_id: Uuid,
    pub(crate) base: DateTime<Utc>,
}

impl Fixtures {
    /// `span_rows`: the most rows one measurement writes for one participation; they end
    /// before now, since the server refuses items dated ahead of its clock.
    pub(crate) async fn new(pool: PgPool, span_rows: u64) -> anyhow::Result<Self> {
        // Whole hours back, so that the rows of the default sizes fall in the partitions
        // pg_partman made around now (4 days either way).
        let span = i64::try_from(span_rows / 10)? + 3600;
        let now = Utc::now().timestamp();
        let base = DateTime::from_timestamp(now - now % 3600 - (span - span % 3600), 0)
            .context("base time")?;
        sqlx::query("INSERT INTO timezones (code, utc_offset_seconds) VALUES ('UTC', 0)")
            .execute(&pool)
            .await?;
        let session_id = Uuid::now_v7();
        sqlx::query("INSERT INTO sessions (id, session_type, started_at) VALUES ($1, 'call', $2)")
            .bind(session_id)
            .bind(base)
            .execute(&pool)
            .await?;
        let service = IngestService::new(
            Storage::new(pool.clone()),
            Arc::new(Spooler::open(&SpoolSettings::default())?),
            StreamLimits {
                max_items: u64::MAX,
                max_duration: Duration::from_secs(24 * 3600),
                writer_idle: Duration::from_secs(1),
            },
            ItemClock::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        Ok(Self {
            pool,
            service,
            session_id,
            base,
        })
    }

    /// A new user with an open participation in the benchmark session.
    pub(crate) async fn participation(&self) -> anyhow::Result<Participation> {
        let user_id = Uuid::now_v7();
        sqlx::query(
            "WITH claimed AS (INSERT INTO user_external_ids (external_id, user_id) \
                              VALUES ($2, $1) RETURNING user_id) \
             INSERT INTO users (id, external_id) SELECT user_id, $2 FROM claimed",
        )
        .bind(user_id)
        .bind(user_id.to_string())
        .execute(&self.pool)
        .await?;
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             VALUES ($1, $2, $3, 'UTC', $4)",
        )
        .bind(id)
        .bind(user_id)
        .bind(self.session_id)
        .bind(self.base)
        .execute(&self.pool)
        .await?;
        Ok(Participation {
            id,
            user_id,
            session_id: self.session_id,
            timezone_code: TimezoneCode::parse("UTC").map_err(anyhow::Error::msg)?,
            connected_at: self.base,
            disconnected_at: None,
            usage: None,
        })
    }

    /// `n` new users without participations, made in one statement.
    pub(crate) async fn users(&self, n: usize) -> anyhow::Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "WITH claimed AS (INSERT INTO user_external_ids (external_id, user_id) \
                              SELECT 'bench-' || gen_random_uuid(), gen_random_uuid() \
                              FROM generate_series(1, $1) RETURNING external_id, user_id) \
             INSERT INTO users (id, external_id) SELECT user_id, external_id FROM claimed \
             RETURNING id",
        )
        .bind(i64::try_from(n)?)
        .fetch_all(&self.pool)
        .await?)
    }

    /// `n` new users ([`Fixtures::users`]) with an open participation each in the
    /// benchmark session.
    pub(crate) async fn participations(&self, n: usize) -> anyhow::Result<Vec<Participation>> {
        let users = self.users(n).await?;
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             SELECT gen_random_uuid(), u.id, $2, 'UTC', $3 FROM unnest($1::uuid[]) AS u(id) \
             RETURNING id, user_id",
        )
        .bind(&users)
        .bind(self.session_id)
        .bind(self.base)
        .fetch_all(&self.pool)
        .await?;
        let timezone = TimezoneCode::parse("UTC").map_err(anyhow::Error::msg)?;
        Ok(rows
            .into_iter()
            .map(|(id, user_id)| Participation {
                id,
                user_id,
                session_id: self.session_id,
                timezone_code: timezone.clone(),
                connected_at: self.base,
                disconnected_at: None,
                usage: None,
            })
            .collect())
    }

    /// The i-th sentiment: 100 ms segments, back to back.
    pub(crate) fn sentiment(&self, i: u64) -> NewSentiment {
        let ms = i64::try_from(i).unwrap_or(i64::MAX / 1000) * 100;
        let labels = [
            SentimentLabel::Positive,
            SentimentLabel::Neutral,
            SentimentLabel::Negative,
        ];
        NewSentiment {
            started_at: self.base + TimeDelta::milliseconds(ms),
            ended_at: self.base + TimeDelta::milliseconds(ms + 100),
            label: labels[(i % 3) as usize],
            score: Some((i % 200) as f64 / 100.0 - 1.0),
        }
    }

    pub(crate) fn proto_sentiment(&self, i: u64) -> proto::NewSentiment {
        let s = self.sentiment(i);
        proto::NewSentiment {
            started_at: Some(to_timestamp(s.started_at)),
            ended_at: Some(to_timestamp(s.ended_at)),
            label: match s.label {
                SentimentLabel::Positive => proto::SentimentLabel::Positive,
                SentimentLabel::Neutral => proto::SentimentLabel::Neutral,
                SentimentLabel::Negative => proto::SentimentLabel::Negative,
            } as i32,
            score: s.score,
        }
    }

    pub(crate) async fn stored(&self, participation: &Participation) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sentiments WHERE user_id = $1 AND participation_id = $2",
        )
        .bind(participation.user_id)
        .bind(participation.id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n)?)
    }
}

/// Empties the feed tables and checkpoints, outside any timing, so that every
/// measurement starts from the same state and no checkpoint lands inside one.
pub(crate) async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE sentiments, events, ingest_streams, live_feeds")
        .execute(pool)
        .await?;
    checkpoint(pool).await
}

/// A checkpoint outside any timing, so that none lands inside a measurement. Between
/// unary measurements the tables are not emptied: a TRUNCATE invalidates every prepared
/// plan on every connection, and each would be planned again inside the next timing
/// (a cost a running service does not pay).
pub(crate) async fn checkpoint(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}
