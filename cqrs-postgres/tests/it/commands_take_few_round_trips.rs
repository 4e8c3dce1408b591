//! The round trips a command costs, counted at the wire on a warm connection: a handler that
//! only records events costs 1, one that runs `n` statements `n + 3` (with events or
//! without), each further stream among its events 1 more (and, for a handler that ran no
//! statement, `BEGIN` and `COMMIT` too), an idempotent one `n + 4`, a replay 3, a plain
//! append 1.

use crate::proxy::Proxy;
use crate::support::tickets::{self, Note, NoteHandler, OpenTicket, OpenTicketHandler, Then};
use crate::support::{database_url, postgres_available, record};
use cqrs_core::ports::{EventStore, ExpectedVersion, StoredResponse};
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, HandlerError, Message, Metadata,
    async_trait,
};
use cqrs_postgres::{IdempotencyKey, Idempotent, PgCommandExecutor, PgDatabase, PgUnitOfWork};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use std::str::FromStr;
use std::time::Duration;

/// Inserts a ticket and records nothing.
#[derive(Debug)]
struct Touch(String);

impl Message for Touch {
    const NAME: &'static str = "test.touch";
}

impl Command for Touch {
    type Output = ();
}

struct TouchHandler;

#[async_trait]
impl CommandHandler<Touch> for TouchHandler {
    async fn handle(&self, cmd: Touch, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        let uow = PgUnitOfWork::from_context(ctx)?;
        let insert = format!(
            "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, '')",
            uow.database().schema()
        );
        sqlx::query(AssertSqlSafe(insert))
            .bind(cmd.0)
            .execute(uow.connection().await?)
            .await
            .map_err(HandlerError::internal)?;
        Ok(())
    }
}

/// Records one event in each of two streams, after inserting a ticket when `insert` is set.
#[derive(Debug)]
struct TwoStreams {
    key: String,
    insert: bool,
}

impl TwoStreams {
    fn new(key: &str, insert: bool) -> Self {
        Self {
            key: key.to_owned(),
            insert,
        }
    }
}

impl Message for TwoStreams {
    const NAME: &'static str = "test.two_streams";
}

impl Command for TwoStreams {
    type Output = ();
}

struct TwoStreamsHandler;

#[async_trait]
impl CommandHandler<TwoStreams> for TwoStreamsHandler {
    async fn handle(&self, cmd: TwoStreams, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        if cmd.insert {
            TouchHandler.handle(Touch(cmd.key.clone()), ctx).await?;
        }
        for stream in ["a", "b"] {
            ctx.record_keyed(
                format!("{stream}-{}", cmd.key),
                tickets::TicketOpened {
                    id: cmd.key.clone(),
                    title: String::new(),
                },
            );
        }
        Ok(())
    }
}

async fn measure<F: std::future::Future>(proxy: &Proxy, work: F) -> (usize, F::Output) {
    proxy.settle().await;
    let before = proxy.round_trips();
    let out = work.await;
    // Read before anything else runs: the pool's ping of the released connection is spawned
    // and this test runs on one thread.
    (proxy.round_trips() - before, out)
}

