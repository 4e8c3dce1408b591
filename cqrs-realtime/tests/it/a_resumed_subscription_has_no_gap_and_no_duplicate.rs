use crate::support::{Client, TEST_LIMIT, TestHub, TicketRouting, record};
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_core::{EventRecord, Position};
use cqrs_realtime::{HubOptions, Publisher, ServerFrame};
use futures_util::future::BoxFuture;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// A client reconnects with `since` = the position of the last event it got: it receives the
/// events stored in between (published while it was away, or never pushed at all) that it may
/// see, then live events, each exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_disconnect() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().replay_batch(2)).await;
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        for seq in 1..=3 {
            t.publish("t1", "u1", seq).await;
        }
        let mut last = None;
        for seq in 1..=3 {
            let event = client.event().await;
            assert_eq!(event.seq, seq);
            last = event.position;
        }
        client.ws.close(None).await.unwrap();
        drop(client);

        // While it is away: published, another user's, and stored but never pushed.
        t.publish("t1", "u1", 4).await;
        t.publish("t2", "u2", 100).await;
        t.publish("t1", "u1", 5).await;
        t.store("t1", "u1", 6).await;

        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": last}))
            .await;
        client.expect_subscribed("tickets").await;
        for seq in 4..=6 {
            let event = client.event().await;
            assert_eq!((event.ticket.as_str(), event.seq), ("t1", seq));
        }
        t.publish("t1", "u1", 7).await;
        assert_eq!(client.event().await.seq, 7);
        client.ping_pong().await;
        assert_eq!(t.hub.stats().replayed_events, 3);
    })
    .await;
}

/// Resuming while events keep being stored and published, each published a little after it
/// was stored (as an outbox relay does): the replay, the live events held during it (the hold
/// buffer is tiny, so it overflows and the replay reads them back) and the live stream after
/// it join with no gap and no duplicate.
///
/// With `CQRS_LONG=1` it is a soak: 30 rounds, each on a fresh hub, so the seam is hit at many
/// different moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_events_are_published() {
    let rounds = if cqrs_core::testing::long() { 30 } else { 1 };
    for _ in 0..rounds {
        with_timeout(TEST_LIMIT, resume_while_events_are_published_once()).await;
    }
}

async fn resume_while_events_are_published_once() {
    let t = Arc::new(
        TestHub::start(
            HubOptions::new()
                .replay_batch(7)
                .replay_buffer(5)
                .replay_limit(100_000)
                // Room for every live event: a loaded machine may leave this test's reader
                // unscheduled while the publisher runs, and a full queue closes it as slow.
                .send_queue(512),
        )
        .await,
    );
    let mut since = None;
    for seq in 1..=1000 {
        let stored = t.store("t1", "u1", seq).await;
        if seq == 10 {
            since = stored.position;
        }
    }
    let last = 1400;
    let publisher = {
        let t = t.clone();
        tokio::spawn(async move {
            const LAG: usize = 5;
            let mut unpublished = std::collections::VecDeque::new();
            for seq in 1001..=last {
                unpublished.push_back(t.store("t1", "u1", seq).await);
                unpublished.push_back(t.store("t2", "u2", seq).await);
                while unpublished.len() > 2 * LAG {
                    let record = unpublished.pop_front().unwrap();
                    t.hub.publisher().publish(&record).await.unwrap();
                }
                if seq % 10 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            for record in unpublished {
                t.hub.publisher().publish(&record).await.unwrap();
            }
        })
    };
    let mut client = t.connect("user-u1").await;
    client
        .send(json!({"type": "subscribe", "topic": "tickets", "since": since.unwrap().to_string()}))
        .await;
    client.expect_subscribed("tickets").await;
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let event = client.event().await;
        assert_eq!(event.ticket, "t1");
        got.push(event.seq);
    }
    publisher.await.unwrap();
    client.ping_pong().await;
    let expected: Vec<u64> = (11..=last).collect();
    if got != expected {
        let missing: Vec<_> = expected.iter().filter(|s| !got.contains(s)).collect();
        let mut seen = std::collections::HashSet::new();
        let twice: Vec<_> = got.iter().filter(|s| !seen.insert(**s)).collect();
        panic!("missing {missing:?}, twice {twice:?}");
    }
}

