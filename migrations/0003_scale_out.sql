-- Scale-out (docs/SCALING.md): a schema that Citus can distribute by user_id as it is,
-- and sentiments/events partitioned by time.
--
-- 1. users.external_id was UNIQUE on its own, which a table distributed by user id cannot
--    enforce. Uniqueness moves to user_external_ids (a reference table under Citus): its
--    primary key is the external id, and every user must match its row there through a
--    foreign key on (id, external_id). Two users with one external id would need two
--    rows with the same primary key, so the rule still lives in the schema. Deleting the
--    user_external_ids row of a user deletes the user (and, by cascade, all of theirs).
--
-- 2. sentiments and events become range-partitioned on their timestamp. PostgreSQL
--    requires the partition key in every unique constraint of a partitioned table, so
--    their primary keys become (id, user_id, started_at) and (id, user_id, occurred_at).
--    They lead with id: a look-up by (user_id, id) across partitions (the unary path's
--    check that an id is not taken at another time) then always probes the key with both
--    columns, whatever the statistics say; led by user_id, the planner was seen to probe
--    by user_id alone and filter all of that user's rows.
--    A default partition takes every row until partitions by time exist; pg_partman
--    creates those and drops old ones (src/partitions.rs), when it is installed.

CREATE TABLE user_external_ids (
    external_id text NOT NULL,
    user_id     uuid NOT NULL,
    CONSTRAINT user_external_ids_pkey PRIMARY KEY (external_id),
    CONSTRAINT user_external_ids_user_key UNIQUE (user_id, external_id)
);
INSERT INTO user_external_ids (external_id, user_id) SELECT external_id, id FROM users;
ALTER TABLE users DROP CONSTRAINT users_external_id_key;
ALTER TABLE users ADD CONSTRAINT users_external_id_fkey FOREIGN KEY (id, external_id)
    REFERENCES user_external_ids (user_id, external_id) ON DELETE CASCADE;

-- sentiments, partitioned by started_at.
ALTER TABLE sentiments RENAME TO sentiments_unpartitioned;
ALTER INDEX sentiments_pkey RENAME TO sentiments_unpartitioned_pkey;
ALTER INDEX sentiments_timeline_idx RENAME TO sentiments_unpartitioned_timeline_idx;

CREATE TABLE sentiments (
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    participation_id uuid NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz NOT NULL,
    label            text NOT NULL,
    score            double precision,
    stream_id        uuid,
    CONSTRAINT sentiments_pkey PRIMARY KEY (id, user_id, started_at),
    CONSTRAINT sentiments_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT sentiments_stream_fkey FOREIGN KEY (user_id, stream_id)
        REFERENCES ingest_streams (user_id, stream_id) ON DELETE CASCADE,
    CONSTRAINT sentiments_ends_after_start CHECK (ended_at > started_at),
    CONSTRAINT sentiments_label_known CHECK (label IN ('positive', 'neutral', 'negative')),
    -- NaN compares greater than every number in PostgreSQL, so this rejects it too.
    CONSTRAINT sentiments_score_range CHECK (score BETWEEN -1 AND 1)
) PARTITION BY RANGE (started_at);
-- The timeline of a participation (and the look-up of a participation's rows on delete).
CREATE INDEX sentiments_timeline_idx ON sentiments (participation_id, started_at);
CREATE TABLE sentiments_default PARTITION OF sentiments DEFAULT;
INSERT INTO sentiments SELECT id, user_id, participation_id, started_at, ended_at, label,
    score, stream_id FROM sentiments_unpartitioned;
DROP TABLE sentiments_unpartitioned;

-- events, partitioned by occurred_at.
ALTER TABLE events RENAME TO events_unpartitioned;
ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;
ALTER INDEX events_timeline_idx RENAME TO events_unpartitioned_timeline_idx;

CREATE TABLE events (
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    participation_id uuid NOT NULL,
    occurred_at      timestamptz NOT NULL,
    kind             text NOT NULL,
    attributes       jsonb NOT NULL DEFAULT '{}',
    stream_id        uuid,
    CONSTRAINT events_pkey PRIMARY KEY (id, user_id, occurred_at),
    CONSTRAINT events_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT events_stream_fkey FOREIGN KEY (user_id, stream_id)
        REFERENCES ingest_streams (user_id, stream_id) ON DELETE CASCADE,
    CONSTRAINT events_kind_known CHECK (kind IN (
        'connected', 'disconnected', 'microphone_muted', 'microphone_unmuted',
        'speaker_on', 'speaker_off', 'talk_started', 'talk_stopped',
        'noise_cancellation_on', 'noise_cancellation_off',
        'screen_share_started', 'screen_share_stopped')),
    CONSTRAINT events_attributes_object CHECK (jsonb_typeof(attributes) = 'object')
) PARTITION BY RANGE (occurred_at);
CREATE INDEX events_timeline_idx ON events (participation_id, occurred_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
INSERT INTO events SELECT id, user_id, participation_id, occurred_at, kind, attributes,
    stream_id FROM events_unpartitioned;
DROP TABLE events_unpartitioned;
