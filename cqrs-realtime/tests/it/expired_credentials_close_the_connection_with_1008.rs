use crate::support::{Client, FRAME_DEADLINE, Read, TEST_LIMIT, TestHub, TestTokens, User};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::clock::{Clock, ManualClock};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{
    AuthenticateFn, Authenticator, HubBuilder, HubOptions, ServerFrame, Unauthenticated, close_code,
};
use futures_util::StreamExt;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const REASON: &str = "credentials expired";

/// The test tokens, whose principals named `temp…` expire at `at`; the others never do.
struct Expiring {
    at: DateTime<Utc>,
}

#[async_trait]
impl Authenticator for Expiring {
    type Principal = User;

    async fn authenticate(&self, token: &str) -> Result<User, Unauthenticated> {
        TestTokens.authenticate(token).await
    }

    fn connection_key(&self, user: &User) -> Option<String> {
        Some(user.id.clone())
    }

    fn expires_at(&self, user: &User) -> Option<DateTime<Utc>> {
        user.id.starts_with("temp").then_some(self.at)
    }
}

/// A hub on `clock` whose `temp…` principals expire 60 s after the clock's start.
async fn hub(clock: &ManualClock, options: HubOptions) -> TestHub {
    hub_with(clock, options, |b| b).await
}

/// [`hub`], its builder changed by `configure`.
async fn hub_with(
    clock: &ManualClock,
    options: HubOptions,
    configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
) -> TestHub {
    let authenticator = Expiring {
        at: clock.now() + chrono::Duration::seconds(60),
    };
    let clock = clock.clone();
    TestHub::start_with_authenticator(authenticator, options, move |b| {
        configure(b.clock(Arc::new(clock)))
    })
    .await
}

fn ticking() -> HubOptions {
    HubOptions::new().ping_interval(Duration::from_millis(20))
}

/// Reads `n` WebSocket pings and nothing else: `n` keepalive ticks passed this connection by
/// without closing it.
async fn pings(client: &mut Client, n: usize) {
    for _ in 0..n {
        match tokio::time::timeout(FRAME_DEADLINE, client.ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => {}
            other => panic!("expected a ping, got {other:?}"),
        }
    }
}

/// The close, which the client must get within a frame deadline (pings keep coming, so the
/// client's own read deadline never fires).
async fn closed_in_time(close: impl Future<Output = (u16, String)>) -> (u16, String) {
    tokio::time::timeout(FRAME_DEADLINE, close)
        .await
        .expect("the connection is closed within the deadline")
}

/// Up to its expiry, a connection gets its events through every keepalive tick; at the first
/// tick after it, the hub closes it with 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_at_the_first_tick_after_its_credentials_expire() {
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let t = hub(&clock, ticking()).await;
        let mut client = t.connect("agent-temp1").await;
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);

        // Just before the expiry: ticks come and go, events still arrive.
        clock.advance(Duration::from_secs(59));
        // The pong follows every ping queued before the clock moved.
        client.ping_pong().await;
        pings(&mut client, 3).await;
        t.publish("t1", "u1", 2).await;
        assert_eq!(client.event().await.seq, 2);

        clock.advance(Duration::from_secs(2));
        assert_eq!(
            closed_in_time(client.close_frame(100)).await,
            (close_code::POLICY_VIOLATION, REASON.to_owned())
        );
        expired_one_released(&t, 0).await;
    })
    .await;
}

/// Waits until the hub counted one close for expired credentials and released that
/// connection, `left` connections (each with one subscription) still open.
async fn expired_one_released(t: &TestHub, left: u64) {
    eventually(
        Duration::from_secs(10),
        "the expired connection is counted and released",
        || async {
            let stats = t.hub.stats();
            (stats.expired_closes == 1 && stats.connections == left && stats.subscriptions == left)
                .then_some(())
        },
    )
    .await;
}

/// The next thing `client` reads is the close for expired credentials, not `subscribed`.
async fn closed_as_expired(client: &mut Client) {
    match client.read().await {
        Read::Closed(Some(close)) => {
            assert_eq!(
                (u16::from(close.code), close.reason.as_str()),
                (close_code::POLICY_VIOLATION, REASON)
            );
        }
        Read::Frame(ServerFrame::Subscribed { topic, .. }) => {
            panic!("an expired principal got `subscribed` to {topic}")
        }
        other => panic!("expected the 1008 close, got {other:?}"),
    }
}

