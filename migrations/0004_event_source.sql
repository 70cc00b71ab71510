-- The source of each event: the name of the write key it came with (ingest's key file), or
-- NULL when ingest takes events without keys (AUTH=none). Nullable and without a default, so
-- adding it rewrites nothing; ALTER on the partitioned parent reaches every partition.
ALTER TABLE product_events ADD COLUMN source text;

COMMENT ON COLUMN product_events.source IS
    'Name of the write key the event came with (ingest WRITE_KEYS_PATH); NULL with AUTH=none.';
