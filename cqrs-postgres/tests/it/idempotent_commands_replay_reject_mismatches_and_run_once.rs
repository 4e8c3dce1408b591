//! Idempotent commands through `PgCommandExecutor`: the key is held by the command's own
//! transaction, so a replay returns the stored response, a reused key with another request is
//! refused, concurrent duplicates run the work once, and a failed command frees the key.

use crate::support::pg_test;
use crate::support::tickets::{self, OpenTicket, OpenTicketHandler, Then};
use cqrs_core::ports::{EventStore, StoredResponse};
use cqrs_core::{CommandBus, ErrorKind, Metadata};
use cqrs_postgres::{IdempotencyKey, Idempotent, PgCommandExecutor, PgDatabase};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const DAY: Duration = Duration::from_secs(86_400);

fn respond(id: &String) -> StoredResponse {
    StoredResponse::new(201, serde_json::json!({ "id": id }))
}

fn executor(db: &PgDatabase, handler: OpenTicketHandler) -> PgCommandExecutor {
    let bus = CommandBus::builder()
        .layer(db.command_layer())
        .handler(handler)
        .build()
        .unwrap();
    PgCommandExecutor::new(bus, db.clone())
}

pg_test! {
    async fn a_repeated_request_replays_and_another_request_with_the_key_is_refused(db: PgDatabase) {
        tickets::create_table(&db).await;
        let handler = OpenTicketHandler::default();
        let executor = executor(&db, handler.clone());
        let key = IdempotencyKey::new("POST /tickets", "k1", "fp-1", DAY);

        let first = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap();
        let Idempotent::Executed { output, response, .. } = first else {
            panic!("the first request runs");
        };
        assert_eq!(output, "t1");
        assert_eq!(response, respond(&"t1".to_owned()));

        let again = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap();
        assert!(matches!(again, Idempotent::Replayed(ref r) if *r == response), "{again:?}");

        let other = IdempotencyKey::new("POST /tickets", "k1", "fp-2", DAY);
        let refused = executor
            .execute_idempotent(&other, OpenTicket::new("t9", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Invalid, "{refused}");
        assert_eq!(refused.handler_error().map(|e| e.code()), Some("idempotency_key_reused"));

        assert_eq!(handler.runs.load(Ordering::SeqCst), 1, "the work ran once");
        assert_eq!(tickets::count(&db).await, 1);
    }
}

pg_test! {
    async fn concurrent_duplicates_wait_for_the_first_and_replay_its_response(db: PgDatabase) {
        tickets::create_table(&db).await;
        // The duplicates take the key one at a time: on a loaded machine the last ones can
        // wait longer than the default claim wait.
        let db = db.with_claim_wait(Duration::from_secs(60));
        let handler = OpenTicketHandler::default();
        let executor = Arc::new(executor(&db, handler.clone()));
        let key = IdempotencyKey::new("POST /tickets", "same", "fp", DAY);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (executor, key) = (executor.clone(), key.clone());
                tokio::spawn(async move {
                    executor
                        .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
                        .await
                        .map(|done| done.response().clone())
                })
            })
            .collect();
        for task in tasks {
            let response = task.await.unwrap().expect("every duplicate gets the response");
            assert_eq!(response, respond(&"t1".to_owned()));
        }
        assert_eq!(handler.runs.load(Ordering::SeqCst), 1, "the work ran once");
        assert_eq!(tickets::count(&db).await, 1);
    }
}

pg_test! {
    async fn a_failed_command_releases_its_key_and_writes_nothing(db: PgDatabase) {
        tickets::create_table(&db).await;
        let handler = OpenTicketHandler::default();
        let executor = executor(&db, handler.clone());
        let key = IdempotencyKey::new("POST /tickets", "k", "fp", DAY);

        for then in [Then::Fail, Then::Panic] {
            let err = executor
                .execute_idempotent(&key, OpenTicket::new("t1", then), Metadata::new(), respond)
                .await
                .unwrap_err();
            assert_ne!(err.kind(), ErrorKind::Conflict, "{err}");
        }
        assert_eq!(tickets::count(&db).await, 0);
        assert_eq!(crate::support::event_count(&db).await, 0);

        let retried = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap();
        assert!(matches!(retried, Idempotent::Executed { .. }), "the key was free again");
        assert_eq!(handler.runs.load(Ordering::SeqCst), 3);
        assert_eq!(tickets::count(&db).await, 1);
        assert_eq!(crate::support::event_count(&db).await, 1);
    }
}

