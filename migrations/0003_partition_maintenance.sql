-- Partition maintenance: daily partitions are created ahead of need and dropped after the
-- retention, by one function every worker (or `dedup-worker maintain`) may call at any time.
--
-- Creating ahead means the insert path rarely creates a partition; dropping is how retention
-- works on a table partitioned by the event's own day. Partitions are recognised by their
-- name, product_events_pYYYYMMDD, and only those: a partition someone attached under another
-- name is never dropped. The same advisory lock as dedup_ensure_partitions makes concurrent
-- callers take turns.
CREATE FUNCTION dedup_maintain_partitions(first_day date, last_day date, drop_before date)
RETURNS TABLE (created integer, dropped integer)
LANGUAGE plpgsql AS $$
DECLARE
    parent_schema text;
    part record;
BEGIN
    SELECT n.nspname INTO parent_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'product_events'::regclass;
    created := dedup_ensure_partitions(ARRAY(SELECT generate_series(first_day, last_day, interval '1 day')::date));
    PERFORM pg_advisory_xact_lock(hashtext(parent_schema || '.product_events partitions'));
    dropped := 0;
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'product_events'::regclass
          AND c.relname ~ '^product_events_p[0-9]{8}$'
          AND to_date(substr(c.relname, 17), 'YYYYMMDD') < drop_before
    LOOP
        EXECUTE format('DROP TABLE %I.%I', parent_schema, part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN NEXT;
END
$$;