#[tokio::test(flavor = "current_thread")]
async fn each_command_costs_the_documented_round_trips() {
    if !postgres_available().await {
        return;
    }
    let id = cqrs_core::testing::test_id("round_trips");
    // Boxed: the body holds every future of the test at once.
    cqrs_core::testing::with_timeout(
        Duration::from_secs(60),
        Box::pin(async {
            let url = database_url();
            let direct = PgConnectOptions::from_str(&url).expect("DATABASE_URL parses");
            let proxy = Proxy::start(format!("{}:{}", direct.get_host(), direct.get_port())).await;
            let through_proxy = direct
                .clone()
                .host("127.0.0.1")
                .port(proxy.addr.port())
                .ssl_mode(PgSslMode::Disable);
            // One connection, so every statement is prepared once and then reused, and the same
            // defaults as `PgOptions` (no ping before a checkout).
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_with(through_proxy)
                .await
                .expect("connect through the proxy");
            let db = PgDatabase::from_pool(pool, &id).expect("a valid schema");
            db.migrate().await.expect("migrate");
            tickets::create_table(&db).await;

            let bus = CommandBus::builder()
                .layer(db.command_layer())
                .handler(OpenTicketHandler::default())
                .handler(NoteHandler)
                .handler(TouchHandler)
                .handler(TwoStreamsHandler)
                .build()
                .unwrap();
            let executor = PgCommandExecutor::new(bus.clone(), db.clone());
            let store = db.event_store();
            let respond = |id: &String| StoredResponse::new(201, serde_json::json!({ "id": id }));
            let key = |k: &str| IdempotencyKey::new("rt", k, "fp", Duration::from_secs(60));

            // Warm up: prepare every statement on the connection.
            bus.dispatch(Note("warm")).await.unwrap();
            bus.dispatch(OpenTicket::new("warm", Then::Succeed))
                .await
                .unwrap();
            bus.dispatch(Touch("warm-touch".into())).await.unwrap();
            bus.dispatch(TwoStreams::new("warm-two", true))
                .await
                .unwrap();
            executor
                .execute_idempotent(
                    &key("warm"),
                    OpenTicket::new("warm-i", Then::Succeed),
                    Metadata::new(),
                    respond,
                )
                .await
                .unwrap();
            executor
                .execute_idempotent(
                    &key("warm"),
                    OpenTicket::new("warm-i", Then::Succeed),
                    Metadata::new(),
                    respond,
                )
                .await
                .unwrap();
            // One event and a batch take different statements.
            store
                .append("warm", ExpectedVersion::Any, vec![record(0)])
                .await
                .unwrap();
            store
                .append("warm", ExpectedVersion::Any, vec![record(0), record(1)])
                .await
                .unwrap();

            let (n, _) = measure(&proxy, bus.dispatch(Note("n1"))).await;
            assert_eq!(n, 1, "a handler that only records events: the append");

            let (n, _) = measure(&proxy, bus.dispatch(OpenTicket::new("t1", Then::Succeed))).await;
            assert_eq!(
                n, 4,
                "one statement of its own: BEGIN, INSERT, append, COMMIT"
            );

            let (n, _) = measure(&proxy, bus.dispatch(Touch("t0".into()))).await;
            assert_eq!(
                n, 4,
                "one statement of its own and no events: BEGIN, INSERT, SELECT (none failed), COMMIT"
            );

            let (n, _) = measure(&proxy, bus.dispatch(TwoStreams::new("t3", false))).await;
            assert_eq!(
                n, 4,
                "events in two streams and nothing else: BEGIN, append, append, COMMIT"
            );

            let (n, _) = measure(&proxy, bus.dispatch(TwoStreams::new("t4", true))).await;
            assert_eq!(
                n, 5,
                "one statement of its own and events in two streams: BEGIN, INSERT, append, \
                 append, COMMIT"
            );

            let (n, done) = measure(
                &proxy,
                executor.execute_idempotent(
                    &key("k1"),
                    OpenTicket::new("t2", Then::Succeed),
                    Metadata::new(),
                    respond,
                ),
            )
            .await;
            assert!(matches!(done.unwrap(), Idempotent::Executed { .. }));
            assert_eq!(
                n, 5,
                "idempotent: BEGIN, claim, INSERT, append + response, COMMIT"
            );

            let (n, done) = measure(
                &proxy,
                executor.execute_idempotent(
                    &key("k1"),
                    OpenTicket::new("t2", Then::Succeed),
                    Metadata::new(),
                    respond,
                ),
            )
            .await;
            assert!(matches!(done.unwrap(), Idempotent::Replayed(_)));
            assert_eq!(n, 3, "a replay: BEGIN, claim, ROLLBACK");

            let (n, _) = measure(
                &proxy,
                store.append("s1", ExpectedVersion::NO_STREAM, vec![record(1), record(2)]),
            )
            .await;
            assert_eq!(n, 1, "an append of a batch: one statement");

            db.drop_schema().await.unwrap();
        }),
    )
    .await;
}
