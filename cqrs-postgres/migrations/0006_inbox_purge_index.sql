-- Inbox entries by age, per consumer: `PgProjectionStore::purge_inbox` deletes old ones
-- without scanning every consumer's.
CREATE INDEX IF NOT EXISTS inbox_consumer_processed_at ON "__SCHEMA__".inbox (consumer, processed_at);
