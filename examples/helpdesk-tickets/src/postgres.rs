//! The list index and the stats read model in Postgres, for the Postgres mode.

use crate::domain::{Status, Ticket, TicketEvent};
use crate::index::{ListFilter, Listed, SortKey, TicketIndex};
use crate::stats::{Stats, StatsReader};
use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use cqrs_core::projection::{Projection, ProjectionRunner};
use cqrs_core::runtime::{Shutdown, Worker, WorkerContext};
use cqrs_core::{BoxError, EventEnvelope, EventSet, HandlerError};
use cqrs_postgres::sqlx::postgres::PgConnection;
use cqrs_postgres::sqlx::{self, AssertSqlSafe, QueryBuilder, Row};
use cqrs_postgres::{PgDatabase, PgProjectionStore, PgProjectionUnit};
use helpdesk_api::Migration;
use helpdesk_api::postgres::store_error;
use std::sync::Arc;
use uuid::Uuid;

/// The tickets plugin's migrations in `schema`, in order: the tables, the list's filter
/// indexes, the counts per status, the record of what feeds the stats, the list's order by
/// entry. Each is recorded by its text and runs once per schema (a new text runs again), so a
/// change is a new migration, not an edit of an applied one.
pub(crate) fn migrations(schema: &str) -> [Migration; 6] {
    [
        tables(schema),
        list_filters(schema),
        status_counts(schema),
        stats_feed(schema),
        list_order(schema),
        list_by_priority(schema),
    ]
}

/// Agents' lists by priority, alone or with a status, newest first. Without them such a
/// filter walked the newest-first list (or a status's) checking each ticket's priority: a
/// page of a rare priority, or of none (`?status=closed&priority=urgent` with no such
/// ticket), read every ticket there. Built as [`list_filters`]' are: on a large list, build
/// them beforehand with `CREATE INDEX CONCURRENTLY` and these names.
fn list_by_priority(schema: &str) -> Migration {
    Migration {
        name: "tickets.list_by_priority",
        sql: format!(
            "CREATE INDEX IF NOT EXISTS ticket_index_priority_listed ON {schema}.ticket_index (priority, listed DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_status_priority_listed ON {schema}.ticket_index (status, priority, listed DESC);"
        ),
    }
}