/// A `subscribe` after the expiry closes the connection at once, before the next tick, and is
/// never answered with `subscribed`; a principal without expiry subscribes as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_after_the_expiry_closes_the_connection_instead() {
    with_timeout(TEST_LIMIT, async {
        // No tick within the test: only the subscribe can close the connection.
        let options = HubOptions::new()
            .ping_interval(Duration::from_secs(600))
            .idle_timeout(Duration::from_secs(1200));
        let clock = ManualClock::new();
        let t = hub(&clock, options).await;
        let mut temp = t.connect("agent-temp1").await;
        temp.subscribe("tickets").await;
        let mut forever = t.connect("agent-forever").await;

        clock.advance(Duration::from_secs(61));
        temp.send(json!({"type": "subscribe", "topic": "ticket:t1"}))
            .await;
        closed_as_expired(&mut temp).await;
        // Reading on answers the close.
        let _ = tokio::time::timeout(FRAME_DEADLINE, temp.ws.next()).await;

        forever.subscribe("ticket:t1").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(forever.event().await.seq, 1);
        expired_one_released(&t, 1).await;
    })
    .await;
}

/// Past its limit of subscription changes too: the expiry is checked first, and the
/// connection closes at once instead of answering `too_many_subscription_changes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_after_the_expiry_closes_the_connection_past_the_change_limit_too() {
    with_timeout(TEST_LIMIT, async {
        let options = HubOptions::new()
            .ping_interval(Duration::from_secs(600))
            .idle_timeout(Duration::from_secs(1200))
            .subscription_changes_per_second(1);
        let clock = ManualClock::new();
        let t = hub(&clock, options).await;
        let mut temp = t.connect("agent-temp1").await;
        // The one change of this second.
        temp.subscribe("tickets").await;
        clock.advance(Duration::from_secs(61));
        temp.send(json!({"type": "subscribe", "topic": "ticket:t1"}))
            .await;
        closed_as_expired(&mut temp).await;
        eventually(Duration::from_secs(10), "the close is counted", || async {
            (t.hub.stats().expired_closes == 1).then_some(())
        })
        .await;
    })
    .await;
}

/// A principal without expiry stays open however far the clock moves, while an expiring one
/// on the same hub is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_without_expiry_is_never_closed_for_it() {
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let t = hub(&clock, ticking()).await;
        let mut forever = t.connect("agent-forever").await;
        forever.subscribe("tickets").await;
        let mut temp = t.connect("agent-temp1").await;
        temp.subscribe("tickets").await;

        clock.advance(Duration::from_secs(365 * 24 * 3600));
        // A tick after the advance closed the expiring one...
        assert_eq!(
            closed_in_time(temp.close_frame(100)).await,
            (close_code::POLICY_VIOLATION, REASON.to_owned())
        );
        // ...and more ticks after it pass the other by: the pong follows every ping queued
        // before, so these come from later ticks.
        forever.ping_pong().await;
        pings(&mut forever, 3).await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(forever.event().await.seq, 1);
        eventually(
            Duration::from_secs(10),
            "only the expiring connection is counted and released",
            || async {
                let stats = t.hub.stats();
                (stats.expired_closes == 1 && stats.connections == 1).then_some(())
            },
        )
        .await;
    })
    .await;
}

/// A handshake whose principal has already expired is refused with 401, not upgraded and
/// closed at the next tick; one that has not expired yet is upgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_expired_credentials_is_refused_with_401() {
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let t = hub(&clock, ticking()).await;
        drop(t.connect("agent-temp1").await);
        clock.advance(Duration::from_secs(60));
        match tokio_tungstenite::connect_async(t.url("agent-temp2")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401);
                let body = response.body().clone().unwrap_or_default();
                assert!(
                    String::from_utf8_lossy(&body).contains("expired"),
                    "{}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(_) => panic!("an expired principal was upgraded"),
            Err(other) => panic!("handshake failed: {other}"),
        }
        assert_eq!(t.hub.stats().handshakes_refused, 1);
    })
    .await;
}

