-- Resumable live feeds (LiveFeed): a feed's committed position, advanced in the same
-- transaction as the items it covers, and the epoch that fences an older stream of the
-- feed once a newer one opened it (so two replicas never both write one feed).
CREATE TABLE live_feeds (
    user_id          uuid NOT NULL,
    feed_id          uuid NOT NULL,
    participation_id uuid NOT NULL,
    -- The sequence number of the last stored item; 0 before the first.
    committed_seq    bigint NOT NULL DEFAULT 0,
    -- Bumped by every Open; a write names the epoch it opened with.
    epoch            bigint NOT NULL DEFAULT 1,
    closed_at        timestamptz,
    CONSTRAINT live_feeds_pkey PRIMARY KEY (user_id, feed_id),
    CONSTRAINT live_feeds_participation_fkey FOREIGN KEY (user_id, participation_id)
        REFERENCES participations (user_id, id) ON DELETE CASCADE,
    CONSTRAINT live_feeds_committed_seq_nonnegative CHECK (committed_seq >= 0),
    CONSTRAINT live_feeds_epoch_positive CHECK (epoch >= 1)
)
-- Every append updates its feed's row (a feed a second each, thousands at once): room on
-- the page keeps those updates HOT (no index entry per update), and autovacuum on this
-- small table early keeps its dead versions from piling up.
WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);

-- A feed's rows carry the feed (in stream_id) and their sequence number. The same item
-- stored twice (same feed, same number, and so the same time: a resend) is refused by
-- the schema itself, not only by the position check in the code: the unique indexes
-- include the partition key, which a resent item shares with its first copy.
ALTER TABLE sentiments ADD COLUMN feed_seq bigint;
ALTER TABLE events ADD COLUMN feed_seq bigint;
ALTER TABLE sentiments ADD CONSTRAINT sentiments_feed_seq_positive
    CHECK (feed_seq IS NULL OR (feed_seq >= 1 AND stream_id IS NOT NULL));
ALTER TABLE events ADD CONSTRAINT events_feed_seq_positive
    CHECK (feed_seq IS NULL OR (feed_seq >= 1 AND stream_id IS NOT NULL));
CREATE UNIQUE INDEX sentiments_feed_item_key ON sentiments (user_id, stream_id, feed_seq, started_at)
    WHERE feed_seq IS NOT NULL;
CREATE UNIQUE INDEX events_feed_item_key ON events (user_id, stream_id, feed_seq, occurred_at)
    WHERE feed_seq IS NOT NULL;
