//! Timeouts and intervals of `Duration::MAX` (or near it: "as long as it takes", as a value
//! taken from configuration might be) neither overflow the clock nor stall a closing
//! connection. A panic there happened in a connection's task or in the keepalive, where tokio
//! caught it and nobody saw it: these tests count such panics with a panic hook.

use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How many panics in this process so far said an `Instant` overflowed (installs the hook
/// that counts them on the first call; it hands every panic on to the previous hook).
fn instant_overflows() -> usize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .payload_as_str()
                .is_some_and(|message| message.contains("overflow when adding duration"))
            {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

/// A close timeout of `Duration::MAX` waits as long as the close handshake takes (its
/// deadline, `now + close_timeout`, overflowed: the connection's task panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_timeout_of_duration_max_closes_cleanly() {
    let before = instant_overflows();
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().close_timeout(Duration::MAX)).await;
        let mut client = t.connect("user-u1").await;
        client.ping_pong().await;
        t.hub.shutdown();
        assert_eq!(client.closed_with(10).await, close_code::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the connection closed");
    })
    .await;
    assert_eq!(instant_overflows(), before, "no Instant overflowed");
}

/// A ping interval too long for the clock never comes round (the keepalive's first tick,
/// `now + ping_interval`, overflowed: its task panicked); the connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_interval_near_duration_max_starts_no_keepalive_and_does_not_panic() {
    let before = instant_overflows();
    with_timeout(TEST_LIMIT, async {
        let options = HubOptions::new()
            .ping_interval(Duration::MAX - Duration::from_secs(1))
            .idle_timeout(Duration::MAX);
        let t = TestHub::start(options).await;
        // The first handshake starts the keepalive.
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
        // Every task this test's runtime ran has ended, the keepalive's included: it ran its
        // first poll, where an overflow would have panicked.
        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the connection closed");
        drop((client, t));
        let runtime = tokio::runtime::Handle::current().metrics();
        eventually(Duration::from_secs(10), "every task has ended", || async {
            (runtime.num_alive_tasks() == 0).then_some(())
        })
        .await;
    })
    .await;
    assert_eq!(instant_overflows(), before, "no Instant overflowed");
}