/// The status and body of a handshake the hub refuses.
async fn refused(t: &TestHub, token: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(t.url(token)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
        Ok(_) => panic!("{token} was upgraded"),
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// An [`AuthenticateFn`] answers the hub's two other questions with the functions it is
/// given: its key caps one user's connections (429 past the limit), and its expiry refuses
/// an expired principal's handshake with 401. (Without them, the trait's defaults: no cap,
/// no expiry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_authenticator_gives_the_connection_key_and_expiry_it_is_told() {
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let at = clock.now() + chrono::Duration::seconds(60);
        let authenticator =
            AuthenticateFn::new(
                |token: String| async move { TestTokens.authenticate(&token).await },
            )
            .connection_key(|user: &User| Some(user.id.clone()))
            .expires_at(move |user: &User| user.id.starts_with("temp").then_some(at));
        let hub_clock = clock.clone();
        let t = TestHub::start_with_authenticator(
            authenticator,
            ticking().max_connections_per_principal(1),
            move |b| b.clock(Arc::new(hub_clock)),
        )
        .await;
        let _held = t.connect("agent-temp1").await;
        // `user-temp1` is the same user (`temp1`) under another token.
        let (status, body) = refused(&t, "user-temp1").await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("too_many_connections"), "{body}");

        clock.advance(Duration::from_secs(60));
        let (status, body) = refused(&t, "agent-temp2").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("expired"), "{body}");
        // A principal without expiry still connects.
        drop(t.connect("agent-u9").await);
    })
    .await;
}

/// A metrics recorder that panics counting the connections a keepalive tick closed for
/// expiry does not end the keepalive: the other connections are still pinged. (The task died
/// with it, and every connection's pings and expiry with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_panics_counting_expiry_leaves_the_keepalive_running() {
    use crate::a_metrics_recorder_that_panics_leaks_nothing::{Op, PanicsOnce};
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let recorder = PanicsOnce {
            names: vec![cqrs_realtime::metrics::names::EXPIRED_CLOSES],
            op: Op::CounterIncrement,
            armed: Arc::default(),
            always: false,
            calls: Arc::default(),
        };
        recorder
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The hub takes its metric handles when it is built, from this thread's recorder.
        let guard = metrics::set_default_local_recorder(&recorder);
        let t = hub(&clock, ticking()).await;
        drop(guard);
        let mut first = t.connect("agent-temp1").await;
        first.subscribe("tickets").await;
        let mut forever = t.connect("agent-forever").await;
        forever.subscribe("tickets").await;

        // The tick that closes the first panics counting it.
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            closed_in_time(first.close_frame(100)).await,
            (close_code::POLICY_VIOLATION, REASON.to_owned())
        );
        eventually(
            Duration::from_secs(10),
            "the recorder was called",
            || async {
                (recorder.calls.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
            },
        )
        .await;
        // The keepalive goes on: the pong follows every ping queued so far, and then ticks
        // still come.
        forever.ping_pong().await;
        pings(&mut forever, 3).await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(forever.event().await.seq, 1);
    })
    .await;
}

/// Allows every subscribe, taking its time: the clock moves past the `temp…` principals'
/// expiry while it decides on a `ticket:` topic.
struct SlowAuthorizer {
    clock: ManualClock,
}

#[async_trait]
impl cqrs_realtime::Authorizer<User> for SlowAuthorizer {
    async fn authorize_subscribe(
        &self,
        _: &User,
        topic: &cqrs_realtime::Topic,
    ) -> Result<(), cqrs_realtime::Refusal> {
        if topic.family() == "ticket" {
            self.clock.advance(Duration::from_secs(61));
        }
        Ok(())
    }

    fn may_see(&self, _: &User, _: &cqrs_realtime::Topic, _: &cqrs_realtime::PushedEvent) -> bool {
        true
    }
}

/// A subscribe whose authorization outlasts the credentials closes the connection instead of
/// answering `subscribed` (and replaying or pushing to the expired principal until the next
/// keepalive tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_that_outlasts_the_credentials_closes_the_connection() {
    with_timeout(TEST_LIMIT, async {
        let options = HubOptions::new()
            .ping_interval(Duration::from_secs(600))
            .idle_timeout(Duration::from_secs(1200));
        let clock = ManualClock::new();
        let rules = clock.clone();
        let t = hub_with(&clock, options, move |b| {
            b.authorizer(SlowAuthorizer { clock: rules })
        })
        .await;
        let mut temp = t.connect("agent-temp1").await;
        temp.subscribe("tickets").await;
        temp.send(json!({"type": "subscribe", "topic": "ticket:t1"}))
            .await;
        closed_as_expired(&mut temp).await;
        let _ = tokio::time::timeout(FRAME_DEADLINE, temp.ws.next()).await;
        expired_one_released(&t, 0).await;
    })
    .await;
}
