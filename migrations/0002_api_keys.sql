-- API keys: stored as SHA-256 hashes only; the key itself is shown once, when created.
-- Shared by every user: a reference table under Citus.
CREATE TABLE api_keys (
    name       text PRIMARY KEY,
    key_hash   bytea NOT NULL,
    scopes     text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT api_keys_hash_is_sha256 CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_name_format CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    CONSTRAINT api_keys_scopes_known
        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'read']::text[])
);
