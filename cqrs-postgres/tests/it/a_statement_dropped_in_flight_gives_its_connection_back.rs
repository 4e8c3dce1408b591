//! A statement whose caller is gone (dropped in flight) does not cost the pool its
//! connection.

use crate::support::{database_url, pg_test};
use cqrs_postgres::PgOptions;
use sqlx::AssertSqlSafe;
use std::time::Duration;

pg_test! {
    /// A statement dropped in flight (its caller gone: a client that left, a timeout) that the
    /// server then fails gives its connection back to the pool once it ended, over TLS as in
    /// plain text. Over TLS, sqlx closed such a connection with a hard close that hung, and the
    /// pool never had it back.
    async fn a_statement_dropped_in_flight_that_fails_gives_its_connection_back(db: PgDatabase) {
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let plain = format!("{url}{separator}sslmode=disable");
        // The TLS half through a TLS proxy in front of the server (`verify-full` with the test
        // CA: over TLS or not at all), whatever DATABASE_URL's server offers.
        #[cfg(feature = "tls")]
        let (_proxy, tls) = crate::tls_connections_verify_the_server::tls_server("ca.pem")
            .await
            .expect("Postgres is available");
        #[cfg(not(feature = "tls"))]
        let tls = {
            eprintln!("a_statement_dropped_in_flight: built without `tls`: both halves in plain text");
            url
        };
        for url in [tls, plain] {
            let one = PgOptions::new(url.clone())
                .schema(db.schema())
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect()
                .await
                .expect("connect");
            for _ in 0..2 {
                // Fails with a division by zero once its 1 s sleep is over: long after the
                // give-up below, even for a test thread descheduled on a busy machine.
                let failing = sqlx::query_scalar::<_, i32>(AssertSqlSafe(
                    "SELECT 1 / (0 * (SELECT count(*) FROM pg_sleep(1)))::int".to_owned(),
                ))
                .fetch_one(one.pool());
                let gave_up = tokio::time::timeout(Duration::from_millis(50), failing).await;
                assert!(gave_up.is_err(), "the statement was still running");
                let answer = sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
                    .fetch_one(one.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{url}: the pool's one connection: {e}"));
                assert_eq!(answer, 1);
            }
            one.pool().close().await;
        }
    }
}

/// The backend process id of the connection the pool hands out next.
async fn backend_pid(db: &cqrs_postgres::PgDatabase) -> i32 {
    sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT pg_backend_pid()".to_owned()))
        .fetch_one(db.pool())
        .await
        .expect("the pool's connection answers")
}

pg_test! {
    /// A connection given back with a statement unanswered is kept when the answer comes
    /// within `answer_timeout`, and closed (replaced by a new one) when it does not: the pool
    /// does not wait out a statement no one waits for.
    async fn a_statement_dropped_in_flight_keeps_its_connection_only_if_answered_in_time(db: PgDatabase) {
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        // In plain text: over TLS, sqlx (0.9) cannot close a connection whose server sends
        // nothing (its rustls socket waits to read when it flushes nothing), so the connection
        // is only replaced once the statement's answer comes (postgres.md).
        let one = PgOptions::new(format!("{url}{separator}sslmode=disable"))
            .schema(db.schema())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .answer_timeout(Duration::from_millis(1500))
            .connect()
            .await
            .expect("connect");
        let sleep = |seconds: f64| {
            sqlx::query(AssertSqlSafe(format!("SELECT pg_sleep({seconds})")))
                .execute(one.pool())
        };
        let first = backend_pid(&one).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(50), sleep(0.3)).await;
        assert!(gave_up.is_err(), "the statement was still running");
        assert_eq!(backend_pid(&one).await, first, "answered in time: the connection is kept");

        let gave_up = tokio::time::timeout(Duration::from_millis(50), sleep(30.0)).await;
        assert!(gave_up.is_err(), "the statement was still running");
        let replaced = tokio::time::timeout(Duration::from_secs(10), backend_pid(&one))
            .await
            .expect("the pool's one connection is free long before the statement's 30 s");
        assert_ne!(replaced, first, "not answered in time: the connection was closed");
        one.pool().close().await;
    }
}