/// The list's order: `listed`, the position of the ticket's first event. The event store
/// gives positions out in commit order, so a ticket that becomes visible after a client read
/// a page is above that page: ordered by creation time, stamped before the commit, a ticket
/// stamped earlier but committed later could land below a cursor already handed out, and a
/// client walking the pages missed it.
///
/// The command writes the list row before its events (they are appended last, at commit), so
/// a trigger on `events` sets `listed` when the ticket's first event is appended, in the same
/// statement: no round trip more under the append lock (an update of the list row, whose
/// indexes it touches). It also sets it for an instance of an older build during a rolling
/// upgrade (which still lists by creation time, without its index, until replaced).
///
/// The migration's `ALTER TABLE` locks the list (reads too) until it commits: it fills
/// `listed` for the tickets already listed, builds the indexes, drops the creation-time ones,
/// and creates the trigger last, so appends to the event store (every plugin's) wait only for
/// that step and the commit. (Ticket commands wait for the list's lock meanwhile, so none
/// appends a first event between the fill and the trigger.) On a large list, cut the time it
/// holds the list: add the column (`ALTER TABLE ... ADD COLUMN listed bigint`, no rewrite),
/// fill it in batches, and build the indexes with `CREATE INDEX CONCURRENTLY` and these names
/// beforehand; the migration then finds them, and fills only what came since.
fn list_order(schema: &str) -> Migration {
    Migration {
        name: "tickets.list_order",
        sql: format!(
            "ALTER TABLE {schema}.ticket_index ADD COLUMN IF NOT EXISTS listed bigint;
            UPDATE {schema}.ticket_index t SET listed = e.position
            FROM {schema}.events e
            WHERE t.listed IS NULL AND e.stream_id = 'ticket-' || t.id::text AND e.stream_version = 1;
            CREATE INDEX IF NOT EXISTS ticket_index_listed ON {schema}.ticket_index (listed DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_reporter_listed ON {schema}.ticket_index (reporter_id, listed DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_status_listed ON {schema}.ticket_index (status, listed DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_assignee_listed ON {schema}.ticket_index (assignee_id, listed DESC)
                WHERE assignee_id IS NOT NULL;
            DROP INDEX IF EXISTS {schema}.ticket_index_newest, {schema}.ticket_index_reporter,
                {schema}.ticket_index_status, {schema}.ticket_index_assignee;
            CREATE OR REPLACE FUNCTION {schema}.ticket_listed() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE {schema}.ticket_index SET listed = NEW.position
                WHERE id = substr(NEW.stream_id, 8)::uuid AND listed IS NULL;
                RETURN NULL;
            END
            $$;
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_trigger
                               WHERE tgrelid = '{schema}.events'::regclass
                                 AND tgname = 'ticket_listed') THEN
                    CREATE TRIGGER ticket_listed
                        AFTER INSERT ON {schema}.events
                        FOR EACH ROW
                        WHEN (NEW.stream_version = 1
                              AND NEW.stream_id ~ '^ticket-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$')
                        EXECUTE FUNCTION {schema}.ticket_listed();
                END IF;
            END
            $$;"
        ),
    }
}

/// Which source fed the stats at the last start (`store` or `stream`): one row.
fn stats_feed(schema: &str) -> Migration {
    Migration {
        name: "tickets.stats_feed",
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.ticket_stats_feed (
                one boolean PRIMARY KEY DEFAULT true CHECK (one),
                feed text NOT NULL
            );"
        ),
    }
}

/// The stats' worker on Postgres: before it runs, a start fed from another source than the
/// last start rebuilds the stats from the event store.
///
/// The two feeds leave the projection's checkpoint in different states. Fed by the event
/// store, it is a watermark: every event up to it took effect. Fed by the stream, it is the
/// highest position applied, with events below it perhaps still on their way (held back,
/// set aside for redelivery); and the stream carries only what the outbox relay shipped to
/// it. So a server started without Redis after running with it would read the store after a
/// checkpoint that skips what the stream had not delivered yet, and one started with Redis
/// after running without it would never see the events between the stats' checkpoint and
/// where the relay began shipping. Either way some events never reach the stats; the rebuild
/// replays them all (in one transaction, under the projection's lock), and the new source
/// goes on from there. The first start that finds no record takes its source as the last one.
pub(crate) struct StatsWorker {
    db: PgDatabase,
    runner: ProjectionRunner<PgProjectionStore, PgStats>,
    feed: &'static str,
}

impl StatsWorker {
    /// `runner`, fed from the event store (`"store"`) or from the stream (`"stream"`).
    pub(crate) fn new(
        db: PgDatabase,
        runner: ProjectionRunner<PgProjectionStore, PgStats>,
        feed: &'static str,
    ) -> Self {
        Self { db, runner, feed }
    }

    /// Rebuilds the stats if the last start had another source, and records this one, in one
    /// transaction that holds the record's row: instances started together wait for the first
    /// one's rebuild, then find the record matching and go on without one of their own.
    ///
    /// A stop during the check or the rebuild abandons the switch (the next start does it);
    /// once the rebuild's future has returned, the record is written whatever comes:
    /// abandoned then, the record would name the old source over rebuilt stats, and the next
    /// start would rebuild again for nothing. A stop that comes while the rebuild's `COMMIT`
    /// is on the wire still does that (the future is dropped after the server committed, in a
    /// poll the stop wins): a second rebuild, wasted work on a rare start, the stats right all
    /// the same. Returns `false` when stopped.
    async fn switch_feed(&self, shutdown: &Shutdown) -> Result<bool, BoxError> {
        let schema = self.db.schema();
        // Idle while the rebuild runs on other connections: not ended by the server meanwhile.
        let checked = async {
            let mut tx = self.db.begin_held_open().await?;
            let last: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT feed FROM {schema}.ticket_stats_feed FOR UPDATE"
            )))
            .fetch_optional(&mut *tx)
            .await?;
            if last.as_deref() == Some(self.feed) {
                return Ok::<_, BoxError>(None);
            }
            if let Some(last) = &last {
                tracing::warn!(
                    from = %last,
                    to = self.feed,
                    "the stats were fed from another source at the last start: rebuilding them from the event store"
                );
                let replayed = self.runner.rebuild().await?;
                tracing::info!(replayed, "the stats are rebuilt");
            }
            Ok(Some(tx))
        };
        // Biased: a rebuild that committed in this poll wins over a stop that came with it.
        let mut tx = tokio::select! {
            biased;
            checked = checked => match checked? {
                Some(tx) => tx,
                None => return Ok(true),
            },
            () = shutdown.requested() => return Ok(false),
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.ticket_stats_feed (feed) VALUES ($1)
             ON CONFLICT (one) DO UPDATE SET feed = excluded.feed"
        )))
        .bind(self.feed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl Worker for StatsWorker {
    fn name(&self) -> &str {
        self.runner.name()
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        if !self.switch_feed(&ctx.shutdown).await? {
            return Ok(());
        }
        self.runner.run(ctx).await
    }
}

/// The list index and the stats read model.
fn tables(schema: &str) -> Migration {
    Migration {
        name: "tickets.index_and_stats",
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.ticket_index (
                id uuid PRIMARY KEY,
                created_at timestamptz NOT NULL,
                reporter_id uuid NOT NULL,
                status text NOT NULL,
                priority text NOT NULL,
                assignee_id uuid,
                version bigint NOT NULL,
                summary jsonb NOT NULL
            );
            CREATE INDEX IF NOT EXISTS ticket_index_newest ON {schema}.ticket_index (created_at DESC, id DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_reporter ON {schema}.ticket_index (reporter_id, created_at DESC, id DESC);
            CREATE TABLE IF NOT EXISTS {schema}.ticket_stats (
                ticket_id uuid PRIMARY KEY,
                status text NOT NULL,
                version bigint NOT NULL
            );"
        ),
    }
}

/// Agents' lists by status and by assignee, newest first, without walking the whole list
/// (priority has its own since [`list_by_priority`]). Only tickets with an assignee are in the
/// assignee's index: a filter on one never matches the others.
///
/// Built in the migration's transaction, the indexes hold up writes to the list while they
/// build: seconds for a million tickets. On a large list, build them beforehand with
/// `CREATE INDEX CONCURRENTLY` and these names; the migration then finds them. (Ordered by
/// creation time: [`list_order`] replaces them with indexes by place in the list.)
fn list_filters(schema: &str) -> Migration {
    Migration {
        name: "tickets.list_filters",
        sql: format!(
            "CREATE INDEX IF NOT EXISTS ticket_index_status ON {schema}.ticket_index (status, created_at DESC, id DESC);
            CREATE INDEX IF NOT EXISTS ticket_index_assignee ON {schema}.ticket_index (assignee_id, created_at DESC, id DESC)
                WHERE assignee_id IS NOT NULL;"
        ),
    }
}

/// The transaction-local setting under which the counts trigger does nothing: a rebuild
/// replays every event in one transaction and recounts once at its end.
const RECOUNTING: &str = "helpdesk.ticket_stats_recounting";

/// The count per status, kept by a trigger on `ticket_stats`, so `GET /tickets/stats` reads
/// three rows instead of counting every ticket. Being a trigger, it also counts the writes of
/// an instance built before the counts existed (a rolling upgrade). The migration recounts
/// under a lock that holds up writes to `ticket_stats` (not reads) for the count: counts and
/// statuses agree from its commit on. The trigger is created only where it is missing, so the
/// migration takes no lock that would hold up readers.
fn status_counts(schema: &str) -> Migration {
    Migration {
        name: "tickets.status_counts",
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.ticket_status_counts (
                status text PRIMARY KEY,
                tickets bigint NOT NULL
            );
            CREATE OR REPLACE FUNCTION {schema}.ticket_stats_counted() RETURNS trigger
            LANGUAGE plpgsql AS $$
            DECLARE
                added text;
                removed text;
            BEGIN
                IF current_setting('{RECOUNTING}', true) = 'on' THEN RETURN NULL; END IF;
                IF TG_OP <> 'DELETE' THEN added := NEW.status; END IF;
                IF TG_OP <> 'INSERT' THEN removed := OLD.status; END IF;
                IF added IS NOT DISTINCT FROM removed THEN RETURN NULL; END IF;
                -- The projection's lock serializes its units, and the rows go in status
                -- order all the same: two writers of statuses never wait in a cycle.
                INSERT INTO {schema}.ticket_status_counts AS c (status, tickets)
                SELECT m.status, m.delta
                FROM (VALUES (added, 1::bigint), (removed, -1::bigint)) AS m (status, delta)
                WHERE m.status IS NOT NULL
                ORDER BY m.status
                ON CONFLICT (status) DO UPDATE SET tickets = c.tickets + EXCLUDED.tickets;
                RETURN NULL;
            END
            $$;
            LOCK TABLE {schema}.ticket_stats IN SHARE ROW EXCLUSIVE MODE;
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_trigger
                               WHERE tgrelid = '{schema}.ticket_stats'::regclass
                                 AND tgname = 'ticket_stats_counted') THEN
                    CREATE TRIGGER ticket_stats_counted
                        AFTER INSERT OR DELETE OR UPDATE OF status ON {schema}.ticket_stats
                        FOR EACH ROW EXECUTE FUNCTION {schema}.ticket_stats_counted();
                END IF;
            END
            $$;
            DELETE FROM {schema}.ticket_status_counts;
            INSERT INTO {schema}.ticket_status_counts (status, tickets)
                SELECT status, count(*) FROM {schema}.ticket_stats GROUP BY status;"
        ),
    }
}

