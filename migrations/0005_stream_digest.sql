-- A replay of a committed stream returned the first receipt whatever items it carried
-- (7 against a stored 500 answered OK, replayed). The receipt now keeps a digest of the
-- stream's items (SHA-256 over each item's columns as the stream wrote them, in order),
-- and a replay with other items is ALREADY_EXISTS, as a unary request_id reused for
-- different content is. Receipts committed before this migration have none; their
-- replays are answered as before.
ALTER TABLE ingest_streams ADD COLUMN items_digest bytea;
ALTER TABLE ingest_streams ADD CONSTRAINT ingest_streams_items_digest_sha256
    CHECK (items_digest IS NULL OR octet_length(items_digest) = 32);
