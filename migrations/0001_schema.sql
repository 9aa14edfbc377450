-- krisp-ingest schema.
--
-- Integrity lives here as well as in the service: every rule below holds even for a
-- client that writes SQL directly.
--
-- Distribution-ready (Citus): users, participations, sentiments, events and
-- ingest_streams all carry user_id, every PRIMARY KEY / UNIQUE / EXCLUDE constraint of
-- those tables contains user_id, and the foreign keys between them include it.
-- timezones and sessions are small, shared by all users, and suited to reference tables.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE timezones (
    code               text PRIMARY KEY,
    utc_offset_seconds integer NOT NULL,
    CONSTRAINT timezones_code_format CHECK (code ~ '^[A-Za-z0-9/_+-]{1,64}$'),
    CONSTRAINT timezones_offset_range CHECK (utc_offset_seconds BETWEEN -43200 AND 50400),
    CONSTRAINT timezones_offset_whole_minutes CHECK (utc_offset_seconds % 60 = 0)
);

CREATE TABLE users (
    id              uuid PRIMARY KEY,
    external_id     text NOT NULL,
    country         text,
    native_language text,
    region          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_external_id_key UNIQUE (external_id),
    CONSTRAINT users_external_id_length CHECK (char_length(external_id) BETWEEN 1 AND 200),
    CONSTRAINT users_country_format CHECK (country ~ '^[A-Z]{2}$'),
    CONSTRAINT users_native_language_format
        CHECK (native_language ~ '^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$'),
    CONSTRAINT users_region_length CHECK (char_length(region) BETWEEN 1 AND 200)
);

CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    session_type text NOT NULL,
    started_at   timestamptz NOT NULL,
    ended_at     timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_type_known CHECK (session_type IN ('call', 'meeting', 'webinar')),
    CONSTRAINT sessions_ends_after_start CHECK (ended_at IS NULL OR ended_at >= started_at)
);

CREATE TABLE participations (
    id              uuid NOT NULL,
    user_id         uuid NOT NULL,
    session_id      uuid NOT NULL,
    timezone_code   text NOT NULL,
    connected_at    timestamptz NOT NULL,
    disconnected_at timestamptz,
    talked_time_us  bigint,
    microphone_used boolean,
    speaker_used    boolean,
    CONSTRAINT participations_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT participations_user_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT participations_session_fkey FOREIGN KEY (session_id) REFERENCES sessions (id),
    CONSTRAINT participations_timezone_fkey FOREIGN KEY (timezone_code)
        REFERENCES timezones (code) ON UPDATE CASCADE,
    -- A user joins a session at most once.
    CONSTRAINT participations_user_session_key UNIQUE (user_id, session_id),
    -- A user's participations never overlap in time; an open one runs to infinity.
    CONSTRAINT participations_no_overlap EXCLUDE USING gist (
        user_id WITH =,
        tstzrange(connected_at, coalesce(disconnected_at, 'infinity'), '[)') WITH &&
    ),
    CONSTRAINT participations_disconnect_after_connect
        CHECK (disconnected_at IS NULL OR disconnected_at >= connected_at),
    -- Usage figures are given when the user leaves, all together.
    CONSTRAINT participations_usage_on_leave CHECK (
        (disconnected_at IS NULL AND talked_time_us IS NULL
            AND microphone_used IS NULL AND speaker_used IS NULL)
        OR (disconnected_at IS NOT NULL AND talked_time_us IS NOT NULL
            AND microphone_used IS NOT NULL AND speaker_used IS NOT NULL)
    ),
    CONSTRAINT participations_talked_time_fits CHECK (
        talked_time_us IS NULL OR (talked_time_us >= 0
            AND talked_time_us <= extract(epoch FROM disconnected_at - connected_at) * 1000000)
    )
);
-- Clients address participations by id alone.
CREATE INDEX participations_id_idx ON participations (id);
CREATE INDEX participations_session_idx ON participations (session_id);

-- One row per committed client stream: the receipt a replay of the same stream id gets.
CREATE TABLE ingest_streams (
    user_id          uuid NOT NULL,
    stream_id        uuid NOT NULL,
    participation_id uuid NOT NULL,
    kind             text NOT NULL,
    items_stored     bigint NOT NULL DEFAULT 0,
    committed_at     timestamptz,
    CONSTRAINT ingest_streams_pkey PRIMARY KEY (user_id, stream_id),
    CONSTRAINT ingest_streams_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT ingest_streams_kind_known CHECK (kind IN ('sentiments', 'events')),
    CONSTRAINT ingest_streams_items_stored_nonnegative CHECK (items_stored >= 0)
);

CREATE TABLE sentiments (
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    participation_id uuid NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz NOT NULL,
    label            text NOT NULL,
    score            double precision,
    stream_id        uuid,
    CONSTRAINT sentiments_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT sentiments_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT sentiments_stream_fkey FOREIGN KEY (user_id, stream_id)
        REFERENCES ingest_streams (user_id, stream_id) ON DELETE CASCADE,
    CONSTRAINT sentiments_ends_after_start CHECK (ended_at > started_at),
    CONSTRAINT sentiments_label_known CHECK (label IN ('positive', 'neutral', 'negative')),
    -- NaN compares greater than every number in PostgreSQL, so this rejects it too.
    CONSTRAINT sentiments_score_range CHECK (score BETWEEN -1 AND 1)
);
CREATE INDEX sentiments_timeline_idx ON sentiments (user_id, participation_id, started_at);

CREATE TABLE events (
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    participation_id uuid NOT NULL,
    occurred_at      timestamptz NOT NULL,
    kind             text NOT NULL,
    attributes       jsonb NOT NULL DEFAULT '{}',
    stream_id        uuid,
    CONSTRAINT events_pkey PRIMARY KEY (user_id, id),
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
);
CREATE INDEX events_timeline_idx ON events (user_id, participation_id, occurred_at);