fn text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The ticket list in the `ticket_index` table, newest first by `listed`, the position of each
/// ticket's first event (see [`SortKey`]). The command handlers write it in the command's
/// transaction ([`upsert_in`](Self::upsert_in)), so the list and the event store never
/// disagree.
#[derive(Clone, Debug)]
pub struct PgTicketIndex {
    db: PgDatabase,
    upsert: Arc<str>,
}

impl PgTicketIndex {
    /// The index in `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        let schema = db.schema();
        let upsert = format!(
            "INSERT INTO {schema}.ticket_index
                 (id, created_at, reporter_id, status, priority, assignee_id, version, summary, listed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                     -- None yet in the command that opens the ticket: the trigger on `events`
                     -- sets it when the first event is appended, at commit.
                     (SELECT position FROM {schema}.events
                      WHERE stream_id = 'ticket-' || $1::text AND stream_version = 1))
             ON CONFLICT (id) DO UPDATE SET
                 status = EXCLUDED.status, priority = EXCLUDED.priority,
                 assignee_id = EXCLUDED.assignee_id, version = EXCLUDED.version,
                 summary = EXCLUDED.summary,
                 -- A row written without its place (outside a command, before its first
                 -- event committed) takes it at the next change.
                 listed = coalesce({schema}.ticket_index.listed, EXCLUDED.listed)
             WHERE {schema}.ticket_index.version < EXCLUDED.version"
        )
        .into();
        Self { db, upsert }
    }

    /// Adds or replaces a ticket on `conn` (a command's transaction). An older version never
    /// replaces a newer one.
    pub async fn upsert_in(
        &self,
        conn: &mut PgConnection,
        ticket: &Ticket,
    ) -> Result<(), StoreError> {
        let mut summary = ticket.clone();
        summary.comments.clear();
        let summary = serde_json::to_value(&summary).map_err(|e| StoreError::Codec(e.into()))?;
        sqlx::query(AssertSqlSafe(self.upsert.to_string()))
            .bind(ticket.id)
            .bind(ticket.created_at)
            .bind(ticket.reporter_id)
            .bind(text(&ticket.status))
            .bind(text(&ticket.priority))
            .bind(ticket.assignee_id)
            .bind(i64::try_from(ticket.version).unwrap_or(i64::MAX))
            .bind(summary)
            .execute(conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// A pooled connection, for a call outside a command's transaction: given back within
    /// the database's `answer_timeout` when a request gives up on its statement
    /// (`PgDatabase::acquire`; on `pool()`, on a network that drops packets, it was kept for
    /// minutes).
    async fn connection(&self) -> Result<cqrs_postgres::PgPooledConnection, StoreError> {
        self.db.acquire().await.map_err(|e| self.db.store_error(e))
    }

    /// The reporter of ticket `id` as the index row on `conn` has it (a command's
    /// transaction, which wrote the row with the ticket's events), if there is a row.
    pub async fn reporter_in(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT reporter_id FROM {}.ticket_index WHERE id = $1",
            self.db.schema()
        )))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(store_error)
    }
}

