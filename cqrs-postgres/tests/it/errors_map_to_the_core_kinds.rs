//! Errors arrive as the core's kinds: an unreachable server is unavailable (retryable) with
//! its cause, bad options list every problem, and nothing panics.

use crate::support::pg_test;
use cqrs_core::ports::{EventStore, ExpectedVersion, IdempotencyStore, ProjectionStore};
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_core::{ErrorKind, Position};
use cqrs_postgres::{PgError, PgOptions};
use std::time::Duration;

/// A connection pooler that refuses the startup `options` parameter (PgBouncer, unless told
/// to ignore it) is a configuration error that says what to change, not "unavailable" with
/// "check that the server runs there": a retry never mends it.
#[tokio::test]
async fn a_pooler_refusing_the_startup_parameters_says_to_turn_them_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let pooler = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = pooler.local_addr().unwrap().port();
        // Answers every startup message as PgBouncer does one carrying `options`.
        tokio::spawn(async move {
            while let Ok((mut client, _)) = pooler.accept().await {
                tokio::spawn(async move {
                    let length = client.read_u32().await.unwrap_or(0) as usize;
                    let mut startup = vec![0; length.saturating_sub(4)];
                    if client.read_exact(&mut startup).await.is_err() {
                        return;
                    }
                    let mut fields = Vec::new();
                    for (tag, text) in [
                        (b'S', "FATAL"),
                        (b'V', "FATAL"),
                        (b'C', "08P01"),
                        (b'M', "unsupported startup parameter: options"),
                    ] {
                        fields.push(tag);
                        fields.extend_from_slice(text.as_bytes());
                        fields.push(0);
                    }
                    fields.push(0);
                    let mut reply = vec![b'E'];
                    reply.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                    reply.extend_from_slice(&fields);
                    let _ = client.write_all(&reply).await;
                });
            }
        });
        let error = PgOptions::new(format!(
            "postgres://app@127.0.0.1:{port}/db?sslmode=disable"
        ))
        .acquire_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect_err("refused");
        assert!(!error.kind().is_retryable(), "{:?}: {error}", error.kind());
        let message = error.to_string();
        assert!(
            message.contains("PgOptions::session_settings(false)")
                && message.contains("ignore_startup_parameters")
                && message.contains("unsupported startup parameter: options"),
            "{message}"
        );
        // A connection a pool opens later (a lazy pool, a pooler reconfigured) alike.
        let lazy = PgOptions::new(format!(
            "postgres://app@127.0.0.1:{port}/db?sslmode=disable"
        ))
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy()
        .unwrap();
        let error = lazy.event_store().stream_version("s").await.unwrap_err();
        assert!(!error.kind().is_retryable(), "{:?}: {error}", error.kind());
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_with_its_cause() {
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        // Nothing listens on port 1.
        let db = PgOptions::new("postgres://postgres@127.0.0.1:1/none")
            .acquire_timeout(Duration::from_millis(300))
            .connect_lazy()
            .expect("valid options");
        let store = db.event_store();
        let append = store
            .append("s", ExpectedVersion::Any, vec![crate::support::record(1)])
            .await
            .unwrap_err();
        assert_eq!(append.kind(), ErrorKind::Unavailable, "{append}");
        assert!(append.kind().is_retryable());
        assert!(
            std::error::Error::source(&append).is_some(),
            "the cause is kept"
        );
        // sqlx says only "pool timed out while waiting for an open connection": each error
        // names the server and says what to check.
        let says_where_and_what = |error: &dyn std::error::Error| {
            let message = error.to_string();
            assert!(
                message.contains("no connection to postgres at 127.0.0.1:1, database `none` within 300ms")
                    && message.contains("none came free")
                    && message.contains("check that the server runs there"),
                "{message}"
            );
        };
        says_where_and_what(&append);
        let read = store.read_all(Position::START, 10).await.unwrap_err();
        assert_eq!(read.kind(), ErrorKind::Unavailable);
        says_where_and_what(&read);
        let claim = db
            .idempotency_store()
            .claim("s", "k", "fp", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(claim.kind(), ErrorKind::Unavailable);
        says_where_and_what(&claim);
        let begin = db.projection_store().begin("c").await.unwrap_err();
        assert_eq!(begin.kind(), ErrorKind::Unavailable);
        says_where_and_what(&begin);
        let purge = db
            .projection_store()
            .purge_inbox("c", Duration::from_secs(1))
            .await
            .unwrap_err();
        says_where_and_what(&purge);
        let health = db.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains("127.0.0.1:1, database `none`")),
            "{health:?}"
        );

        let connect = PgOptions::new("postgres://postgres@127.0.0.1:1/none")
            .acquire_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(connect.kind(), ErrorKind::Unavailable, "{connect}");
        // The cause, not only that the pool timed out (sqlx's pool retries a refused connect
        // until its acquire timeout and keeps no cause).
        let message = connect.to_string();
        assert!(
            message.contains("could not connect to postgres at 127.0.0.1:1, database `none`")
                && message.contains("refused")
                && !message.contains("pool timed out"),
            "{message}"
        );
    })
    .await;
}

