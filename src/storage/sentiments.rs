//! The sentiments table: COPY rows, the checked unary insert, and the read-back.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{
    copy::CopyEncoder,
    items::{FeedTable, Key, Unary, unary_statements},
};
use crate::domain::{NewSentiment, SentimentLabel};
use crate::error::Error;

/// This table's pieces of its unary statements (`items::unary_statements`, which says
/// what each arm gives): its columns, the rows bound as arrays, the condition that each
/// lies in its participation's span, the table of the ids clients chose and the
/// item's time.
macro_rules! sql {
    (rows) => {
        "FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], \
                     $5::text[], $6::float8[]) \
              AS t(participation_id, id, started_at, ended_at, label, score) "
    };
    (in_span) => {
        "JOIN participations p ON p.id = t.participation_id AND p.id = ANY($1) \
             AND p.user_id = ANY($7) \
         WHERE p.connected_at <= t.started_at \
           AND (p.disconnected_at IS NULL OR t.ended_at <= p.disconnected_at) "
    };
    (insert) => {
        "INSERT INTO sentiments \
           (id, user_id, participation_id, started_at, ended_at, label, score) "
    };
    (item) => {
        "t.started_at, t.ended_at, t.label, t.score"
    };
    (ids) => {
        "sentiment_request_ids"
    };
    (at) => {
        "started_at"
    };
}

impl FeedTable for NewSentiment {
    async fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
        at: DateTime<Utc>,
    ) -> Result<Option<Self>, Error> {
        let row: Option<(DateTime<Utc>, String, Option<f64>)> = sqlx::query_as(
            "SELECT ended_at, label, score FROM sentiments \
             WHERE user_id = $1 AND id = $2 AND started_at = $3",
        )
        .bind(user_id)
        .bind(id)
        .bind(at)
        .persistent(false)
        .fetch_optional(pool)
        .await?;
        row.map(|(ended_at, label, score)| {
            let label = SentimentLabel::from_stored(&label)
                .ok_or_else(|| Error::internal(anyhow::anyhow!("stored label {label:?}")))?;
            Ok(NewSentiment {
                started_at: at,
                ended_at,
                label,
                score,
            })
        })
        .transpose()
    }

    unary_statements!(sql);

    const COPY_STATEMENT: &'static str = "COPY sentiments \
         (id, user_id, participation_id, stream_id, started_at, ended_at, label, score) \
         FROM STDIN (FORMAT binary)";

    const FEED_COPY_STATEMENT: &'static str = "COPY sentiments \
         (id, user_id, participation_id, stream_id, feed_seq, started_at, ended_at, label, \
         score) FROM STDIN (FORMAT binary)";

    const ITEM_COLUMNS: i16 = 4;

    fn encode_columns(&self, encoder: &mut CopyEncoder) -> Result<(), Error> {
        encoder
            .timestamptz(self.started_at)
            .timestamptz(self.ended_at)
            .text(self.label.as_str())
            .optional_float8(self.score);
        Ok(())
    }

    async fn insert(
        conn: &mut PgConnection,
        rows: &[&Unary<Self>],
        statement: &'static str,
    ) -> Result<Vec<Key>, Error> {
        let participations: Vec<Uuid> = rows.iter().map(|r| r.participation_id).collect();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let started: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.started_at).collect();
        let ended: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.ended_at).collect();
        let labels: Vec<&str> = rows.iter().map(|r| r.item.label.as_str()).collect();
        let scores: Vec<Option<f64>> = rows.iter().map(|r| r.item.score).collect();
        let users: Vec<Uuid> = rows.iter().map(|r| r.user_id).collect();
        sqlx::query_as(statement)
            .bind(participations)
            .bind(ids)
            .bind(started)
            .bind(ended)
            .bind(labels)
            .bind(scores)
            .bind(users)
            .fetch_all(conn)
            .await
            .map_err(Error::from)
    }
}
