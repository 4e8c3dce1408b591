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
    logs::install();
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

pub(crate) mod logs {
    //! What the binary's tests log, kept by one global subscriber installed before any test
    //! logs (by [`postgres_available`](super::postgres_available), which every test calls
    //! first).
    //!
    //! Not a thread's default (`set_default`): tracing caches whether a log line is wanted
    //! once per line, the first time it is reached, and while a single thread default is
    //! registered it asks only the reaching thread's subscriber. Another test reaching the
    //! line first, on a thread with none, then turned it off for good, and the capturing test
    //! saw nothing (the migration lock's wait, which every test migrating meanwhile logs too,
    //! went missing one run in six).

    use std::sync::{Mutex, MutexGuard, OnceLock};
    use tracing::subscriber::Interest;
    use tracing::{Event, Metadata, Subscriber};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    /// One kept log line.
    #[derive(Clone, Debug)]
    pub(crate) struct Logged {
        pub(crate) target: String,
        /// Its fields, `name=value` each, the message's included.
        pub(crate) fields: String,
        /// The names of the test-opened spans it was logged in.
        pub(crate) spans: Vec<&'static str>,
    }

    /// What is kept: this crate's lines at `INFO` and above, sqlx's statements that append
    /// events, and the spans the tests open (for [`Logged::spans`]).
    fn wanted(metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        if metadata.is_span() {
            return target.starts_with("it::");
        }
        target == "sqlx::query"
            || (target.starts_with("cqrs_postgres") && *metadata.level() <= tracing::Level::INFO)
    }

    struct Keep(&'static Mutex<Vec<Logged>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Keep {
        fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
            if wanted(metadata) {
                Interest::always()
            } else {
                Interest::never()
            }
        }

        fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
            wanted(metadata)
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            let target = event.metadata().target();
            // Of sqlx's statements, only the appends are asked about.
            if target == "sqlx::query" && !fields.0.contains("append_event") {
                return;
            }
            let spans = ctx
                .event_scope(event)
                .map(|scope| scope.map(|span| span.name()).collect())
                .unwrap_or_default();
            self.0.lock().unwrap().push(Logged {
                target: target.to_owned(),
                fields: fields.0,
                spans,
            });
        }
    }

    struct Fields(String);

    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }

    fn store() -> &'static Mutex<Vec<Logged>> {
        static KEPT: OnceLock<&'static Mutex<Vec<Logged>>> = OnceLock::new();
        KEPT.get_or_init(|| {
            let kept: &'static Mutex<Vec<Logged>> = Box::leak(Box::default());
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(Keep(kept)),
            )
            .expect("no other test of this binary installs a global subscriber");
            kept
        })
    }

    /// Installs the subscriber, once.
    pub(crate) fn install() {
        store();
    }

    /// Every line kept so far, by every test of the binary: filter by the test's schema.
    pub(crate) fn kept() -> MutexGuard<'static, Vec<Logged>> {
        store().lock().unwrap()
    }
}