/// A server that answers and refuses the connection (no such database, role or password) is
/// not retryable, and says what to check: the URL's user, password and database, not whether
/// the server runs.
#[tokio::test]
async fn a_server_that_refuses_the_connection_says_to_check_the_url() {
    if !crate::support::postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let mut url = url::Url::parse(&crate::support::database_url()).unwrap();
        url.set_path("/no_such_database_here");
        let refused = PgOptions::new(url.as_str()).connect().await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Internal, "{refused}");
        let message = refused.to_string();
        assert!(
            message.contains("database \"no_such_database_here\" does not exist (SQLSTATE 3D000)")
                && message.contains("check the URL's user, password and database"),
            "{message}"
        );
        assert_told_once(&refused);
    })
    .await;
}

#[test]
fn invalid_options_list_every_problem() {
    let err = PgOptions::new("http://example.invalid")
        .schema("Not Valid")
        .max_connections(2)
        .min_connections(3)
        .validate()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let PgError::InvalidOptions(problems) = err else {
        panic!("expected invalid options");
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(!format!("{:?}", PgOptions::new("postgres://u:secret@h/db")).contains("secret"));
}

crate::support::pg_test! {
    /// A value Postgres cannot hold (U+0000 in a jsonb payload, or in a text stream id) is
    /// the caller's fault: `Invalid`, not an internal error, and nothing is stored.
    async fn a_value_postgres_cannot_store_is_rejected_as_invalid(db: PgDatabase) {
        let store = db.event_store();
        let mut record = crate::support::record(1);
        record.payload = serde_json::json!({ "title": "a\u{0}b" });
        let err = store
            .append("s", ExpectedVersion::Any, vec![record])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let err = store
            .append("s\u{0}", ExpectedVersion::Any, vec![crate::support::record(2)])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        // Everywhere else the in-memory store refuses it too, so tests on memory meet it.
        type Change = fn(&mut cqrs_core::EventRecord);
        let nul_in: [(&str, Change); 5] = [
            ("event type", |r| r.event_type = "No\u{0}ted".into()),
            ("payload key", |r| r.payload = serde_json::json!({ "a\u{0}": 1 })),
            ("partition key", |r| r.partition_key = Some("k\u{0}".into())),
            ("actor", |r| r.metadata.actor = Some("u\u{0}".into())),
            ("trace context", |r| {
                r.metadata.trace_context.insert("traceparent".into(), "0\u{0}".into());
            }),
        ];
        for (what, change) in nul_in {
            let mut record = crate::support::record(4);
            change(&mut record);
            let err = store
                .append("s", ExpectedVersion::Any, vec![record])
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{what}: {err}");
        }
        // Too large for an index (SQLSTATE 54000): an idempotency key or a stream id a client
        // made 32 KB long (random, so compression does not bring it under the limit).
        let huge: String = (0..1000).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
        let err = store
            .append(&huge, ExpectedVersion::Any, vec![crate::support::record(3)])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let err = db
            .idempotency_store()
            .claim("s", &huge, "fp", Duration::from_secs(60))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(store.read_all(Position::START, 10).await.unwrap().is_empty());
    }
}

crate::support::pg_test! {
    /// A session the server ended for sitting idle in a transaction (SQLSTATE 25P03) is a
    /// lost connection: `Unavailable`, retryable, not an internal error.
    async fn a_session_the_server_ended_for_idling_is_unavailable(db: PgDatabase) {
        let short = crate::support::options(db.schema())
            .idle_in_transaction_timeout(Some(Duration::from_millis(200)))
            .connect()
            .await
            .unwrap();
        let mut tx = short.pool().begin().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        backend_gone(&db, pid, "the server ended the session").await;
        let error = sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap_err();
        let error = cqrs_postgres::store_error(error);
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    }
}

/// A pool whose places are all taken by connects to a server that is down (requests
/// retrying until their acquire timeout) is unhealthy, not "busy": sqlx counts a connection
/// from the start of its connect, so the pool looks as full as one under load, and `/ready`
/// answered 200 for an instance cut off from its database as soon as it had some traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_full_of_failing_connects_is_unhealthy_not_busy() {
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        // Nothing listens on port 1.
        let db = PgOptions::new("postgres://postgres@127.0.0.1:1/none")
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(20))
            .connect_lazy()
            .expect("valid options")
            .with_health_wait(Duration::from_millis(400));
        let retrying: Vec<_> = (0..2)
            .map(|_| {
                let pool = db.pool().clone();
                tokio::spawn(async move { pool.acquire().await.map(drop) })
            })
            .collect();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the connects fill the pool",
            || async { (db.pool().size() == 2).then_some(()) },
        )
        .await;
        let health = db.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains("127.0.0.1:1")),
            "{health:?}"
        );
        for task in retrying {
            task.abort();
        }
    })
    .await;
}

