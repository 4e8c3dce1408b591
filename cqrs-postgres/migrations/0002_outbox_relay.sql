-- The outbox is the events table itself: a relay ships events in global order and keeps its
-- place here. One row per relay name; a relay holds its row locked (FOR UPDATE SKIP LOCKED)
-- for the length of a batch, so only one relay of a name ships at a time.
CREATE TABLE "__SCHEMA__".relay_checkpoints (
    relay      text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