/// A database through `proxy` in `schema` with `answer_timeout`, and its one connection's
/// backend id, once the proxy is quiet.
async fn settled_through(
    proxy: &crate::proxy::Proxy,
    schema: &str,
    answer_timeout: Duration,
) -> (cqrs_postgres::PgDatabase, i32) {
    let db = through(proxy, schema)
        .answer_timeout(answer_timeout)
        .connect()
        .await
        .expect("connect through the proxy");
    let pid = backend_pid(&db).await;
    proxy.settle_with(db.pool(), 0).await;
    (db, pid)
}

/// Checks that the pool's one connection is the one of backend `pid` (not a replacement,
/// which would pass whatever became of a transaction) and is outside any transaction: a
/// simple query (one message) outside a transaction starts its own, so `now()`, the
/// transaction's start, is the statement's.
async fn back_outside_a_transaction(db: &cqrs_postgres::PgDatabase, pid: i32) {
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::raw_sql("SELECT now() = statement_timestamp()").fetch_one(db.pool()),
    )
    .await
    .expect("the connection is back")
    .expect("the statement runs");
    let outside: bool = sqlx::Row::get(&row, 0);
    assert!(outside, "the statement ran inside a transaction left open");
    assert_eq!(backend_pid(db).await, pid, "the connection was kept");
}

/// A proxy in front of the test database, which can go silent.
async fn proxy() -> crate::proxy::Proxy {
    let direct: sqlx::postgres::PgConnectOptions =
        database_url().parse().expect("DATABASE_URL parses");
    crate::proxy::Proxy::start(format!("{}:{}", direct.get_host(), direct.get_port())).await
}

/// Options connecting through `proxy` to the test database, in `schema`, with one connection,
/// in plain text or over TLS (`Tls::Yes`: `sslmode=require`, the proxy passing the encrypted
/// bytes on as they are).
fn through_with(proxy: &crate::proxy::Proxy, schema: &str, tls: Tls) -> PgOptions {
    let direct: sqlx::postgres::PgConnectOptions =
        database_url().parse().expect("DATABASE_URL parses");
    let user = direct.get_username();
    let database = direct.get_database().unwrap_or(user);
    let port = proxy.addr.port();
    let sslmode = match tls {
        Tls::No => "disable",
        Tls::Yes => "require",
    };
    PgOptions::new(format!(
        "postgres://{user}@127.0.0.1:{port}/{database}?sslmode={sslmode}"
    ))
    .schema(schema)
    .max_connections(1)
    .acquire_timeout(Duration::from_secs(5))
    .ping_after_idle(None)
    // Short for the test, with room for a loaded machine's healthy steps through the proxy.
    .answer_timeout(Duration::from_secs(1))
}

/// [`through_with`] in plain text.
fn through(proxy: &crate::proxy::Proxy, schema: &str) -> PgOptions {
    through_with(proxy, schema, Tls::No)
}

#[derive(Clone, Copy, Debug)]
enum Tls {
    No,
    Yes,
}

/// Both, or plain text alone when built without TLS (`tls`) or against a server without it
/// (`ssl = off`), which the second needs.
async fn plain_and_tls(db: &cqrs_postgres::PgDatabase) -> Vec<Tls> {
    let ssl: String = sqlx::query_scalar(AssertSqlSafe("SHOW ssl".to_owned()))
        .fetch_one(db.pool())
        .await
        .expect("the server answers");
    if !cfg!(feature = "tls") {
        eprintln!("built without `tls`: the silent-network tests run in plain text only");
        vec![Tls::No]
    } else if ssl != "on" {
        eprintln!(
            "the test server has ssl = {ssl}: the silent-network tests run in plain text only"
        );
        vec![Tls::No]
    } else {
        vec![Tls::No, Tls::Yes]
    }
}

pg_test! {
    /// On a network that drops packets (the proxy passes nothing on any more and closes
    /// nothing), a statement its caller gave up on holds its connection for `answer_timeout`,
    /// not until TCP gives up (about 15 minutes): the pool opens a new one, which works. Over
    /// TLS too, where sqlx's close of such a connection never ends: the crate's own reads
    /// close it without one.
    async fn a_statement_dropped_on_a_silent_network_frees_its_connection(db: PgDatabase) {
        for tls in plain_and_tls(&db).await {
            let proxy = proxy().await;
            let silent = through_with(&proxy, db.schema(), tls).connect().await.expect("connect through the proxy");
            let store = silent.event_store();
            use cqrs_core::ports::EventStore;
            assert_eq!(store.stream_version("s").await.unwrap(), 0);
            proxy.settle_with(silent.pool(), 0).await;

            proxy.silence_open_connections();
            let gave_up = tokio::time::timeout(Duration::from_millis(200), store.stream_version("s")).await;
            assert!(gave_up.is_err(), "{tls:?}: the silent network answered: {gave_up:?}");
            let version = tokio::time::timeout(Duration::from_secs(4), store.stream_version("s"))
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the pool's one connection was not freed"))
                .expect("the new connection works");
            assert_eq!(version, 0);
            silent.pool().close().await;
        }
    }
}

