//! A caller that gives up while its transaction's `BEGIN` is on the wire (a client gone, a
//! timeout) leaves no open transaction on the pooled connection. sqlx counts a transaction only
//! once the server confirmed its `BEGIN`, so without care the connection went back to the pool
//! inside a transaction no one would end: the next user's writes were reported as stored, stayed
//! uncommitted, and held the schema's append lock.

use crate::proxy::Proxy;
use crate::support::{database_url, pg_test, record};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion, ProjectionStore};
use cqrs_postgres::{PgDatabase, PgProjectionStore};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

pg_test! {
    async fn a_transaction_given_up_while_it_begins_leaves_the_pool_clean(db: PgDatabase) {
        // One connection, so whatever the abandoned `BEGIN` left on it, the next user gets.
        // No ping before each acquire: the stall below must hold back the `BEGIN`, not a ping.
        let (proxy, pool) = Proxy::in_front_of_the_database(
            PgPoolOptions::new().max_connections(1).test_before_acquire(false),
        )
        .await;
        let slow = PgDatabase::from_pool(pool, db.schema()).unwrap();
        // The connection is open before the stall, so the stall holds back the `BEGIN` itself.
        let one: i32 = sqlx::query_scalar(AssertSqlSafe("SELECT 1".to_owned()))
            .fetch_one(slow.pool())
            .await
            .expect("SELECT 1");
        assert_eq!(one, 1);

        // The pool pings the connection it gets back: once that is through, it is idle.
        proxy.settle_with(slow.pool(), 0).await;

        let sent_before = proxy.round_trips();
        proxy.stall_for(Duration::from_secs(3));
        let store = PgProjectionStore::new(slow.clone());
        let mut begin = Box::pin(store.begin("c"));
        // Polled until the proxy holds its `BEGIN` (it cannot be answered before the stall
        // ends), then given up: the caller is gone while the `BEGIN` is on the wire.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while proxy.round_trips() == sent_before {
            assert!(tokio::time::Instant::now() < deadline, "the BEGIN was never sent");
            tokio::select! {
                _ = &mut begin => panic!("the transaction began during the stall"),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        drop(begin);

        // The next user of the connection appends (one statement, its own transaction). It
        // must be committed when it returns: visible on another connection at once.
        slow.event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .expect("append");
        let seen = db
            .event_store()
            .read_all(Position::START, 10)
            .await
            .expect("read on a direct connection");
        assert_eq!(seen.len(), 1, "the append was committed when it returned");
        // And the append lock is free: a direct append does not wait for the slow pool.
        tokio::time::timeout(
            Duration::from_secs(5),
            db.event_store().append("t", ExpectedVersion::NO_STREAM, vec![record(2)]),
        )
        .await
        .expect("no one holds the append lock")
        .expect("append");
        slow.pool().close().await;
    }
}

/// A handle on `db`'s schema whose pool has one connection, open, and that session's pid.
async fn one_connection(db: &PgDatabase) -> (PgDatabase, i32) {
    let slow = PgDatabase::from_pool(
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
            .expect("connect"),
        db.schema(),
    )
    .unwrap();
    let pid: i32 = sqlx::query_scalar(AssertSqlSafe("SELECT pg_backend_pid()".to_owned()))
        .fetch_one(slow.pool())
        .await
        .expect("the session's pid");
    (slow, pid)
}

/// The session `pid`'s last statement stays the holder's `COMMIT` (`what` ran after it
/// otherwise), for long enough for a waiter left in the queue to take the connection and use
/// it.
async fn nothing_ran_after_the_commit(db: &PgDatabase, pid: i32, what: &str) {
    let last_statement = || async {
        let sql = "SELECT query FROM pg_stat_activity WHERE pid = $1".to_owned();
        sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
            .bind(pid)
            .fetch_one(db.pool())
            .await
            .expect("the session's last statement")
    };
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(300);
    while tokio::time::Instant::now() < quiet_until {
        assert_eq!(last_statement().await, "COMMIT", "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pg_test! {
    /// A caller that gives up while it waits for a connection leaves the pool's queue: the
    /// connection, once free, does not run a `BEGIN` and a `ROLLBACK` for no one, ahead of
    /// the callers still waiting.
    async fn a_transaction_given_up_while_it_waits_for_a_connection_leaves_the_queue(db: PgDatabase) {
        let (slow, pid) = one_connection(&db).await;
        let holder = slow.begin().await.expect("begin");
        let gave_up = tokio::time::timeout(Duration::from_millis(100), slow.begin()).await;
        assert!(gave_up.is_err(), "the only connection is taken");
        holder.commit().await.expect("commit");

        nothing_ran_after_the_commit(&db, pid, "a statement ran for no one").await;
        slow.pool().close().await;
    }
}

pg_test! {
    /// The same for an idempotency claim: one given up while it waits for a connection does
    /// not, once one frees up, take the key for no one (four statements ahead of the callers
    /// still waiting, and the key held meanwhile against another fingerprint).
    async fn a_claim_given_up_while_it_waits_for_a_connection_leaves_the_queue(db: PgDatabase) {
        use cqrs_core::ports::IdempotencyStore;
        let (slow, pid) = one_connection(&db).await;
        let holder = slow.begin().await.expect("begin");
        let store = slow.idempotency_store();
        let claim = store.claim("s", "k", "fp", Duration::from_secs(60));
        let gave_up = tokio::time::timeout(Duration::from_millis(100), claim).await;
        assert!(gave_up.is_err(), "the only connection is taken");
        holder.commit().await.expect("commit");

        nothing_ran_after_the_commit(&db, pid, "a claim ran for no one").await;
        slow.pool().close().await;
    }
}
