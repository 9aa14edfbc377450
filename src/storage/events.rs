//! The events table: COPY rows, the checked unary insert, and the read-back.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{
    copy::CopyEncoder,
    items::{FeedTable, Key, Unary, unary_statements},
};
use crate::domain::{EventKind, NewEvent};
use crate::error::Error;

/// This table's pieces of its unary statements (`items::unary_statements`, which says
/// what each arm gives): its columns, the rows bound as arrays, the condition that each
/// lies in its participation's span (an event's span is its instant), the table of the
/// ids clients chose and the item's time.
macro_rules! sql {
    (rows) => {
        "FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[]) \
              AS t(participation_id, id, occurred_at, kind, attributes) "
    };
    (in_span) => {
        "JOIN participations p ON p.id = t.participation_id AND p.id = ANY($1) \
             AND p.user_id = ANY($6) \
         WHERE p.connected_at <= t.occurred_at \
           AND (p.disconnected_at IS NULL OR t.occurred_at <= p.disconnected_at) "
    };
    (insert) => {
        "INSERT INTO events (id, user_id, participation_id, occurred_at, kind, attributes) "
    };
    (item) => {
        "t.occurred_at, t.kind, t.attributes::jsonb"
    };
    (ids) => {
        "event_request_ids"
    };
    (at) => {
        "occurred_at"
    };
}

impl FeedTable for NewEvent {
    async fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
        at: DateTime<Utc>,
    ) -> Result<Option<Self>, Error> {
        let row: Option<(String, sqlx::types::JsonValue)> = sqlx::query_as(
            "SELECT kind, attributes FROM events \
             WHERE user_id = $1 AND id = $2 AND occurred_at = $3",
        )
        .bind(user_id)
        .bind(id)
        .bind(at)
        .persistent(false)
        .fetch_optional(pool)
        .await?;
        row.map(|(kind, attributes)| {
            let kind = EventKind::from_stored(&kind)
                .ok_or_else(|| Error::internal(anyhow::anyhow!("stored event kind {kind:?}")))?;
            let attributes = serde_json::from_value(attributes).map_err(Error::internal)?;
            Ok(NewEvent {
                occurred_at: at,
                kind,
                attributes,
            })
        })
        .transpose()
    }

    unary_statements!(sql);

    const COPY_STATEMENT: &'static str = "COPY events \
         (id, user_id, participation_id, stream_id, occurred_at, kind, attributes) \
         FROM STDIN (FORMAT binary)";

    const FEED_COPY_STATEMENT: &'static str = "COPY events \
         (id, user_id, participation_id, stream_id, feed_seq, occurred_at, kind, attributes) \
         FROM STDIN (FORMAT binary)";

    const ITEM_COLUMNS: i16 = 3;

    fn encode_columns(&self, encoder: &mut CopyEncoder) -> Result<(), Error> {
        encoder
            .timestamptz(self.occurred_at)
            .text(self.kind.as_str())
            .jsonb_of(&self.attributes)
            .map_err(Error::internal)?;
        Ok(())
    }

    async fn insert(
        conn: &mut PgConnection,
        rows: &[&Unary<Self>],
        statement: &'static str,
    ) -> Result<Vec<Key>, Error> {
        let participations: Vec<Uuid> = rows.iter().map(|r| r.participation_id).collect();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let occurred: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.occurred_at).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.item.kind.as_str()).collect();
        let attributes = rows
            .iter()
            .map(|r| serde_json::to_string(&r.item.attributes))
            .collect::<Result<Vec<String>, _>>()
            .map_err(Error::internal)?;
        let users: Vec<Uuid> = rows.iter().map(|r| r.user_id).collect();
        sqlx::query_as(statement)
            .bind(participations)
            .bind(ids)
            .bind(occurred)
            .bind(kinds)
            .bind(attributes)
            .bind(users)
            .fetch_all(conn)
            .await
            .map_err(Error::from)
    }
}
