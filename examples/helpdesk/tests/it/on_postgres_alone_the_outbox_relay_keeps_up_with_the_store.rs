//! On Postgres without Redis nothing reads an event transport, yet the outbox relay (`default`)
//! keeps running, to a transport that discards: its checkpoint follows the store. Redis added
//! later (to run more instances) then gets only the events committed from then on, not the
//! history again, which the stats (deduping through an inbox that keeps a week) would count
//! again.

use crate::support::*;
use cqrs_core::Position;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::EventStore;
use cqrs_postgres::{PgOptions, PgOutboxRelay};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_alone_the_outbox_relay_checkpoint_reaches_the_last_position() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let Backend::Postgres {
            database_url,
            namespace,
            ..
        } = &backend
        else {
            unreachable!("Backend::postgres is a Postgres backend")
        };
        let (database_url, namespace) = (database_url.clone(), namespace.clone());
        let s = TestServer::start_on(backend, |c| c.redis_url = None).await;
        let (customer, _) = s.customer().await;
        for i in 0..3 {
            s.ticket(&customer, &format!("t{i}")).await;
        }
        let db = PgOptions::new(database_url)
            .schema(namespace)
            .connect()
            .await
            .expect("the test connects to the server's schema");
        let events = db
            .event_store()
            .read_all(Position::START, 10_000)
            .await
            .unwrap();
        assert!(events.len() >= 3, "{events:?}");
        let last = events.last().unwrap().position.unwrap();
        // The server's relay of the default name; this one only reads its checkpoint.
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new()));
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the `default` relay's checkpoint reaches the last position",
            || async { (relay.checkpoint().await.ok() == Some(last)).then_some(()) },
        )
        .await;
        drop(relay);
        db.pool().close().await;
        s.stop().await;
    })
    .await;
}