pg_test! {
    /// A statement of the application's own, on a connection from `PgDatabase::acquire`,
    /// whose caller gave up on a network that drops packets frees its connection within
    /// `answer_timeout`, over TLS too: run on `pool()` instead, sqlx's close of it never
    /// ends over TLS (postgres.md), and the pool's one connection stays taken.
    async fn a_statement_on_an_acquired_connection_dropped_on_a_silent_network_frees_it(db: PgDatabase) {
        for tls in plain_and_tls(&db).await {
            let proxy = proxy().await;
            let silent = through_with(&proxy, db.schema(), tls).connect().await.expect("connect through the proxy");
            let select_one = || async {
                let mut conn = silent.acquire().await?;
                sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
                    .fetch_one(&mut *conn)
                    .await
            };
            assert_eq!(select_one().await.expect("the proxy passes it on"), 1);
            proxy.settle_with(silent.pool(), 0).await;

            proxy.silence_open_connections();
            let gave_up = tokio::time::timeout(Duration::from_millis(200), select_one()).await;
            assert!(gave_up.is_err(), "{tls:?}: the silent network answered: {gave_up:?}");
            let answer = tokio::time::timeout(Duration::from_secs(4), select_one())
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the pool's one connection was not freed"))
                .expect("the new connection works");
            assert_eq!(answer, 1);
            silent.pool().close().await;
        }
    }
}

pg_test! {
    /// A command whose `COMMIT` goes out on a network that has gone silent fails within
    /// `answer_timeout` as an unknown outcome (`Timeout`), instead of its detached commit
    /// waiting for ~15 minutes with a connection; the next command runs on a new connection,
    /// over TLS too (where sqlx's close of the old one never ends).
    async fn a_commit_on_a_silent_network_is_an_unknown_outcome_within_the_answer_timeout(db: PgDatabase) {
        for tls in plain_and_tls(&db).await {
            commit_on_a_silent_network(&db, tls).await;
        }
    }
}

async fn commit_on_a_silent_network(db: &cqrs_postgres::PgDatabase, tls: Tls) {
    use crate::support::tickets::{Note, NoteHandler};
    use cqrs_core::{CommandBus, ErrorKind};
    let proxy = std::sync::Arc::new(proxy().await);
    let silent = through_with(&proxy, db.schema(), tls)
        .connect()
        .await
        .expect("connect through the proxy");
    let bus = CommandBus::builder()
        .layer(silent.command_layer())
        .handler(SilencesTheNetwork {
            proxy: proxy.clone(),
            inner: NoteHandler,
        })
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(20), bus.dispatch(Note("n1")))
        .await
        .expect("the commit gave up")
        .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
    let message = lost.to_string();
    assert!(
        message.contains("unknown") && message.contains("answer_timeout"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let plain = CommandBus::builder()
        .layer(silent.command_layer())
        .handler(NoteHandler)
        .build()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(4), plain.dispatch(Note("n2")))
        .await
        .unwrap_or_else(|_| panic!("{tls:?}: the pool's one connection was not freed"))
        .expect("the next command commits");
    silent.pool().close().await;
}

/// Records what `inner` records and silences every connection the proxy holds open: the
/// command's commit (its only statement, the append) then goes out into the void.
struct SilencesTheNetwork {
    proxy: std::sync::Arc<crate::proxy::Proxy>,
    inner: crate::support::tickets::NoteHandler,
}