/// Waits until the server no longer lists backend `pid` (ending a session is asynchronous).
async fn backend_gone(db: &cqrs_postgres::PgDatabase, pid: i32, what: &str) {
    cqrs_core::testing::eventually(Duration::from_secs(10), what, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(db.pool())
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
}

/// A role of its own that may hold one connection at a time (drop it when done), and the
/// options to log in as it.
async fn role_of_one_connection(
    db: &cqrs_postgres::PgDatabase,
) -> (String, sqlx::postgres::PgConnectOptions) {
    use std::str::FromStr;
    let role = format!("cqrs_limited_{}", uuid::Uuid::new_v4().simple());
    // A password of its own: a server that asks for one over TCP (Debian's default, which
    // scripts/test.sh keeps) refuses a role without.
    let password = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 1 PASSWORD '{password}'"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let options = sqlx::postgres::PgConnectOptions::from_str(&crate::support::database_url())
        .unwrap()
        .username(&role)
        .password(&password);
    (role, options)
}

pg_test! {
    /// A busy pool whose server refuses one more connection (its role's connection limit, or
    /// the server's, reached at a peak) is still degraded: the server answered.
    async fn a_busy_pool_whose_server_refuses_one_more_connection_is_degraded(db: PgDatabase) {
        let (role, options) = role_of_one_connection(&db).await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        let limited = cqrs_postgres::PgDatabase::from_pool(pool, db.schema())
            .unwrap()
            // Roomy: the check's own connection gets half of it, on a loaded machine too.
            .with_health_wait(Duration::from_secs(3));
        let held = limited.pool().acquire().await.unwrap();
        let health = limited.check().await;
        drop(held);
        limited.pool().close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
            .execute(db.pool())
            .await
            .unwrap();
        assert!(
            matches!(&health, Health::Degraded(why) if why.contains("busy for 1.5s") && why.contains("refused one more")),
            "{health:?}"
        );
    }
}

pg_test! {
    /// A health check whose query the server never answers (cut off by the check's wait, or
    /// by a probe that drops the check) closes its connection instead of handing it back: the
    /// pool's ping of it would never end on a silent server, and the pool kept one of its
    /// connections for good.
    async fn a_health_check_cut_off_mid_query_holds_no_connection(db: PgDatabase) {
        use crate::proxy::Proxy;
        use cqrs_postgres::PgDatabase;
        let options = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false);
        let (proxy, pool) = Proxy::in_front_of_the_database(options).await;
        let through_proxy = PgDatabase::from_pool(pool, db.schema())
            .unwrap()
            .with_health_wait(Duration::from_millis(400));
        for cut_off_by_the_caller in [false, true] {
            // One connection, idle in the pool (given back on a task of its own): the one the
            // check takes, and the one the silence holds.
            drop(through_proxy.pool().acquire().await.unwrap());
            cqrs_core::testing::eventually(Duration::from_secs(10), "the connection is back in the pool", || async {
                (through_proxy.pool().num_idle() == 1).then_some(())
            })
            .await;
            proxy.silence_open_connections();
            if cut_off_by_the_caller {
                let checked = tokio::time::timeout(Duration::from_millis(100), through_proxy.check()).await;
                assert!(checked.is_err(), "the silent server answered: {checked:?}");
            } else {
                let health = through_proxy.check().await;
                assert!(matches!(health, Health::Unhealthy(ref why) if why.contains("did not answer")), "{health:?}");
            }
            tokio::time::timeout(Duration::from_secs(8), through_proxy.pool().acquire())
                .await
                .expect("the pool's one connection is free again")
                .expect("a new connection through the proxy");
        }
    }
}