/// Without an event store, `since` gets `resume_unavailable`; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_without_an_event_store_is_an_error() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_with(
            Arc::new(InMemoryPubSub::new()),
            HubOptions::new(),
            false,
            |b| b,
        )
        .await;
        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "1"}))
            .await;
        match client.frame().await {
            ServerFrame::Error { code, message, .. } => {
                assert_eq!(code, "resume_unavailable");
                assert!(message.contains("since"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
    })
    .await;
}

/// A gap longer than the replay limit gets `resume_failed`; the subscription is live anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_longer_than_the_replay_limit_is_reported() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().replay_batch(4).replay_limit(8)).await;
        for seq in 1..=20 {
            t.store("t1", "u1", seq).await;
        }
        let mut client = t.connect("agent-a1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        client.expect_subscribed("tickets").await;
        for seq in 1..=8 {
            assert_eq!(client.event().await.seq, seq);
        }
        // It says what to do, as it is: the subscription is live (subscribing again would be
        // refused as already subscribed).
        match client.frame().await {
            ServerFrame::Error { code, message, .. } => {
                assert_eq!(code, "resume_failed");
                assert!(
                    message.ends_with("reload the state over HTTP; live events follow"),
                    "{message}"
                );
            }
            other => panic!("expected resume_failed, got {other:?}"),
        }
        t.publish("t1", "u1", 21).await;
        assert_eq!(client.event().await.seq, 21);
    })
    .await;
}

/// Exactly as many events as the replay limit is within it, also when they fill the last
/// batch: they are replayed and the subscription goes live with no `resume_failed`. (A full
/// last batch used to count as "more to read", and the limit then failed the replay.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_of_exactly_the_replay_limit_is_replayed_in_full() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().replay_batch(2).replay_limit(4)).await;
        for seq in 1..=4 {
            t.store("t1", "u1", seq).await;
        }
        let mut client = t.connect("agent-a1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        client.expect_subscribed("tickets").await;
        for seq in 1..=4 {
            assert_eq!(client.event().await.seq, seq);
        }
        t.publish("t1", "u1", 5).await;
        // The next frame is the live event, not an error.
        assert_eq!(client.event().await.seq, 5);
        assert_eq!(t.hub.stats().replayed_events, 4);

        // One more than the limit is reported, after the limit's worth of events.
        let mut over = t.connect("agent-a2").await;
        over.send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        over.expect_subscribed("tickets").await;
        for seq in 1..=4 {
            assert_eq!(over.event().await.seq, seq);
        }
        assert_eq!(over.error_code().await, "resume_failed");
    })
    .await;
}

/// A `since` past the end of the log (an in-memory log that restarted, a position from another
/// deployment) is reported, and live events flow at once: they are not held back until the log
/// reaches that position. Resuming from the last event of the log is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_past_the_end_of_the_log_is_reported_and_live_events_flow() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        t.publish("t1", "u1", 1).await;
        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "1000000"}))
            .await;
        client.expect_subscribed("tickets").await;
        let code = client.error_code().await;
        assert_eq!(code, "resume_failed");
        t.publish("t1", "u1", 2).await;
        assert_eq!(client.event().await.seq, 2, "live events are not held back");

        // From the log's last event: nothing to replay, nothing to report.
        let last = client_last_position(&t).await;
        let mut resumed = t.connect("user-u1").await;
        resumed
            .send(json!({"type": "subscribe", "topic": "tickets", "since": last.to_string()}))
            .await;
        resumed.expect_subscribed("tickets").await;
        t.publish("t1", "u1", 3).await;
        assert_eq!(resumed.event().await.seq, 3);
        resumed.ping_pong().await;
    })
    .await;
}

/// A client looping over `subscribe` with `since` and `unsubscribe` cannot make the hub read
/// the log without end: past `resumes_per_minute`, `since` gets `too_many_resumes`, and a
/// subscription without it still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_are_limited_per_principal() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().resumes_per_minute(2)).await;
        t.publish("t1", "u1", 1).await;
        let mut client = t.connect("user-u1").await;
        for _ in 0..2 {
            client
                .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
                .await;
            client.expect_subscribed("tickets").await;
            assert_eq!(client.event().await.seq, 1, "replayed");
            client
                .send(json!({"type": "unsubscribe", "topic": "tickets"}))
                .await;
            assert!(matches!(
                client.frame().await,
                ServerFrame::Unsubscribed { .. }
            ));
        }
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        assert_eq!(client.error_code().await, "too_many_resumes");
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 2).await;
        assert_eq!(client.event().await.seq, 2);
        // Another principal has a budget of its own (one principal's connections share theirs:
        // `reconnecting_does_not_refill_a_principals_resumes`).
        let mut other = t.connect("user-u2").await;
        other
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        other.expect_subscribed("tickets").await;
        // (u1's event is not u2's to see: subscribed is the answer.)
    })
    .await;
}

/// The position of the last event in the hub's store.
async fn client_last_position(t: &TestHub) -> Position {
    let all = t.store.read_all(Position::START, 1000).await.unwrap();
    all.last().and_then(|r| r.position).expect("a stored event")
}

