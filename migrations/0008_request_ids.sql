-- The ids clients chose (`request_id`) for the sentiments and events they record one at a
-- time: unique per user whatever the item's time, which the partitioned tables' keys
-- cannot say (they must hold the time). The unary insert claims the id here, in the same
-- transaction as the item: a reused request_id conflicts on this key, in one index,
-- rather than in a look-up of every partition (one probe per partition: 2.6 ms a call with
-- a year of daily partitions; docs/decisions/0004-request-ids-claimed-in-a-table.md).
-- Rows go with their
-- participation (DeleteUser); they outlive the item when the retention drops its
-- partition, so that the id stays refused.
CREATE TABLE sentiment_request_ids (
    user_id          uuid NOT NULL,
    id               uuid NOT NULL,
    participation_id uuid NOT NULL,
    started_at       timestamptz NOT NULL,
    CONSTRAINT sentiment_request_ids_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT sentiment_request_ids_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE
);

CREATE TABLE event_request_ids (
    user_id          uuid NOT NULL,
    id               uuid NOT NULL,
    participation_id uuid NOT NULL,
    occurred_at      timestamptz NOT NULL,
    CONSTRAINT event_request_ids_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT event_request_ids_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE
);

-- The items recorded one at a time before (no stream): which of them had a request_id is
-- not known, so every one's id is taken (a server's id is never sent again).
INSERT INTO sentiment_request_ids (user_id, id, participation_id, started_at)
SELECT DISTINCT ON (user_id, id) user_id, id, participation_id, started_at
FROM sentiments WHERE stream_id IS NULL
ORDER BY user_id, id, started_at;

INSERT INTO event_request_ids (user_id, id, participation_id, occurred_at)
SELECT DISTINCT ON (user_id, id) user_id, id, participation_id, occurred_at
FROM events WHERE stream_id IS NULL
ORDER BY user_id, id, occurred_at;
