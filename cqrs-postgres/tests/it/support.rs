//! What every test needs: the server, a schema of its own, small fixtures.

use cqrs_core::{EventRecord, Metadata, RecordMetadata};
use cqrs_postgres::{PgDatabase, PgOptions};
use std::time::Duration;
use tokio::sync::OnceCell;

/// `DATABASE_URL`, or the local server the test machines run.
pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

static REACHABLE: OnceCell<bool> = OnceCell::const_new();

/// Whether Postgres answers; when it does not, prints why the test is skipped, or fails when
/// `CQRS_REQUIRE_SERVICES=1`.
pub(crate) async fn postgres_available() -> bool {
    *REACHABLE
        .get_or_init(|| async {
            let url = database_url();
            let probe = PgOptions::new(url.clone())
                .max_connections(1)
                // A loaded machine may take seconds to open a first session. (sqlx retries a
                // refused connection until this runs out: a server that is down costs the
                // test binary 20 s, once, before it skips or fails.)
                .acquire_timeout(Duration::from_secs(20))
                .connect();
            let reachable = matches!(
                tokio::time::timeout(Duration::from_secs(30), probe).await,
                Ok(Ok(_))
            );
            cqrs_core::testing::require_services("postgres", &url, reachable)
        })
        .await
}

/// A database handle on a fresh, migrated schema named after the test id, or `None` when
/// Postgres is unreachable (the test is skipped).
pub(crate) async fn schema(test_id: &str) -> Option<PgDatabase> {
    if !postgres_available().await {
        return None;
    }
    let db = options(test_id)
        .connect()
        .await
        .expect("connect to postgres");
    db.migrate().await.expect("migrate the test schema");
    Some(db)
}

/// Options for a test schema: a pool large enough for the concurrency scenarios.
pub(crate) fn options(test_id: &str) -> PgOptions {
    PgOptions::new(database_url())
        .schema(test_id)
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(20))
        .application_name(format!("cqrs-test {test_id}"))
}

/// A record of type `Noted` with `{"n": n}`.
pub(crate) fn record(n: u64) -> EventRecord {
    let metadata = Metadata::new();
    EventRecord::new(
        metadata.message_id,
        "Noted",
        1,
        serde_json::json!({ "n": n }),
        RecordMetadata::from_metadata(&metadata),
    )
}

/// Runs a test body against a fresh schema, within a time limit, and drops the schema when
/// the body passed (a failed test leaves it for inspection, named by the test id).
macro_rules! pg_test {
    ($(#[$meta:meta])* async fn $name:ident($db:ident: PgDatabase) $body:block) => {
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let id = cqrs_core::testing::test_id(stringify!($name));
            let Some($db) = $crate::support::schema(&id).await else {
                return;
            };
            let cleanup = $db.clone();
            cqrs_core::testing::with_timeout(std::time::Duration::from_secs(60), async move $body)
                .await;
            cleanup.drop_schema().await.expect("drop the test schema");
        }
    };
}

pub(crate) use pg_test;

pub(crate) mod tickets {
    //! A command whose handler writes a row and records an event, and fails, panics or hangs
    //! on request.

    use cqrs_core::{
        Command, CommandContext, CommandHandler, Event, HandlerError, Message, async_trait,
    };
    use cqrs_postgres::{PgDatabase, PgUnitOfWork};
    use serde::{Deserialize, Serialize};
    use sqlx::AssertSqlSafe;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What the handler does after its writes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Then {
        Succeed,
        Fail,
        Panic,
        Hang,
    }

    #[derive(Debug)]
    pub(crate) struct OpenTicket {
        pub id: String,
        pub title: String,
        pub then: Then,
    }

    impl OpenTicket {
        pub(crate) fn new(id: &str, then: Then) -> Self {
            Self {
                id: id.to_owned(),
                title: format!("ticket {id}"),
                then,
            }
        }
    }

