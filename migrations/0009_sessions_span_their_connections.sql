-- A session's end is never before a participation of it connected.
--
-- JoinSession refuses a connection after the session's end, but EndSession did not look
-- at the participations: it could end a session before a participant connected, and an
-- EndSession running beside a JoinSession could both succeed in either order. Each
-- session now keeps the latest connection of its participations: JoinSession raises it
-- in the statement that inserts the participation (and holds the session's row until it
-- commits), and the CHECK below refuses an end before it. Both rules live in
-- this one row, so they hold on Citus too, where sessions are distributed by their own
-- id and the participations -> sessions foreign key cannot be kept (docs/GUARANTEES.md,
-- "On Citus").
--
-- The latest connection stays when a participation is deleted with its user: the end of
-- a session is then still held to every connection it ever took.
ALTER TABLE sessions ADD COLUMN last_connected_at timestamptz;

UPDATE sessions s SET last_connected_at = p.last
FROM (SELECT session_id, max(connected_at) AS last FROM participations GROUP BY session_id) p
WHERE p.session_id = s.id;

ALTER TABLE sessions
    ADD CONSTRAINT sessions_connections_after_start
        CHECK (last_connected_at IS NULL OR last_connected_at >= started_at),
    ADD CONSTRAINT sessions_ends_after_last_connection
        CHECK (ended_at IS NULL OR last_connected_at IS NULL OR ended_at >= last_connected_at);
