-- Text a client names things with takes no control characters (U+0001 to U+001F and
-- U+007F; text cannot hold U+0000), in the schema as in the code (domain::check_text):
-- a tab or line break in an external id or a region breaks logs, CSV exports and the
-- terminals of whoever reads them, and no caller means one.
--
-- NOT VALID: every row written from now on is checked; rows stored before this
-- migration are not scanned, so that a database holding such rows still starts. To
-- find and fix them, then make the constraints hold for every row:
--   SELECT id, external_id, region FROM users
--    WHERE external_id ~ '[\x01-\x1f\x7f]' OR region ~ '[\x01-\x1f\x7f]';
--   ALTER TABLE users VALIDATE CONSTRAINT users_external_id_printable; (and the others)
-- Event attributes (keys and values inside jsonb) are checked by the code only: a CHECK
-- cannot look inside the object without a function.
ALTER TABLE users ADD CONSTRAINT users_external_id_printable
    CHECK (external_id !~ '[\x01-\x1f\x7f]') NOT VALID;
ALTER TABLE users ADD CONSTRAINT users_region_printable
    CHECK (region !~ '[\x01-\x1f\x7f]') NOT VALID;
ALTER TABLE user_external_ids ADD CONSTRAINT user_external_ids_printable
    CHECK (external_id !~ '[\x01-\x1f\x7f]') NOT VALID;