pg_test! {
    /// A pool whose every connection is busy (a load peak) is degraded, not unhealthy: the
    /// server answers, and a load balancer must not take every busy instance out at once.
    async fn a_busy_pool_is_degraded_not_unhealthy(db: PgDatabase) {
        let busy = crate::support::options(db.schema())
            .max_connections(1)
            .connect()
            .await
            .unwrap();
        let held = busy.pool().acquire().await.unwrap();
        let health = busy.check().await;
        assert!(matches!(health, Health::Degraded(ref why) if why.contains("busy for 1s")), "{health:?}");
        // A shorter wait, for a readiness endpoint with a shorter time limit of its own (still
        // roomy: the check's own connection gets half of it, on a loaded machine too).
        let health = busy.clone().with_health_wait(Duration::from_millis(1600)).check().await;
        assert!(matches!(health, Health::Degraded(ref why) if why.contains("busy for 800ms")), "{health:?}");
        // An operation that waits out the pool's acquire_timeout says the pool was full, and
        // what to do, rather than sqlx's bare "pool timed out".
        let impatient = crate::support::options(db.schema())
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        let held_too = impatient.pool().acquire().await.unwrap();
        let error = impatient.event_store().stream_version("s").await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        let message = error.to_string();
        assert!(
            message.contains("within 200ms (all 1 of the pool's connections were in use or being opened)")
                && message.contains("raise the pool's max_connections"),
            "{message}"
        );
        // The check waits past that acquire_timeout, still busy (it was unhealthy, the pool
        // having given up before half the check's wait).
        let health = impatient.check().await;
        assert!(matches!(health, Health::Degraded(ref why) if why.contains("stayed busy")), "{health:?}");
        drop(held_too);
        drop(held);
        assert_eq!(busy.check().await, Health::Healthy);
    }
}

