//! A `LISTEN` whose answer never comes (a pooled connection whose peer is gone without a word,
//! a server that froze) holds up only itself: the relay ships by polling meanwhile, at start-up
//! and when it connects a new listener after losing one. It used to wait for that answer, and
//! ship nothing, for as long as the connection stayed open. Start-up statements the server never
//! answers are bounded the same way: reported, then given up.

use crate::proxy::Proxy;
use crate::support::{pg_test, record};
use crate::transport::RunningRelay;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::runtime::Health;
use cqrs_core::testing::eventually;
use cqrs_postgres::{PgDatabase, PgOutboxRelay};
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

pg_test! {
    async fn a_listen_unanswered_at_start_up(db: PgDatabase) {
        let (proxy, through_proxy) = relay_database(&db).await;
        db.event_store().append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        proxy.swallow_next_listen();
        let relay = listening_relay(&through_proxy);
        // Its LISTEN left unanswered: the relay goes on after a poll interval.
        eventually(Duration::from_secs(15), "the event ships by polling", || async {
            (relay.shipped() == [1]
                && relay.health.get() == Health::Healthy
                && proxy.listens_swallowed() == 1)
                .then_some(())
        })
        .await;
        db.event_store().append("s", ExpectedVersion::Exactly(1), vec![record(2)]).await.unwrap();
        eventually(Duration::from_secs(15), "the next event ships too", || async {
            (relay.shipped() == [1, 2]).then_some(())
        })
        .await;
        relay.stop().await;
    }
}

pg_test! {
    async fn a_listen_unanswered_after_the_listener_was_lost(db: PgDatabase) {
        let (proxy, through_proxy) = relay_database(&db).await;
        db.event_store().append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let relay = listening_relay(&through_proxy);
        eventually(Duration::from_secs(15), "the relay ships and listens", || async {
            (relay.shipped() == [1] && listening_sessions(&db).await == 1).then_some(())
        })
        .await;
        proxy.swallow_next_listen();
        // The server ends the listener's session; the relay's next idle wait connects another.
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) \
             FROM pg_stat_activity WHERE query = 'LISTEN \"' || $1 || '\"'",
        )
        .bind(db.channel())
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(ended, 1, "the relay's LISTEN session");
        eventually(Duration::from_secs(15), "the relay's new LISTEN goes unanswered", || async {
            (proxy.listens_swallowed() == 1).then_some(())
        })
        .await;
        db.event_store().append("s", ExpectedVersion::Exactly(1), vec![record(2)]).await.unwrap();
        eventually(Duration::from_secs(15), "the event ships by polling", || async {
            (relay.shipped() == [1, 2] && relay.health.get() == Health::Healthy).then_some(())
        })
        .await;
        relay.stop().await;
    }
}

pg_test! {
    /// Starting up on a connection the server took a statement on and went silent: the relay
    /// is reported `Degraded`, then gives up starting (the runtime's restart starts again on
    /// another connection). It used to stay `Starting`, without a word, for good.
    async fn a_start_up_the_server_never_answers_is_reported_then_given_up(db: PgDatabase) {
        let options = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(1))
            .test_before_acquire(false);
        let (proxy, pool) = Proxy::in_front_of_the_database(options).await;
        let through_proxy = PgDatabase::from_pool(pool, db.schema()).unwrap();
        proxy.settle_with(through_proxy.pool(), 0).await;
        assert_eq!(through_proxy.pool().size(), 1, "one connection to silence");
        proxy.silence_open_connections();
        db.event_store().append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let relay = listening_relay(&through_proxy);
        eventually(Duration::from_secs(10), "the silent start-up is reported", || async {
            matches!(relay.health.get(), Health::Degraded(reason) if reason.contains("starting up"))
                .then_some(())
        })
        .await;
        let error = tokio::time::timeout(Duration::from_secs(20), relay.finished())
            .await
            .expect("the relay gives up starting")
            .expect_err("starting up failed");
        assert!(error.to_string().contains("gave up starting"), "{error}");
        // The silent connection was closed, not handed back (to a pool that would ping it
        // with no deadline, and keep it for good).
        eventually(Duration::from_secs(15), "the silent connection is closed", || async {
            (through_proxy.pool().size() == 0).then_some(())
        })
        .await;
        // A relay started again (as the runtime restarts it) ships.
        let again = listening_relay(&through_proxy);
        eventually(Duration::from_secs(15), "the event ships after the restart", || async {
            (again.shipped() == [1]).then_some(())
        })
        .await;
        again.stop().await;
    }
}

/// A pool on `db`'s schema through a proxy, without a check of each connection it hands out
/// (as `PgOptions` pools are).
async fn relay_database(db: &PgDatabase) -> (Proxy, PgDatabase) {
    let options = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(20))
        .test_before_acquire(false);
    let (proxy, pool) = Proxy::in_front_of_the_database(options).await;
    (proxy, PgDatabase::from_pool(pool, db.schema()).unwrap())
}

/// The sessions that listen on `db`'s channel.
async fn listening_sessions(db: &PgDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN \"' || $1 || '\"'",
    )
    .bind(db.channel())
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// A relay through `db` that listens, polls every 100 ms and warns of a LISTEN still
/// unanswered after 400 ms (twice its publish timeout of 200 ms).
fn listening_relay(db: &PgDatabase) -> RunningRelay {
    RunningRelay::start(|transport| {
        PgOutboxRelay::new(db.clone(), transport)
            .publish_timeout(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(100))
    })
}
