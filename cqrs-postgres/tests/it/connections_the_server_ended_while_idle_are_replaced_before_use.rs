//! A server restart ends every pooled connection. A connection that sat idle is pinged before
//! a command gets it, so the command runs on a new one instead of failing with an unknown
//! outcome.

use crate::support::{options, pg_test, record};
use cqrs_core::ExpectedVersion;
use cqrs_core::ports::EventStore;
use sqlx::Connection as _;
use std::time::Duration;

/// Ends this pool's server sessions as a restart does (`pg_terminate_backend`: SIGTERM, the
/// session's FATAL 57P01), waiting until they are gone. Returns how many it ended.
async fn end_the_sessions_of(application_name: &str) -> i64 {
    let mut other = sqlx::PgConnection::connect(&crate::support::database_url())
        .await
        .expect("a connection of its own");
    sqlx::query_scalar(
        // The filter first: in one `WHERE` the server may call the function on every session.
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) \
         FROM pg_stat_activity WHERE application_name = left($1, 63)",
    )
    .bind(application_name)
    .fetch_one(&mut other)
    .await
    .expect("end the sessions")
}

pg_test! {
    async fn an_append_after_the_sessions_were_ended_goes_through(db: PgDatabase) {
        let name = format!("cqrs-test idle {}", db.schema());
        // One connection, so the append below can only get the one that was ended.
        let pool = options(db.schema())
            .application_name(name.clone())
            .max_connections(1)
            .ping_after_idle(Some(Duration::from_millis(20)))
            .connect()
            .await
            .expect("connect");
        let store = pool.event_store();
        store
            .append("s-1", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .expect("the first append");
        assert_eq!(end_the_sessions_of(&name).await, 1);
        // Idle past the threshold: the condition the ping needs, not a wait for something.
        tokio::time::sleep(Duration::from_millis(40)).await;

        let stored = store
            .append("s-1", ExpectedVersion::Exactly(1), vec![record(2)])
            .await
            .expect("the append runs on a new connection");
        assert_eq!(stored.len(), 1);
        assert_eq!(crate::support::event_count(&db).await, 2);
        pool.pool().close().await;
    }
}