pg_test! {
    async fn a_value_too_deep_to_read_back_is_refused_before_it_is_stored(db: PgDatabase) {
        use cqrs_core::ports::{Snapshot, SnapshotStore};
        // `levels` arrays, one inside the other: `jsonb` takes any depth, sqlx's decoding
        // (`serde_json`) reads 127, and a payload must leave room for the envelopes a
        // transport wraps around it.
        let nested = |levels: usize| {
            (0..levels).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
        };
        let store = db.event_store();
        let mut record = crate::support::record(1);
        record.payload = nested(101);
        // Alone (the one-event statement) and in a batch.
        for batch in [vec![record.clone()], vec![crate::support::record(2), record]] {
            let refused = store
                .append("s-1", ExpectedVersion::Any, batch)
                .await
                .unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::Invalid, "{refused}");
            let why = std::error::Error::source(&refused).unwrap().to_string();
            assert!(why.contains("more than 100 deep"), "{why}");
        }
        assert_eq!(crate::support::event_count(&db).await, 0, "nothing of either batch");

        // The deepest payload allowed is stored and loaded.
        let mut record = crate::support::record(3);
        record.payload = nested(100);
        store.append("s-1", ExpectedVersion::Any, vec![record]).await.unwrap();
        assert_eq!(store.load("s-1", 0).await.unwrap()[0].payload, nested(100));

        // A snapshot is read by this crate alone: 127 levels, not 128.
        let snapshots = db.snapshot_store();
        let refused = snapshots
            .save("s-1", Snapshot::new(1, nested(128)))
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Invalid, "{refused}");
        assert!(snapshots.load("s-1").await.unwrap().is_none());
        snapshots.save("s-1", Snapshot::new(1, nested(127))).await.unwrap();
        assert_eq!(snapshots.load("s-1").await.unwrap().unwrap().state, nested(127));

        // A response Postgres cannot store (too deep to read back, or holding U+0000) is not
        // stored, but its key is not released either: its work has run, and a retry must not
        // run it again. A note stands in for the body, with the status kept.
        let idempotency = db.idempotency_store();
        for (key, body, why) in [
            ("k", nested(128), "more than 127 deep"),
            ("k2", serde_json::json!({ "t": "a\u{0}" }), "U+0000"),
        ] {
            let cqrs_core::ports::Claim::New(guard) = idempotency
                .claim("s", key, "fp", Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!("a new key replayed");
            };
            let body = cqrs_core::ports::StoredResponse::new(201, body);
            guard.complete(body).await.expect("completed, with a note");
            let cqrs_core::ports::Claim::Replay(replayed) = idempotency
                .claim("s", key, "fp", Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!("the key was released: a retry would run the work again");
            };
            assert_eq!(replayed.status, 201);
            let note = replayed.body["response_not_stored"].as_str().unwrap();
            assert!(note.contains(why), "{note}");
        }
    }
}

pg_test! {
    /// A pooled connection whose session the server ended (its backend terminated, or a proxy
    /// that dropped it idle) fails the check's `SELECT 1`, which said nothing of the server:
    /// `/ready` answered 503 for an instance whose database was up. The check asks the server
    /// on a connection of its own: degraded, and healthy again once the lost one is gone.
    async fn a_lost_pooled_connection_is_degraded_not_a_server_down(db: PgDatabase) {
        let pool = crate::support::options(db.schema())
            .max_connections(1)
            // Else a connection idle for a second is pinged, and replaced, before the check.
            .ping_after_idle(None)
            .connect()
            .await
            .unwrap();
        let pid: i32 = {
            let mut conn = pool.pool().acquire().await.unwrap();
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .unwrap()
        };
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(ended, "the pooled connection's backend is ended");
        backend_gone(&db, pid, "the backend is gone").await;

        let health = pool.check().await;
        assert!(
            matches!(&health, Health::Degraded(why) if why.contains("a pooled connection was lost")
                && why.contains("the server answers a new one")),
            "{health:?}"
        );
        let health = pool.check().await;
        assert!(matches!(health, Health::Healthy), "{health:?}");
        pool.pool().close().await;
    }
}

