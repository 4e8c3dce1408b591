-- The event store: every event of every stream, in one global order.
--
-- `position` is the global order. It comes from an identity sequence, and every append takes
-- the schema's append lock (a transaction-scoped advisory lock) right before it draws
-- positions and holds it until commit, so positions are drawn in commit order: a reader that
-- has seen position p can never later see a new event at or below p. See docs/postgres.md.
--
-- The unique constraint on (stream_id, stream_version) enforces optimistic concurrency even
-- for writers that bypass append_events.
CREATE TABLE "__SCHEMA__".events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      text        NOT NULL,
    stream_version bigint      NOT NULL CHECK (stream_version > 0),
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    partition_key  text,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- Appends a batch to one stream in one statement: takes the append lock, checks the expected
-- version (NULL: any), inserts the events with consecutive versions, and notifies relays.
-- On a version mismatch it returns the actual version and NULL positions, without raising,
-- so the caller's transaction stays usable. An empty batch takes no lock.
CREATE FUNCTION "__SCHEMA__".append_events(
    p_stream_id       text,
    p_expected        bigint,
    p_event_ids       uuid[],
    p_event_types     text[],
    p_schema_versions integer[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    p_partition_keys  text[],
    OUT actual_version bigint,
    OUT positions      bigint[]
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF coalesce(cardinality(p_event_ids), 0) = 0 THEN
        SELECT coalesce(max(e.stream_version), 0) INTO actual_version
          FROM "__SCHEMA__".events e WHERE e.stream_id = p_stream_id;
        positions := '{}';
        RETURN;
    END IF;
    -- Held until commit: appends are serialized, so positions follow commit order.
    PERFORM pg_advisory_xact_lock(__APPEND_LOCK__);
    -- A new statement, so (in READ COMMITTED) a fresh snapshot that sees every append
    -- committed before this one took the lock.
    SELECT coalesce(max(e.stream_version), 0) INTO actual_version
      FROM "__SCHEMA__".events e WHERE e.stream_id = p_stream_id;
    IF p_expected IS NOT NULL AND p_expected <> actual_version THEN
        positions := NULL;
        RETURN;
    END IF;
    WITH inserted AS (
        INSERT INTO "__SCHEMA__".events
            (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata,
             partition_key)
        SELECT p_stream_id, actual_version + u.ord, u.event_id, u.event_type, u.schema_version,
               u.payload, u.metadata, u.partition_key
          FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata,
                      p_partition_keys)
               WITH ORDINALITY AS u(event_id, event_type, schema_version, payload, metadata,
                                    partition_key, ord)
         ORDER BY u.ord
        RETURNING position, stream_version
    )
    SELECT array_agg(i.position ORDER BY i.stream_version) INTO positions FROM inserted i;
    -- Delivered at commit, once per transaction: wakes the outbox relays.
    PERFORM pg_notify('__CHANNEL__', '');
END
$$;

-- Aggregate snapshots: the latest state of a stream at a version.
CREATE TABLE "__SCHEMA__".snapshots (
    stream_id  text        PRIMARY KEY,
    version    bigint      NOT NULL,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