/// Appends `events` records to stream `s-conflict` at `expected`, through the command's unit
/// of work.
#[derive(cqrs_core::Command)]
#[cqrs(name = "test.append_at", output = String)]
struct AppendAt {
    expected: cqrs_core::ports::ExpectedVersion,
    events: u64,
}

struct AppendAtHandler;

#[async_trait::async_trait]
impl cqrs_core::CommandHandler<AppendAt> for AppendAtHandler {
    async fn handle(
        &self,
        cmd: AppendAt,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<String, cqrs_core::HandlerError> {
        let uow = cqrs_postgres::PgUnitOfWork::from_context(ctx)?;
        let records = (1..=cmd.events)
            .map(cqrs_core::testing::event_store::record)
            .collect();
        uow.append("s-conflict", cmd.expected, records);
        Ok("appended".to_owned())
    }
}

pg_test! {
    /// A command whose append meets a conflict (a stale expected version) at the commit stores
    /// nothing, its key included: the statement that appends also completes the key, and only
    /// the rollback keeps that completion out. The retry with the key runs again (it would
    /// replay a success whose events were never stored).
    async fn a_command_whose_append_conflicts_frees_its_key_and_stores_nothing(db: PgDatabase) {
        use cqrs_core::ports::ExpectedVersion;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(AppendAtHandler)
            .build()
            .unwrap();
        let executor = PgCommandExecutor::new(bus, db.clone());
        let answer = |_: &String| StoredResponse::new(201, serde_json::json!("appended"));
        for events in [1, 3] {
            let key = IdempotencyKey::new("s", format!("k{events}"), "fp", DAY);
            let stale = AppendAt { expected: ExpectedVersion::Exactly(5), events };
            let err = executor
                .execute_idempotent(&key, stale, Metadata::new(), answer)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
            assert_eq!(crate::support::event_count(&db).await, if events == 1 { 0 } else { 1 });
            let at = db.event_store().stream_version("s-conflict").await.unwrap();
            let fresh = AppendAt { expected: ExpectedVersion::Exactly(at), events };
            let retried = executor
                .execute_idempotent(&key, fresh, Metadata::new(), answer)
                .await
                .unwrap();
            assert!(
                matches!(retried, Idempotent::Executed { .. }),
                "the key was kept by the conflicting attempt: {retried:?}"
            );
        }
        assert_eq!(crate::support::event_count(&db).await, 4);
    }
}

pg_test! {
    async fn an_executor_over_a_bus_without_the_layer_says_so(db: PgDatabase) {
        let bus = CommandBus::builder().handler(OpenTicketHandler::default()).build().unwrap();
        let executor = PgCommandExecutor::new(bus, db.clone());
        let key = IdempotencyKey::new("s", "k", "fp", DAY);
        let err = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("command_layer"), "{err}");
    }
}

pg_test! {
    /// An executor made with another schema's database than the bus's layer would run the
    /// command in a transaction on the wrong schema, whose relay nobody runs: refused, naming
    /// both, before anything is written.
    async fn an_executor_for_another_schema_than_the_layer_is_refused(db: PgDatabase) {
        tickets::create_table(&db).await;
        let other = crate::support::schema(&format!("{}_x", db.schema())).await.unwrap();
        let handler = OpenTicketHandler::default();
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(handler.clone())
            .build()
            .unwrap();
        let executor = PgCommandExecutor::new(bus, other.clone());
        let key = IdempotencyKey::new("POST /tickets", "k1", "fp-1", DAY);
        let refused = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains(db.schema()) && message.contains(other.schema()),
            "{message}"
        );
        assert_eq!(handler.runs.load(Ordering::SeqCst), 0, "the handler did not run");
        other.drop_schema().await.unwrap();
    }
}