/// An event store around the hub's: its reads take `delay` each (counting how many run at
/// once), and it runs `hook` once, when a replay's read has caught up but before the read
/// returns: what happens in that window is what the replay must not lose.
struct TestStore {
    inner: Arc<InMemoryEventStore>,
    hook: tokio::sync::Mutex<Option<BoxFuture<'static, ()>>>,
    delay: Duration,
    reading: std::sync::atomic::AtomicUsize,
    most_at_once: std::sync::atomic::AtomicUsize,
}

impl TestStore {
    fn new(inner: Arc<InMemoryEventStore>, delay: Duration) -> Self {
        Self {
            inner,
            hook: tokio::sync::Mutex::new(None),
            delay,
            reading: Default::default(),
            most_at_once: Default::default(),
        }
    }
}

#[async_trait]
impl EventStore for TestStore {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(&self, stream_id: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load(stream_id, after).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.reading.fetch_add(1, SeqCst) + 1;
        self.most_at_once.fetch_max(now, SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.reading.fetch_sub(1, SeqCst);
        let batch = self.inner.read_all(after, limit).await?;
        if batch.len() < limit {
            let hook = self.hook.lock().await.take();
            if let Some(hook) = hook {
                hook.await;
            }
        }
        Ok(batch)
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// More live events arrive during a replay than its hold buffer takes (5 here, 10 events):
/// the replay reads the dropped ones back from the store, so nothing is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_that_overflow_the_hold_buffer_are_read_back() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let store = Arc::new(InMemoryEventStore::new());
        let hooked = Arc::new(TestStore::new(store.clone(), Duration::ZERO));
        let t = TestHub::start_full(
            pubsub.clone(),
            HubOptions::new().replay_buffer(5).replay_batch(100),
            store.clone(),
            Some(hooked.clone()),
            |b| b,
        )
        .await;
        let mut since = None;
        for seq in 1..=20 {
            let stored = t.store("t1", "u1", seq).await;
            if seq == 5 {
                since = stored.position;
            }
        }
        // A live subscriber: once it has an event, the dispatch that held it for the replay
        // is done too.
        let mut watcher: Client = t.connect("agent-a1").await;
        watcher.subscribe("tickets").await;
        let publisher = Publisher::new(pubsub.clone(), Arc::new(TicketRouting));
        *hooked.hook.lock().await = Some(Box::pin(async move {
            for seq in 21..=30 {
                let stored = store
                    .append("ticket-t1", ExpectedVersion::Any, vec![record("t1", "u1", seq)])
                    .await
                    .unwrap();
                publisher.publish_all(&stored).await.unwrap();
            }
            for seq in 21..=30 {
                assert_eq!(watcher.event().await.seq, seq);
            }
        }));

        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": since.unwrap().to_string()}))
            .await;
        client.expect_subscribed("tickets").await;
        for seq in 6..=30 {
            assert_eq!(client.event().await.seq, seq);
        }
        t.publish("t1", "u1", 31).await;
        assert_eq!(client.event().await.seq, 31);
    })
    .await;
}

/// Only a resume that starts counts against the budget: a `since` refused as `forbidden` (or
/// as `unavailable`, which says to retry) leaves it as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resume_does_not_use_up_the_budget() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().resumes_per_minute(1)).await;
        t.store("t2", "u2", 1).await;
        t.publish("t1", "u1", 2).await;
        let mut client = t.connect("user-u1").await;
        for _ in 0..3 {
            client
                .send(json!({"type": "subscribe", "topic": "ticket:t2", "since": "0"}))
                .await;
            assert_eq!(client.error_code().await, "forbidden");
        }
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        client.expect_subscribed("tickets").await;
        assert_eq!(client.event().await.seq, 2, "replayed");
    })
    .await;
}

/// The test tokens, with each user's connections counted under its id.
struct Keyed;

#[async_trait]
impl cqrs_realtime::Authenticator for Keyed {
    type Principal = crate::support::User;

    async fn authenticate(
        &self,
        token: &str,
    ) -> Result<crate::support::User, cqrs_realtime::Unauthenticated> {
        crate::support::TestTokens.authenticate(token).await
    }

    fn connection_key(&self, user: &crate::support::User) -> Option<String> {
        Some(user.id.clone())
    }
}

/// With a `connection_key`, the resume budget is the principal's: closing the connection and
/// opening another does not refill it (a loop of reconnects could otherwise read the log
/// without end); another principal has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_a_principals_resumes() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_with_authenticator(
            Keyed,
            HubOptions::new().resumes_per_minute(2),
            |b| b,
        )
        .await;
        t.publish("t1", "u1", 1).await;
        for _ in 0..2 {
            let mut client = t.connect("user-u1").await;
            client
                .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
                .await;
            client.expect_subscribed("tickets").await;
            assert_eq!(client.event().await.seq, 1, "replayed");
            client.ws.close(None).await.unwrap();
        }
        let mut again = t.connect("user-u1").await;
        again
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        assert_eq!(again.error_code().await, "too_many_resumes");
        let mut other = t.connect("user-u2").await;
        other
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        other.expect_subscribed("tickets").await;
    })
    .await;
}