    impl Message for OpenTicket {
        const NAME: &'static str = "test.open_ticket";
    }

    impl Command for OpenTicket {
        type Output = String;
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct TicketOpened {
        pub id: String,
        pub title: String,
    }

    impl Message for TicketOpened {
        const NAME: &'static str = "TicketOpened";
    }

    impl Event for TicketOpened {}

    /// Inserts into `{schema}.tickets` through the unit of work and records `TicketOpened`
    /// keyed by the ticket id.
    #[derive(Clone, Default)]
    pub(crate) struct OpenTicketHandler {
        pub runs: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl CommandHandler<OpenTicket> for OpenTicketHandler {
        async fn handle(
            &self,
            cmd: OpenTicket,
            ctx: &mut CommandContext,
        ) -> Result<String, HandlerError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let uow = PgUnitOfWork::from_context(ctx)?;
            let insert = format!(
                "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, $2)",
                uow.database().schema()
            );
            sqlx::query(AssertSqlSafe(insert))
                .bind(&cmd.id)
                .bind(&cmd.title)
                .execute(uow.connection().await?)
                .await
                .map_err(HandlerError::internal)?;
            ctx.record_keyed(
                cmd.id.clone(),
                TicketOpened {
                    id: cmd.id.clone(),
                    title: cmd.title,
                },
            );
            match cmd.then {
                Then::Succeed => Ok(cmd.id),
                Then::Fail => Err(HandlerError::invalid("refused", "the handler refused")),
                Then::Panic => panic!("the handler panicked on purpose"),
                Then::Hang => {
                    std::future::pending::<()>().await;
                    Ok(cmd.id)
                }
            }
        }
    }

    /// Records `TicketOpened` keyed by its id and touches nothing else: its append is the
    /// command's only statement, its own transaction.
    #[derive(Debug)]
    pub(crate) struct Note(pub &'static str);

    impl Message for Note {
        const NAME: &'static str = "test.note";
    }

    impl Command for Note {
        type Output = ();
    }

    pub(crate) struct NoteHandler;

    #[async_trait]
    impl CommandHandler<Note> for NoteHandler {
        async fn handle(&self, cmd: Note, ctx: &mut CommandContext) -> Result<(), HandlerError> {
            ctx.record_keyed(
                cmd.0,
                TicketOpened {
                    id: cmd.0.to_owned(),
                    title: String::new(),
                },
            );
            Ok(())
        }
    }

    /// Creates the application's table beside the framework's.
    pub(crate) async fn create_table(db: &PgDatabase) {
        let create = format!(
            "CREATE TABLE \"{}\".tickets (id text PRIMARY KEY, title text NOT NULL)",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(create))
            .execute(db.pool())
            .await
            .expect("create the tickets table");
    }

    /// How many tickets are stored.
    pub(crate) async fn count(db: &PgDatabase) -> i64 {
        let count = format!("SELECT count(*) FROM \"{}\".tickets", db.schema());
        sqlx::query_scalar(AssertSqlSafe(count))
            .fetch_one(db.pool())
            .await
            .expect("count tickets")
    }
}

/// Whether one of this test's sessions (its schema's `application_name`) waits on a lock
/// another holds.
pub(crate) async fn someone_waits(db: &PgDatabase) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
         WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1)",
    )
    .bind(format!("cqrs-test {}", db.schema()))
    .fetch_one(db.pool())
    .await
    .expect("ask whether a session waits")
}

/// How many events the schema's store holds.
pub(crate) async fn event_count(db: &PgDatabase) -> usize {
    use cqrs_core::ports::EventStore;
    let mut after = cqrs_core::Position::START;
    let mut n = 0;
    loop {
        let page = db
            .event_store()
            .read_all(after, 1000)
            .await
            .expect("read_all");
        let Some(last) = page.last().and_then(|r| r.position) else {
            return n;
        };
        n += page.len();
        after = last;
    }
}
