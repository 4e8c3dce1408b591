//! A relay's hold on its checkpoint is its batch transaction's session: the server may end it
//! while the batch publishes (`idle_in_transaction_session_timeout`, keepalives after a network
//! cut, an administrator), and a standby relay then starts over from the old checkpoint. A
//! relay refuses to start with a `publish_timeout` its sessions' timeouts would cut short, and
//! confirms its session before each further run of a batch, stopping uncommitted when it is
//! gone: nothing is shipped twice, or out of order, but the one publish in flight.

use crate::support::{options, pg_test, record};
use crate::transport::{ControlledTransport, GatedTransport};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::runtime::{Health, HealthReporter, Runtime, Shutdown, Worker, WorkerContext};
use cqrs_core::testing::eventually;
use cqrs_core::{ErrorKind, EventRecord};
use cqrs_postgres::{PgDatabase, PgOutboxRelay, RelayBatch, RelayError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

/// Appends events to streams `a` and `b` in turn (`a` 1, `b` 1, `a` 2, ...): with one topic
/// per stream, each event is a run of its own.
async fn append_alternating(db: &PgDatabase, n: u64) -> Vec<EventRecord> {
    let store = db.event_store();
    let mut stored = Vec::new();
    for i in 0..n {
        let stream = if i % 2 == 0 { "a" } else { "b" };
        stored.extend(
            store
                .append(stream, ExpectedVersion::Exactly(i / 2), vec![record(i)])
                .await
                .unwrap(),
        );
    }
    stored
}

fn by_stream(event: &EventRecord) -> String {
    event.stream_id.clone().unwrap_or_default()
}

/// Nothing published twice, and each stream in order.
fn assert_once_and_in_order(published: &[EventRecord]) {
    let ids: HashSet<_> = published.iter().map(|e| e.event_id).collect();
    let shipped: Vec<_> = published
        .iter()
        .map(|e| format!("{}@{}", by_stream(e), e.stream_version.unwrap()))
        .collect();
    assert_eq!(
        ids.len(),
        published.len(),
        "an event was published twice: {shipped:?}"
    );
    let mut versions: HashMap<String, u64> = HashMap::new();
    for event in published {
        let version = event.stream_version.unwrap();
        let previous = versions.insert(by_stream(event), version).unwrap_or(0);
        assert!(
            version > previous,
            "stream {} out of order",
            by_stream(event)
        );
    }
}

/// A relay's session with a short `idle_in_transaction_session_timeout`.
async fn short_idle(db: &PgDatabase, timeout: Duration) -> PgDatabase {
    options(db.schema())
        .idle_in_transaction_timeout(Some(timeout))
        .connect()
        .await
        .unwrap()
}

pg_test! {
    /// Two relays of one name whose sessions end after 300 ms idle in a transaction, and a
    /// broker taking 600 ms per publish: a batch's session would end while it publishes and
    /// the other relay ship the same events meanwhile. They refuse to start instead; either
    /// way nothing is shipped twice or out of order.
    async fn two_relays_whose_sessions_time_out_while_publishing_ship_nothing_twice(db: PgDatabase) {
        append_alternating(&db, 6).await;
        let short = short_idle(&db, Duration::from_millis(300)).await;
        let transport = ControlledTransport::slow(Duration::from_millis(600));
        let relay = || {
            PgOutboxRelay::new(short.clone(), transport.clone())
                .relay_name("shared")
                .topic_for(by_stream)
                .poll_interval(Duration::from_millis(20))
                .backoff(Duration::from_millis(10), Duration::from_millis(50))
        };
        let runtime = Runtime::builder()
            .worker(relay())
            .worker(relay())
            .restart_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .start();
        let refused = |health: &Health| {
            matches!(health, Health::Unhealthy(reason) if reason.contains("idle_in_transaction_session_timeout"))
        };
        // Until both refused, or the broker was called often enough to have shipped twice.
        // Each refusal is remembered: the runtime restarts a refused relay (`Starting` again),
        // so both need not be seen refused at the same poll.
        let seen_refused = std::sync::Mutex::new(HashSet::new());
        eventually(DEADLINE, "both relays refused, or the broker took 8 publishes", || async {
            let health = runtime.health().await;
            let mut seen = seen_refused.lock().unwrap();
            for name in ["outbox-relay-shared", "outbox-relay-shared#2"] {
                if health.components.get(name).is_some_and(|(h, _)| refused(h)) {
                    seen.insert(name);
                }
            }
            (seen.len() == 2 || transport.calls.load(Ordering::SeqCst) >= 8).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_once_and_in_order(&transport.published());
        assert_eq!(transport.calls.load(Ordering::SeqCst), 0, "the relays refused to start");
    }
}

pg_test! {
    /// `run` refuses a `publish_timeout` at or above the sessions'
    /// `idle_in_transaction_session_timeout`, saying which settings to change; below it, or
    /// with the pool's defaults, the relay starts.
    async fn a_relay_refuses_a_publish_timeout_its_sessions_would_cut_short(db: PgDatabase) {
        let short = short_idle(&db, Duration::from_millis(500)).await;
        let transport = Arc::new(ControlledTransport::default());
        for publish_timeout in [Duration::from_secs(30), Duration::from_millis(500)] {
            let mut relay = PgOutboxRelay::new(short.clone(), transport.clone())
                .publish_timeout(publish_timeout);
            let (_trigger, shutdown) = Shutdown::new();
            let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
            let error = tokio::time::timeout(DEADLINE, relay.run(ctx))
                .await
                .expect("run returned")
                .expect_err("refused");
            let error = error.downcast_ref::<RelayError>().expect("a relay error");
            assert!(matches!(error, RelayError::Settings { .. }), "{error:?}");
            assert_eq!(error.kind(), ErrorKind::Invalid);
            let message = error.to_string();
            for needle in [
                "idle_in_transaction_session_timeout",
                "publish_timeout",
                "PgOptions::idle_in_transaction_timeout",
            ] {
                assert!(message.contains(needle), "{needle} missing from: {message}");
            }
        }
        PgOutboxRelay::new(short.clone(), transport.clone())
            .publish_timeout(Duration::from_millis(400))
            .check_session_settings()
            .await
            .expect("a publish timeout below the session's is fine");
        PgOutboxRelay::new(db.clone(), transport.clone())
            .check_session_settings()
            .await
            .expect("the defaults fit: 30 s below 60 s");
        short.pool().close().await;
    }
}

pg_test! {
    /// The server ends a relay's session while its first run is at the broker: the relay
    /// publishes no further run of that batch (a standby may own the checkpoint by now) and
    /// commits nothing; the next batch ships from the old checkpoint.
    async fn a_relay_whose_session_ends_mid_batch_publishes_no_further_run(db: PgDatabase) {
        let stored = append_alternating(&db, 4).await;
        let transport = Arc::new(GatedTransport::new());
        let relay = Arc::new(
            PgOutboxRelay::new(db.clone(), transport.clone())
                .relay_name("gated")
                .topic_for(by_stream)
                .listen(false),
        );
        relay.ensure_checkpoint().await.unwrap();
        let batch = tokio::spawn({
            let relay = relay.clone();
            async move { relay.relay_once().await }
        });
        eventually(DEADLINE, "the first run is at the broker", || async {
            (transport.calls.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;

        // The session holding the checkpoint row, ended as the server ends an idle one.
        let holder: i32 = sqlx::query_scalar(
            "SELECT l.pid FROM pg_locks l WHERE l.relation = to_regclass($1) \
             AND l.mode = 'RowShareLock' AND l.pid <> pg_backend_pid()",
        )
        .bind(format!("\"{}\".relay_checkpoints", db.schema()))
        .fetch_one(db.pool())
        .await
        .unwrap();
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
            .bind(holder)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(ended);
        transport.gate.add_permits(1);

        let outcome = tokio::time::timeout(DEADLINE, batch).await.unwrap().unwrap();
        assert!(matches!(outcome, Err(RelayError::LeaseLost { .. })), "{outcome:?}");
        let ids = |events: Vec<EventRecord>| events.iter().map(|e| e.event_id).collect::<Vec<_>>();
        let published = transport.published();
        assert_eq!(ids(published), ids(stored[..1].to_vec()), "only the run in flight went out");
        assert_eq!(relay.checkpoint().await.unwrap(), cqrs_core::Position::START);

        // The next batch ships everything from the old checkpoint: the one in flight again.
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(4));
        let published = transport.published();
        assert_once_and_in_order(&published[1..]);
        assert_eq!(ids(published[1..].to_vec()), ids(stored));
    }
}