pg_test! {
    /// The same check across databases: an executor whose database is another one (another
    /// server, or another database on it) under the same schema name (the default `cqrs`,
    /// likely) would run the command there, where this layer's relay never ships its events.
    /// Refused, naming both places, before anything is written.
    async fn an_executor_for_another_database_with_the_same_schema_is_refused(db: PgDatabase) {
        tickets::create_table(&db).await;
        // The same schema name in the server's `postgres` database (another, when the tests
        // run in that one).
        let mut url = url::Url::parse(&crate::support::database_url()).unwrap();
        let other_database = if url.path() == "/postgres" { "/template1" } else { "/postgres" };
        url.set_path(other_database);
        let other = cqrs_postgres::PgOptions::new(url.as_str())
            .schema(db.schema())
            .connect()
            .await
            .unwrap();
        other.migrate().await.unwrap();
        tickets::create_table(&other).await;
        let handler = OpenTicketHandler::default();
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(handler.clone())
            .build()
            .unwrap();
        let executor = PgCommandExecutor::new(bus, other.clone());
        let key = IdempotencyKey::new("POST /tickets", "k1", "fp-1", DAY);
        let outcome = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .map(|_| ());
        // Dropped before any assertion: the schema is in a database the tests' cleanup
        // does not visit.
        other.drop_schema().await.unwrap();
        let message = outcome.unwrap_err().to_string();
        let named = format!("database `{}`", &other_database[1..]);
        assert!(message.contains(&named), "{message}");
        assert!(!db.is_same_store(&other) && db.is_same_store(&db.clone()));
        assert_eq!(handler.runs.load(Ordering::SeqCst), 0, "the handler did not run");
    }
}

pg_test! {
    /// A claim's transaction stays open while the caller works outside it. Under the pool's
    /// `idle_in_transaction_timeout` the server used to end it mid-work, so a duplicate took
    /// the key and ran the work a second time and the first `complete` failed; the claim now
    /// holds the key however long the work takes.
    async fn a_claim_holds_its_key_past_the_idle_in_transaction_timeout(db: PgDatabase) {
        use cqrs_core::ports::{Claim, IdempotencyStore};
        let short = crate::support::options(db.schema())
            .idle_in_transaction_timeout(Some(Duration::from_millis(300)))
            .connect()
            .await
            .unwrap();
        let store = short.idempotency_store();
        let Claim::New(guard) = store.claim("s", "k", "fp", DAY).await.unwrap() else {
            panic!("a fresh key is new");
        };
        // The work: idle in the claim's transaction for several times the timeout (this wait
        // is the scenario, not a hope that something happened).
        tokio::time::sleep(Duration::from_millis(1200)).await;

        let duplicate = {
            let store = store.clone();
            tokio::spawn(async move { store.claim("s", "k", "fp", DAY).await })
        };
        // The duplicate waits on the key: the first claim's session is still there.
        // (This test's own sessions carry its id as their application name.)
        let mine = format!("cqrs-test {}", db.schema());
        cqrs_core::testing::eventually(Duration::from_secs(10), "the duplicate waits on the key", || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1",
            )
            .bind(&mine)
            .fetch_one(db.pool())
            .await
            .unwrap();
            (waiting > 0 || duplicate.is_finished()).then_some(())
        })
        .await;
        assert!(!duplicate.is_finished(), "the duplicate took the key while the work ran");
        guard
            .complete(StoredResponse::new(201, serde_json::json!({ "id": "t1" })))
            .await
            .expect("the claim's transaction survived the wait");
        match duplicate.await.unwrap().unwrap() {
            Claim::Replay(response) => assert_eq!(response.status, 201),
            Claim::New(_) => panic!("the work would run twice"),
        }
    }
}