#[cqrs_core::async_trait]
impl cqrs_core::CommandHandler<crate::support::tickets::Note> for SilencesTheNetwork {
    async fn handle(
        &self,
        cmd: crate::support::tickets::Note,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<(), cqrs_core::HandlerError> {
        self.inner.handle(cmd, ctx).await?;
        self.proxy.silence_open_connections();
        Ok(())
    }
}

pg_test! {
    /// A `BEGIN` that goes out on a network gone silent fails within `answer_timeout`, as
    /// unavailable: nothing was done. Its connection is closed once the answer has not come
    /// within a second `answer_timeout` (it might still have opened a transaction), and the
    /// pool opens a new one, over TLS too.
    async fn a_begin_on_a_silent_network_fails_within_the_answer_timeout(db: PgDatabase) {
        for tls in plain_and_tls(&db).await {
            let proxy = proxy().await;
            let silent = through_with(&proxy, db.schema(), tls).connect().await.expect("connect through the proxy");
            proxy.settle_with(silent.pool(), 0).await;
            proxy.silence_open_connections();
            let began = tokio::time::timeout(Duration::from_secs(10), silent.begin())
                .await
                .expect("the BEGIN gave up");
            let error = began.expect_err("the silent network answered");
            assert!(error.to_string().contains("answer_timeout"), "{error}");
            assert_eq!(
                silent.store_error(error).kind(),
                cqrs_core::ErrorKind::Unavailable,
                "nothing was done: retry"
            );
            let again = tokio::time::timeout(Duration::from_secs(4), silent.begin())
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the pool's one connection was not freed"));
            again.expect("a new connection begins").rollback().await.unwrap();
            silent.pool().close().await;
        }
    }
}

pg_test! {
    /// A `BEGIN` answered after its caller gave up (past `answer_timeout`) leaves no
    /// transaction open on the connection the pool gets back: cut off before the answer,
    /// sqlx queued no `ROLLBACK`, and the next user's statements ran inside that transaction,
    /// reported as stored while uncommitted.
    async fn a_begin_answered_after_its_caller_gave_up_leaves_no_transaction_open(db: PgDatabase) {
        let proxy = proxy().await;
        let (late, pid) = settled_through(&proxy, db.schema(), Duration::from_secs(2)).await;
        // Answered between one and two `answer_timeout`s: within the wait of the connection
        // given back (a second `answer_timeout`), with a second's margin either side.
        proxy.stall_for(Duration::from_secs(3));
        let began = tokio::time::timeout(Duration::from_secs(10), late.begin())
            .await
            .expect("the caller stops waiting at answer_timeout");
        assert!(began.is_err(), "answered before the stall ended: {began:?}");
        // The pool's one connection, once the late `BEGIN`'s transaction was rolled back.
        back_outside_a_transaction(&late, pid).await;
        late.pool().close().await;
    }
}

pg_test! {
    /// The same on a connection from `PgDatabase::acquire`: a `begin` (`sqlx::Acquire`) whose
    /// caller gave up before the server answered leaves no transaction open once the
    /// connection is back in the pool. sqlx (0.9) does not count such a transaction, and the
    /// next statement on the connection ran inside it, uncommitted.
    async fn a_begin_on_an_acquired_connection_given_up_leaves_no_transaction_open(db: PgDatabase) {
        use sqlx::Acquire;
        let proxy = proxy().await;
        let (late, pid) = settled_through(&proxy, db.schema(), Duration::from_secs(5)).await;
        // Given up after a second, answered after four: within the wait of the connection
        // given back (`answer_timeout`, to six), with margins of three seconds and two.
        proxy.stall_for(Duration::from_secs(4));
        let mut conn = late.acquire().await.expect("the pool's one connection");
        let gave_up = tokio::time::timeout(Duration::from_secs(1), (&mut conn).begin())
            .await
            .is_err();
        assert!(gave_up, "answered before the stall ended");
        drop(conn);
        back_outside_a_transaction(&late, pid).await;
        late.pool().close().await;
    }
}

pg_test! {
    /// A `begin` on an acquired connection that fails with the error of an earlier statement
    /// dropped in flight (read before the `BEGIN`'s answer, which the server then ran) leaves
    /// no transaction open once the connection is back in the pool.
    async fn a_begin_failing_with_an_earlier_statements_error_leaves_no_transaction_open(db: PgDatabase) {
        use sqlx::Acquire;
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let one = PgOptions::new(format!("{url}{separator}sslmode=disable"))
            .schema(db.schema())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect");
        let pid = backend_pid(&one).await;
        let mut conn = one.acquire().await.expect("the pool's one connection");
        // Fails with a division by zero once its sleep is over, long after the give-up.
        let failing = sqlx::query_scalar::<_, i32>(AssertSqlSafe(
            "SELECT 1 / (0 * (SELECT count(*) FROM pg_sleep(0.5)))::int".to_owned(),
        ))
        .fetch_one(&mut *conn);
        let gave_up = tokio::time::timeout(Duration::from_millis(50), failing).await;
        assert!(gave_up.is_err(), "the statement was still running");
        let began = (&mut conn).begin().await.map(drop);
        assert!(began.is_err(), "the begin read the dropped statement's error");
        drop(conn);
        back_outside_a_transaction(&one, pid).await;
        one.pool().close().await;
    }
}

pg_test! {
    /// A projection unit's commit on a network gone silent fails within `answer_timeout`, as
    /// an unknown outcome: the runner retries instead of waiting for ~15 minutes.
    async fn a_projection_commit_on_a_silent_network_fails_within_the_answer_timeout(db: PgDatabase) {
        use cqrs_core::ports::ProjectionStore;
        let proxy = proxy().await;
        let silent = through(&proxy, db.schema()).connect().await.expect("connect through the proxy");
        let store = silent.projection_store();
        let unit = store.begin("counts").await.expect("a unit");
        proxy.silence_open_connections();
        let committed = tokio::time::timeout(Duration::from_secs(10), store.commit(unit))
            .await
            .expect("the commit gave up");
        let error = committed.expect_err("the silent network answered");
        assert_eq!(error.kind(), cqrs_core::ErrorKind::Timeout, "{error}");
        assert!(error.to_string().contains("answer_timeout"), "{error}");
        silent.pool().close().await;
    }
}

pg_test! {
    /// A connection closed with its statement unanswered does not leave the statement running
    /// on the server (one more server process for each connection replaced so): the server
    /// checks for a closed client every 5 s (PostgreSQL 14 and later) and cancels it.
    async fn a_statement_closed_unanswered_is_cancelled_on_the_server(db: PgDatabase) {
        let version: i32 = sqlx::query_scalar(AssertSqlSafe("SHOW server_version_num".to_owned()))
            .fetch_one(db.pool())
            .await
            .map(|v: String| v.parse().unwrap())
            .unwrap();
        if version < 140_000 {
            eprintln!("a_statement_closed_unanswered: PostgreSQL {version} has no client check; skipped");
            return;
        }
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        // In plain text, which the pool can close (see above).
        let one = PgOptions::new(format!("{url}{separator}sslmode=disable"))
            .schema(db.schema())
            .max_connections(1)
            .answer_timeout(Duration::from_millis(300))
            .connect()
            .await
            .expect("connect");
        let pid = backend_pid(&one).await;
        let sleep = sqlx::query(AssertSqlSafe("SELECT pg_sleep(60)".to_owned())).execute(one.pool());
        assert!(tokio::time::timeout(Duration::from_millis(100), sleep).await.is_err());
        cqrs_core::testing::eventually(Duration::from_secs(20), "the server ends the statement", || async {
            let running: i64 = sqlx::query_scalar(AssertSqlSafe(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1".to_owned(),
            ))
            .bind(pid)
            .fetch_one(db.pool())
            .await
            .unwrap();
            (running == 0).then_some(())
        })
        .await;
        one.pool().close().await;
    }
}

pg_test! {
    /// A transaction of one's own (`PgDatabase::begin`) whose `COMMIT` or `ROLLBACK` goes out
    /// on a network gone silent fails within `answer_timeout` (sqlx's waited for as long as
    /// TCP did), and its connection is freed for the next, over TLS too.
    async fn a_transaction_of_your_own_ends_within_the_answer_timeout_on_a_silent_network(db: PgDatabase) {
        for tls in plain_and_tls(&db).await {
            let proxy = proxy().await;
            let silent = through_with(&proxy, db.schema(), tls).connect().await.expect("connect through the proxy");
            for end in ["COMMIT", "ROLLBACK"] {
                let mut tx = silent.begin().await.expect("begin");
                sqlx::query(AssertSqlSafe("SELECT 1".to_owned())).execute(&mut *tx).await.unwrap();
                proxy.silence_open_connections();
                let ended = tokio::time::timeout(Duration::from_secs(4), async {
                    if end == "COMMIT" { tx.commit().await } else { tx.rollback().await }
                })
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the {end} still waits"));
                let error = ended.expect_err("the silent network answered");
                assert!(error.to_string().contains(end), "{error}");
                assert!(error.to_string().contains("answer_timeout"), "{error}");
                let again = tokio::time::timeout(Duration::from_secs(4), silent.begin())
                    .await
                    .unwrap_or_else(|_| panic!("{tls:?}, {end}: the pool's one connection was not freed"));
                again.expect("a new connection begins").rollback().await.unwrap();
            }
            silent.pool().close().await;
        }
    }
}

pg_test! {
    /// A snapshot's save on a network that has gone silent fails within `answer_timeout` as
    /// `Timeout`, and its connection is freed, over TLS too. An aggregate repository saves
    /// snapshots in a task nobody cuts off, so the save ran on the pool until TCP gave up
    /// (about 15 minutes), holding its connection, and each command due a snapshot in that
    /// time took one more.
    async fn a_snapshot_save_on_a_silent_network_gives_up_and_frees_its_connection(db: PgDatabase) {
        use cqrs_core::ErrorKind;
        use cqrs_core::ports::{Snapshot, SnapshotStore};
        for tls in plain_and_tls(&db).await {
            let proxy = proxy().await;
            let silent = through_with(&proxy, db.schema(), tls).connect().await.expect("connect through the proxy");
            let snapshots = silent.snapshot_store();
            let save = |version| snapshots.save("ticket-t1", Snapshot::new(version, serde_json::json!({ "open": true })));
            save(1).await.expect("the proxy passes it on");
            proxy.settle_with(silent.pool(), 0).await;

            proxy.silence_open_connections();
            let lost = tokio::time::timeout(Duration::from_secs(4), save(2))
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the save waited past its bound"))
                .unwrap_err();
            assert_eq!(lost.kind(), ErrorKind::Timeout, "{tls:?}: {lost}");
            let loaded = tokio::time::timeout(Duration::from_secs(4), snapshots.load("ticket-t1"))
                .await
                .unwrap_or_else(|_| panic!("{tls:?}: the pool's one connection was not freed"))
                .expect("a new connection works");
            assert!(loaded.is_some_and(|s| s.version >= 1), "{tls:?}");
            silent.pool().close().await;
        }
    }
}

pg_test! {
    /// An append straight on the event store (`AggregateRepository::execute` makes one) on a
    /// network that has gone silent fails within `answer_timeout` as an unknown outcome
    /// (`Timeout`), and its connection is freed. It waited until TCP gave up (about 15
    /// minutes) for a caller without a timeout of its own.
    async fn an_append_on_a_silent_network_is_an_unknown_outcome_within_the_answer_timeout(db: PgDatabase) {
        use cqrs_core::ErrorKind;
        use cqrs_core::ports::{EventStore, ExpectedVersion};
        let proxy = proxy().await;
        let silent = through(&proxy, db.schema()).connect().await.expect("connect through the proxy");
        let store = silent.event_store();
        let append = |n| store.append("s", ExpectedVersion::Any, vec![crate::support::record(n)]);
        append(1).await.expect("the proxy passes it on");
        proxy.settle_with(silent.pool(), 0).await;

        proxy.silence_open_connections();
        let lost = tokio::time::timeout(Duration::from_secs(4), append(2))
            .await
            .expect("the append waited past its bound")
            .unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        let version = tokio::time::timeout(Duration::from_secs(4), store.stream_version("s"))
            .await
            .expect("the pool's one connection was not freed")
            .expect("a new connection works");
        assert!(version >= 1);
        silent.pool().close().await;
    }
}

pg_test! {
    /// A wait for a consumer's lock that its caller gave up, on a network that then went
    /// silent, frees its connection within a slice and `answer_timeout`: the wait's task,
    /// which nobody cuts off, waited for the slice's answer until TCP gave up (about 15
    /// minutes), holding the connection.
    async fn a_lock_wait_given_up_on_a_silent_network_frees_its_connection(db: PgDatabase) {
        use cqrs_core::ports::ProjectionStore;
        let proxy = proxy().await;
        let silent = through(&proxy, db.schema()).connect().await.expect("connect through the proxy");
        let holder_store = db.projection_store();
        let holder = holder_store.begin("c").await.expect("begin");
        let waiting = silent.projection_store();
        let gave_up = tokio::time::timeout(Duration::from_millis(300), waiting.begin("c")).await;
        assert!(gave_up.is_err(), "still waiting for the lock");

        proxy.silence_open_connections();
        holder_store.commit(holder).await.expect("commit the holder");
        let one = tokio::time::timeout(Duration::from_secs(8), async {
            sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
                .fetch_one(silent.pool())
                .await
        })
        .await
        .expect("the pool's one connection was not freed")
        .expect("a new connection works");
        assert_eq!(one, 1);
        silent.pool().close().await;
    }
}
