-- Unique product events, one row per event, partitioned by the event's own UTC day.
--
-- The dedup key is a 128-bit hash of the key fields (see services/dedup-core/src/key.rs),
-- stored as a uuid. The partition key must be part of every unique constraint on a
-- partitioned table, so uniqueness is per (event day, key). The day comes from the event's
-- event_datetime, never from arrival time, so a retried event always lands in the same
-- partition and meets its first copy there.
CREATE TABLE product_events (
    event_date     date        NOT NULL,
    dedup_key      uuid        NOT NULL,
    event_datetime timestamptz NOT NULL,
    client_id      text,
    event_name     text        NOT NULL,
    product_id     text        NOT NULL,
    sid            text        NOT NULL,
    r              text        NOT NULL,
    -- The whole event as the client sent it, extra fields included.
    payload        jsonb       NOT NULL,
    -- When ingest accepted the event.
    received_at    timestamptz NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    -- The authority on duplicates: a second insert of the same event is a no-op
    -- (INSERT ... ON CONFLICT (event_date, dedup_key) DO NOTHING).
    CONSTRAINT product_events_dedup_key UNIQUE (event_date, dedup_key)
) PARTITION BY RANGE (event_date);

COMMENT ON TABLE product_events IS
    'Unique product events; daily partitions product_events_pYYYYMMDD. Retention: DROP the old partitions.';

-- Creates the daily partitions for the given days where missing. Workers call it when a batch
-- holds a day they have not seen; the advisory lock makes concurrent callers take turns, so two
-- workers never race on CREATE TABLE. Partitions go in the schema of product_events.
CREATE FUNCTION dedup_ensure_partitions(days date[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    parent_schema text;
    d date;
    part text;
    created integer := 0;
BEGIN
    SELECT n.nspname INTO parent_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'product_events'::regclass;
    PERFORM pg_advisory_xact_lock(hashtext(parent_schema || '.product_events partitions'));
    FOREACH d IN ARRAY days LOOP
        part := 'product_events_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass(format('%I.%I', parent_schema, part)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.product_events FOR VALUES FROM (%L) TO (%L)',
                           parent_schema, part, parent_schema, d, d + 1);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;