pg_test! {
    /// A response the server made that Postgres cannot store (too deep, or holding U+0000) is
    /// the server's fault, not the client's: `Internal`, not the `Invalid` a stored value that
    /// cannot be is; nothing commits, and the key stays free.
    async fn a_response_too_deep_to_store_is_an_internal_error(db: PgDatabase) {
        tickets::create_table(&db).await;
        let handler = OpenTicketHandler::default();
        let executor = executor(&db, handler.clone());
        let key = IdempotencyKey::new("POST /tickets", "deep", "fp", DAY);
        let deep = |_: &String| {
            let body = (0..200).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
            StoredResponse::new(201, body)
        };
        let err = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), deep)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        let nul = |_: &String| StoredResponse::new(201, serde_json::json!({ "t": "a\u{0}" }));
        let err = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), nul)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        assert_eq!(tickets::count(&db).await, 0);
        let retried = executor
            .execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap();
        assert!(matches!(retried, Idempotent::Executed { .. }), "the key was free");
    }
}

/// Whether one of this test's sessions is in a transaction, idle (a handler that hangs).
async fn a_transaction_idles(db: &PgDatabase) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
         WHERE state = 'idle in transaction' AND application_name = $1)",
    )
    .bind(format!("cqrs-test {}", db.schema()))
    .fetch_one(db.pool())
    .await
    .expect("ask whether a transaction idles")
}

pg_test! {
    /// A duplicate of a command still running waits at most the claim wait, then says why it
    /// gives up; one whose caller gives up while it waits frees its connection within the
    /// claim wait. (Unbounded and in the caller's future, the duplicate waited as long as the
    /// first command ran, and one given up kept its connection that long.)
    async fn a_duplicate_of_a_running_command_waits_at_most_the_claim_wait(db: PgDatabase) {
        tickets::create_table(&db).await;
        // Two connections: the running command's, and the one a duplicate waits on.
        let small = crate::support::options(db.schema())
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect")
            .with_claim_wait(Duration::from_secs(2));
        let handler = OpenTicketHandler::default();
        let executor = Arc::new(executor(&small, handler.clone()));
        let key = IdempotencyKey::new("POST /tickets", "slow", "fp", DAY);
        let running = tokio::spawn({
            let (executor, key) = (executor.clone(), key.clone());
            async move {
                let hangs = OpenTicket::new("t1", Then::Hang);
                executor.execute_idempotent(&key, hangs, Metadata::new(), respond).await
            }
        });
        // Its handler runs, so its claim holds the key (a transaction idles right after its
        // `BEGIN` too, before the claim), and hangs.
        cqrs_core::testing::eventually(Duration::from_secs(10), "the first command runs", || async {
            (handler.runs.load(Ordering::SeqCst) == 1 && a_transaction_idles(&db).await).then_some(())
        })
        .await;

        let busy = tokio::time::timeout(
            Duration::from_secs(10),
            executor.execute_idempotent(&key, OpenTicket::new("t1", Then::Succeed), Metadata::new(), respond),
        )
        .await
        .expect("a duplicate answered within its claim wait")
        .map(|_| ())
        .unwrap_err();
        assert_eq!(busy.kind(), ErrorKind::Unavailable, "{busy}");
        assert!(busy.to_string().contains("still running"), "{busy}");

        let duplicate = tokio::spawn({
            let (executor, key) = (executor.clone(), key.clone());
            async move {
                let again = OpenTicket::new("t1", Then::Succeed);
                executor.execute_idempotent(&key, again, Metadata::new(), respond).await.map(|_| ())
            }
        });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the duplicate waits", || async {
            crate::support::someone_waits(&db).await.then_some(())
        })
        .await;
        duplicate.abort();
        assert!(duplicate.await.unwrap_err().is_cancelled());
        let read = small.event_store().read_all(cqrs_core::Position::START, 10).await;
        assert!(read.is_ok(), "the connection came back while the key was held: {read:?}");

        running.abort();
        assert!(running.await.unwrap_err().is_cancelled());
    }
}