pg_test! {
    /// The lost connection's place taken meanwhile (a role's connection limit, or the server's,
    /// reached): the server refusing the check's new connection for load is up, and full.
    async fn a_lost_pooled_connection_whose_place_was_taken_is_degraded(db: PgDatabase) {
        let (role, options) = role_of_one_connection(&db).await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            // As `PgOptions` sets it: else sqlx pings the lost connection and replaces it.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .unwrap();
        let limited = cqrs_postgres::PgDatabase::from_pool(pool, db.schema())
            .unwrap()
            .with_health_wait(Duration::from_secs(3));
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(limited.pool())
            .await
            .unwrap();
        // Back in the pool first: sqlx hands a connection back on a task of its own, with a
        // ping, and a backend ended during that ping loses the connection there, not in the
        // check (which then found the pool empty and the role full: "busy", once on a loaded
        // CI machine).
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the connection is idle in the pool",
            || async { (limited.pool().num_idle() == 1).then_some(()) },
        )
        .await;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(db.pool())
            .await
            .unwrap();
        // The role's one place, taken by another client once the ended backend left it.
        let taken = cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the role's place comes free",
            || {
                let options = options.clone();
                async move {
                    use sqlx::ConnectOptions;
                    options.connect().await.ok()
                }
            },
        )
        .await;
        let health = limited.check().await;
        {
            use sqlx::Connection;
            taken.close().await.unwrap();
        }
        limited.pool().close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
            .execute(db.pool())
            .await
            .unwrap();
        assert!(
            matches!(&health, Health::Degraded(why) if why.contains("a pooled connection was lost")
                && why.contains("the server refused a new one")),
            "{health:?}"
        );
    }
}

/// The server's message, in the error and its causes, comes without the ` at line N` sqlx
/// adds (the line of the server's C source, which read as a line of the caller's SQL), and
/// the chain ends with it: sqlx's own error and its source each repeated it.
fn assert_told_once(error: &(dyn std::error::Error + 'static)) {
    let mut chain = vec![error.to_string()];
    let mut next = error.source();
    while let Some(cause) = next {
        chain.push(cause.to_string());
        next = cause.source();
    }
    let all = chain.join(" | ");
    assert!(!all.contains(" at line "), "{all}");
    let last = chain.last().unwrap();
    assert!(
        last.starts_with("error returned from database: ") && last.contains("(SQLSTATE "),
        "{all}"
    );
}

#[tokio::test]
async fn a_schema_never_migrated_says_to_run_migrate() {
    if !crate::support::postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        // A schema no one made: the adapters' first statement meets no table (it said only
        // `schema "…" does not exist`).
        let schema = format!("never_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let db = PgOptions::new(crate::support::database_url())
            .schema(&schema)
            .connect()
            .await
            .expect("connect");
        let append = db
            .event_store()
            .append("s", ExpectedVersion::Any, vec![crate::support::record(1)])
            .await
            .unwrap_err();
        let message = append.to_string();
        assert!(
            message.contains(&format!(
                "schema \"{schema}\" does not exist (SQLSTATE 3F000, at character "
            )) && message.contains("run `PgDatabase::migrate()` on this schema at start-up"),
            "{message}"
        );
        assert_told_once(&append);
    })
    .await;
}

/// A statement's error says where in the statement it points, without sqlx's ` at line N`
/// (the server's C source line), and sqlx's error stays at hand through `SqlxError`.
#[tokio::test]
async fn a_server_error_names_its_sqlstate_and_where_in_the_statement() {
    if !crate::support::postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let db = PgOptions::new(crate::support::database_url())
            .connect()
            .await
            .expect("connect");
        let error = sqlx::query("SELECT 1 FROM nowhere_at_all_here")
            .execute(db.pool())
            .await
            .unwrap_err();
        let wrapped = cqrs_postgres::SqlxError::from(error);
        let told = wrapped.to_string();
        assert!(
            told.starts_with("error returned from database: relation \"nowhere_at_all_here\" does not exist (SQLSTATE 42P01, at character 15 of the statement)")
                && !told.contains(" at line "),
            "{told}"
        );
        assert!(std::error::Error::source(&wrapped).is_none(), "told whole");
        let code = wrapped
            .get_ref()
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42P01"));
    })
    .await;
}