/// A hub whose replays read a [`TestStore`] with `delay`, and `max_concurrent_replays` of
/// `replays`.
async fn slow_hub(
    replays: usize,
    delay: Duration,
    options: HubOptions,
) -> (TestHub, Arc<TestStore>) {
    let store = Arc::new(InMemoryEventStore::new());
    let slow = Arc::new(TestStore::new(store.clone(), delay));
    let options = options.max_concurrent_replays(replays).replay_batch(10);
    let hub = TestHub::start_full(
        Arc::new(InMemoryPubSub::new()),
        options,
        store,
        Some(slow.clone()),
        |b| b,
    )
    .await;
    (hub, slow)
}

/// After a pub/sub reconnect every client is told to resume at once: the hub's store reads
/// for replays run at most `max_concurrent_replays` at a time, and every resume still goes
/// through, each waiting its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_read_the_store_at_most_max_concurrent_replays_at_once() {
    with_timeout(TEST_LIMIT, async {
        let (t, slow) = slow_hub(2, Duration::from_millis(100), HubOptions::new()).await;
        for seq in 1..=50 {
            t.store("t1", "u1", seq).await;
        }
        let mut clients = Vec::new();
        // None of them may see u1's events: each replay reads five batches and sends none.
        // Connected first, then all asked at once: handshakes of a loaded machine could
        // otherwise space the replays out so that none overlap.
        for user in ["user-u2", "user-u3", "user-u4", "user-u5", "user-u6"] {
            clients.push(t.connect(user).await);
        }
        for client in &mut clients {
            client
                .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
                .await;
        }
        for client in &mut clients {
            client.expect_subscribed("tickets").await;
            // Answered after the replay: it is over.
            client.ping_pong().await;
        }
        let most = slow.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(most, 2, "reads at once");
    })
    .await;
}

/// A client that stops reading while it resumes keeps no replay permit while its replay
/// waits for room: another resume goes through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waiting_for_a_slow_client_lets_other_resumes_read() {
    with_timeout(TEST_LIMIT, async {
        let (t, _) = slow_hub(
            1,
            Duration::ZERO,
            HubOptions::new()
                .operation_timeout(Duration::from_secs(5))
                .resumes_per_minute(1)
                .send_queue(8),
        )
        .await;
        // 16 MiB of events, more than the sockets' buffers take.
        for seq in 1..=2_000 {
            t.publish_padded("t1", "u1", seq, 8 * 1024).await;
        }
        // u1's replay cannot finish: its client reads nothing (a 4 KiB socket buffer, an
        // 8-frame queue).
        let mut stuck = t.connect_small_buffer("user-u1").await;
        stuck
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        eventually(Duration::from_secs(10), "u1's replay to start", || {
            let stats = t.hub.stats();
            async move { (stats.replayed_events > 0).then_some(()) }
        })
        .await;

        // u2 sees none of u1's events: its replay reads all 200 batches and sends none.
        let mut other = t.connect("user-u2").await;
        other
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        other.expect_subscribed("tickets").await;
        other.ping_pong().await;
        let stats = t.hub.stats();
        assert!(
            stats.replayed_events < 2_000,
            "u1's replay is still running: {stats:?}"
        );
        drop(stuck);
    })
    .await;
}

/// A resume that waits out `operation_timeout` for a replay permit, all of them reading for
/// other resumes, gets `unavailable` and is not registered; the refusal costs its principal
/// nothing of its budget (one a minute here), so it goes through once the other replay ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_finds_every_permit_busy_is_told_to_try_again() {
    with_timeout(TEST_LIMIT, async {
        let (t, slow) = slow_hub(
            1,
            Duration::from_millis(100),
            HubOptions::new()
                .operation_timeout(Duration::from_secs(1))
                .resumes_per_minute(1),
        )
        .await;
        // Forty reads of 100 ms: a replay that holds the one permit for four seconds, of which
        // the second resume waits one.
        for seq in 1..=400 {
            t.store("t1", "u1", seq).await;
        }
        let resume = json!({"type": "subscribe", "topic": "tickets", "since": "0"});
        let mut first = t.connect("user-u3").await;
        first.send(resume.clone()).await;
        first.expect_subscribed("tickets").await;

        let mut other = t.connect("user-u2").await;
        other.send(resume.clone()).await;
        assert_eq!(other.error_code().await, "unavailable");
        assert_eq!(
            t.hub.stats().subscriptions,
            1,
            "u2's subscription was not made"
        );

        first.ping_pong().await;
        other.send(resume).await;
        other.expect_subscribed("tickets").await;
        other.ping_pong().await;
        let most = slow.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(most, 1, "reads at once");
    })
    .await;
}
