-- The id of the stream's event at a snapshot's version: a load checks that the stream still has
-- that event there, so a snapshot of another history (events restored from an older backup) is
-- passed over. Nullable: snapshots saved before carry none and are trusted as they were.
-- `last_event_version` is the version the id belongs to: a build from before this migration
-- updates `version` and `state` only, and its snapshot must then read as having no id, not as
-- one of another history.
ALTER TABLE "__SCHEMA__".snapshots
    ADD COLUMN IF NOT EXISTS last_event_id uuid,
    ADD COLUMN IF NOT EXISTS last_event_version bigint;
