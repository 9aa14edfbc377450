-- Distributes the krisp-ingest schema on Citus (docs/SCALING.md). Run it on the
-- coordinator, as the schema owner, once `krisp-ingest migrate` has created the tables
-- and before any data is loaded (or accept that Citus copies the existing rows).
--
-- The Citus suite (tests/api/citus/) runs this file on a real cluster and checks, in
-- Citus' catalog, that every table of the schema is placed as it says.

CREATE EXTENSION IF NOT EXISTS citus;

-- The reference tables come first (the distributed tables' foreign keys point at them),
-- while the tables that reference them are still local. By default Citus then converts
-- every local table in the foreign-key graph into a "Citus local table", which fails on
-- the partitioned sentiments and events ("child table is missing constraint ..."). Off
-- for this session: no conversion; the distributed tables below take the keys over.
SET citus.enable_local_reference_table_foreign_keys = off;

-- Small, shared by all users, read on every join: copied to every node.
SELECT create_reference_table('timezones');
SELECT create_reference_table('api_keys');
-- One row per user, keyed by external id: keeps external ids unique across shards.
SELECT create_reference_table('user_external_ids');

-- Sessions are shared by the users who take part in them, and a voice service creates
-- one per call: distributed by their own id, each on one shard, so that CreateSession and
-- EndSession write one shard instead of every node. Citus keeps no foreign key between
-- distributed tables that are not co-located, so participations -> sessions goes;
-- JoinSession keeps the rule in its statement, with the session's row locked, and the
-- session's own CHECKs keep its end after every connection (docs/GUARANTEES.md, "On
-- Citus"; docs/decisions/0003-sessions-distributed-by-id.md).
ALTER TABLE participations DROP CONSTRAINT participations_session_fkey;
SELECT create_distributed_table('sessions', 'id', colocate_with => 'none');

-- Everything of one user on one shard: distributed by the user id, co-located.
SELECT create_distributed_table('users', 'id');
SELECT create_distributed_table('participations', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('ingest_streams', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('live_feeds', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('sentiments', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('events', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('sentiment_request_ids', 'user_id', colocate_with => 'users');
SELECT create_distributed_table('event_request_ids', 'user_id', colocate_with => 'users');

-- _sqlx_migrations stays a local table of the coordinator.