#[async_trait]
impl TicketIndex for PgTicketIndex {
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError> {
        self.upsert_in(&mut *self.connection().await?, ticket).await
    }

    async fn reporter_of(&self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        self.reporter_in(&mut *self.connection().await?, id).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Listed>, StoreError> {
        // A row without its place yet is one whose command has not committed (or a row
        // written outside a command before its events): not listed.
        let mut q = QueryBuilder::new(format!(
            "SELECT listed, summary FROM {}.ticket_index WHERE listed IS NOT NULL",
            self.db.schema()
        ));
        if let Some(reporter) = filter.reporter_id {
            q.push(" AND reporter_id = ").push_bind(reporter);
        }
        if let Some(status) = filter.status {
            q.push(" AND status = ").push_bind(text(&status));
        }
        if let Some(priority) = filter.priority {
            q.push(" AND priority = ").push_bind(text(&priority));
        }
        if let Some(assignee) = filter.assignee_id {
            q.push(" AND assignee_id = ").push_bind(assignee);
        }
        if let Some(after) = after {
            q.push(" AND listed < ")
                .push_bind(i64::try_from(after).unwrap_or(i64::MAX));
        }
        q.push(" ORDER BY listed DESC LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = q
            .build()
            .fetch_all(&mut *self.connection().await?)
            .await
            .map_err(|e| self.db.store_error(e))?;
        rows.into_iter()
            .map(|row| {
                let listed: i64 = row.try_get(0).map_err(store_error)?;
                let summary: serde_json::Value = row.try_get(1).map_err(store_error)?;
                Ok(Listed {
                    key: SortKey::try_from(listed).unwrap_or_default(),
                    ticket: serde_json::from_value(summary)
                        .map_err(|e| StoreError::Codec(e.into()))?,
                })
            })
            .collect()
    }
}

/// The stats read model in the `ticket_stats` table (each ticket's status and the version it
/// was set at), written in the projection unit's transaction with the inbox entry: each event
/// takes effect once, across redeliveries and instances. A trigger keeps the count per status
/// in `ticket_status_counts` in the same transaction, so reading the stats costs three rows.
/// Units that move tickets between statuses wait for each other on those rows until they
/// commit: the stats projection's writes are serialized, its reads never wait.
#[derive(Clone, Debug)]
pub struct PgStats {
    db: PgDatabase,
}

impl PgStats {
    /// The stats in `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }
}

#[async_trait]
impl Projection<PgProjectionStore> for PgStats {
    fn name(&self) -> &str {
        "tickets.stats"
    }

    async fn apply(
        &self,
        unit: &mut PgProjectionUnit,
        envelope: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Some(event) = TicketEvent::from_envelope(envelope) else {
            return Ok(());
        };
        let (id, status) = match &event {
            TicketEvent::Opened(e) => (e.ticket_id, Status::Open),
            TicketEvent::Assigned(e) => (e.ticket_id, Status::Assigned),
            TicketEvent::Closed(e) => (e.ticket_id, Status::Closed),
            TicketEvent::Commented(_) => return Ok(()),
        };
        let version = envelope
            .stream_version()
            .map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX));
        // A version guard on top of the transport's per-ticket order: an older event never
        // overwrites a newer status.
        let sql = format!(
            "INSERT INTO {schema}.ticket_stats (ticket_id, status, version) VALUES ($1, $2, $3)
             ON CONFLICT (ticket_id) DO UPDATE SET status = EXCLUDED.status, version = EXCLUDED.version
             WHERE {schema}.ticket_stats.version < EXCLUDED.version",
            schema = self.db.schema()
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(text(&status))
            .bind(version)
            .execute(unit.connection())
            .await
            .map_err(|e| HandlerError::from(store_error(e)))?;
        Ok(())
    }

    async fn reset(&self, unit: &mut PgProjectionUnit) -> Result<(), HandlerError> {
        // The counts trigger stands aside for the rest of the rebuild's transaction: moved
        // event by event, the three count rows would take a new version per event in one
        // transaction, which Postgres cannot clean up before it ends, and each move would
        // step over all the earlier ones. `rebuilt` counts once instead.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET LOCAL {RECOUNTING} = 'on';
             DELETE FROM {schema}.ticket_stats;
             DELETE FROM {schema}.ticket_status_counts",
            schema = self.db.schema()
        )))
        .execute(unit.connection())
        .await
        .map_err(|e| HandlerError::from(store_error(e)))?;
        Ok(())
    }

    async fn rebuilt(&self, unit: &mut PgProjectionUnit) -> Result<(), HandlerError> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT INTO {schema}.ticket_status_counts (status, tickets)
                 SELECT status, count(*) FROM {schema}.ticket_stats GROUP BY status;
             SET LOCAL {RECOUNTING} = 'off'",
            schema = self.db.schema()
        )))
        .execute(unit.connection())
        .await
        .map_err(|e| HandlerError::from(store_error(e)))?;
        Ok(())
    }
}

#[async_trait]
impl StatsReader for PgStats {
    async fn stats(&self) -> Result<Stats, HandlerError> {
        let mut conn = self
            .db
            .acquire()
            .await
            .map_err(|e| self.db.store_error(e))?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT status, tickets FROM {}.ticket_status_counts",
            self.db.schema()
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| HandlerError::from(self.db.store_error(e)))?;
        let mut stats = Stats::default();
        for row in rows {
            let status: String = row
                .try_get(0)
                .map_err(|e| HandlerError::from(store_error(e)))?;
            let count: i64 = row
                .try_get(1)
                .map_err(|e| HandlerError::from(store_error(e)))?;
            let count = u64::try_from(count).unwrap_or_default();
            match status.as_str() {
                "open" => stats.open = count,
                "assigned" => stats.assigned = count,
                "closed" => stats.closed = count,
                _ => {}
            }
        }
        Ok(stats)
    }
}
