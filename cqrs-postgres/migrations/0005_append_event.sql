-- Appends one event: append_events for a batch of one, taking scalars instead of arrays. A
-- command records one event more often than not, and unnesting six one-element arrays,
-- ordering them and aggregating the positions back into an array cost almost as much as
-- everything else the function does (docs/benchmarks.md). The same lock, checks and
-- notification, in the same order. On a version mismatch it returns the actual version and a
-- NULL position, without raising.
CREATE FUNCTION "__SCHEMA__".append_event(
    p_stream_id      text,
    p_expected       bigint,
    p_event_id       uuid,
    p_event_type     text,
    p_schema_version integer,
    p_payload        jsonb,
    p_metadata       jsonb,
    p_partition_key  text,
    OUT actual_version bigint,
    OUT event_position bigint
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    -- Held until commit: appends are serialized, so positions follow commit order.
    PERFORM pg_advisory_xact_lock(__APPEND_LOCK__);
    -- A new statement, so (in READ COMMITTED) a fresh snapshot that sees every append
    -- committed before this one took the lock.
    SELECT coalesce(max(e.stream_version), 0) INTO actual_version
      FROM "__SCHEMA__".events e WHERE e.stream_id = p_stream_id;
    IF p_expected IS NOT NULL AND p_expected <> actual_version THEN
        event_position := NULL;
        RETURN;
    END IF;
    INSERT INTO "__SCHEMA__".events
        (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata,
         partition_key)
    VALUES (p_stream_id, actual_version + 1, p_event_id, p_event_type, p_schema_version,
            p_payload, p_metadata, p_partition_key)
    RETURNING position INTO event_position;
    -- Delivered at commit, once per transaction: wakes the outbox relays.
    PERFORM pg_notify('__CHANNEL__', '');
END
$$;
