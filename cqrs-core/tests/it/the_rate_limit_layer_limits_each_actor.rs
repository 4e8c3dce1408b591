//! `RateLimitLayer`: a token bucket per actor for commands and queries, refilled by the
//! layer's clock; a refusal is `RateLimited` with `details.retry_after` and never reaches the
//! handler; events, dispatches without an actor, dispatches caused by another message and
//! other actors are not held back; the buckets are bounded by `max_actors`.

use crate::fixtures::*;
use cqrs_core::clock::ManualClock;
use cqrs_core::middleware::RateLimitLayer;
use cqrs_core::{
    CommandBus, CommandContext, CommandHandler, DispatchError, ErrorKind, EventBus, EventEnvelope,
    HandlerError, Metadata, QueryBus, async_trait,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts the commands that reach it.
#[derive(Clone, Default)]
struct Reached(Arc<AtomicUsize>);

#[async_trait]
impl CommandHandler<Add> for Reached {
    async fn handle(&self, cmd: Add, _ctx: &mut CommandContext) -> Result<u64, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(cmd.a + cmd.b)
    }
}

/// A command bus with `limit`, and what counts the commands that reach its handler.
fn limited(limit: RateLimitLayer) -> (CommandBus, Reached) {
    let reached = Reached::default();
    let bus = CommandBus::builder()
        .layer(limit)
        .handler(reached.clone())
        .build()
        .unwrap();
    (bus, reached)
}

/// Sends an `Add` with `metadata`.
async fn send(bus: &CommandBus, metadata: Metadata) -> Result<u64, DispatchError> {
    bus.dispatch_with(Add::default(), metadata).await
}

fn by(actor: &str) -> Metadata {
    Metadata::new().with_actor(actor)
}

fn retry_after(error: &DispatchError) -> u64 {
    match error {
        DispatchError::Handler(refused) => {
            assert_eq!(refused.kind(), ErrorKind::RateLimited, "{refused}");
            assert_eq!(refused.code(), "rate_limited");
            refused.details().expect("details")["retry_after"]
                .as_u64()
                .expect("retry_after in whole seconds")
        }
        other => panic!("expected the layer's refusal, got {other:?}"),
    }
}

#[test]
fn an_actor_gets_its_burst_then_waits_for_the_refill() {
    let clock = ManualClock::new();
    let (bus, reached) = limited(RateLimitLayer::per_actor(0.5, 3).clock(Arc::new(clock.clone())));
    run(async {
        for _ in 0..3 {
            send(&bus, by("alice")).await.unwrap();
        }
        let refused = bus
            .dispatch_with(Add::default(), by("alice"))
            .await
            .unwrap_err();
        assert_eq!(retry_after(&refused), 2, "one token every 2 s");
        assert_eq!(
            reached.0.load(Ordering::SeqCst),
            3,
            "a refusal never reaches the handler"
        );

        // Others are not held back by alice: another actor, work without one, and what
        // alice's requests caused (a policy's commands, which keep her as the actor).
        send(&bus, by("bob")).await.unwrap();
        for _ in 0..10 {
            send(&bus, Metadata::new()).await.unwrap();
            send(&bus, by("alice").caused()).await.unwrap();
        }

        clock.advance(Duration::from_millis(1500));
        let refused = bus
            .dispatch_with(Add::default(), by("alice"))
            .await
            .unwrap_err();
        assert_eq!(
            retry_after(&refused),
            1,
            "0.5 s left, rounded up to a second"
        );
        clock.advance(Duration::from_millis(500));
        send(&bus, by("alice")).await.unwrap();
        send(&bus, by("alice")).await.unwrap_err();

        // A long pause refills the bucket to its burst, no more.
        clock.advance(Duration::from_secs(3600));
        for _ in 0..3 {
            send(&bus, by("alice")).await.unwrap();
        }
        send(&bus, by("alice")).await.unwrap_err();
        // A clock set back refills nothing, and fails nothing.
        clock.set(clock_at(&clock) - chrono::Duration::hours(2));
        send(&bus, by("alice")).await.unwrap_err();
    });
}

fn clock_at(clock: &ManualClock) -> chrono::DateTime<chrono::Utc> {
    cqrs_core::clock::Clock::now(clock)
}

#[test]
fn queries_are_limited_and_events_are_not() {
    let clock = ManualClock::new();
    let queries = QueryBus::builder()
        .layer(RateLimitLayer::per_actor(1.0, 1).clock(Arc::new(clock.clone())))
        .handler(DoubleHandler)
        .build()
        .unwrap();
    let counter = Counter::named("counter");
    let events = EventBus::builder()
        .layer(RateLimitLayer::per_actor(1.0, 1).clock(Arc::new(clock.clone())))
        .handler(counter.clone())
        .build()
        .unwrap();
    run(async {
        assert_eq!(
            queries.dispatch_with(Double(2), by("alice")).await.unwrap(),
            4
        );
        let refused = queries
            .dispatch_with(Double(2), by("alice"))
            .await
            .unwrap_err();
        assert_eq!(retry_after(&refused), 1);
        for sum in 0..5 {
            events
                .publish(EventEnvelope::new(Added { sum }, by("alice")))
                .await
                .unwrap();
        }
        assert_eq!(counter.seen(), 5, "an event has happened: never refused");
    });
}

#[test]
fn buckets_are_bounded_and_idle_ones_make_room() {
    let clock = ManualClock::new();
    let (bus, _) = limited(
        RateLimitLayer::per_actor(1.0, 1)
            .clock(Arc::new(clock.clone()))
            .max_actors(2),
    );
    run(async {
        send(&bus, by("a")).await.unwrap();
        send(&bus, by("b")).await.unwrap();
        // Both buckets busy: a third actor is let through, untracked, every time.
        for _ in 0..3 {
            send(&bus, by("c")).await.unwrap();
        }
        send(&bus, by("a")).await.unwrap_err();

        // Once a and b have refilled (a second), they make room, and c is tracked.
        clock.advance(Duration::from_secs(1));
        send(&bus, by("c")).await.unwrap();
        send(&bus, by("c")).await.unwrap_err();
    });
}

/// A rate so low that the wait overflows a `Duration` is refused with the longest wait, not
/// a panic.
#[test]
fn a_vanishing_rate_refuses_without_panicking() {
    let (bus, _) = limited(RateLimitLayer::per_actor(1e-30, 1));
    run(async {
        send(&bus, by("alice")).await.unwrap();
        let refused = bus
            .dispatch_with(Add::default(), by("alice"))
            .await
            .unwrap_err();
        assert_eq!(retry_after(&refused), u64::MAX);
    });
}

#[test]
#[should_panic(expected = "a burst of 0 would refuse every dispatch")]
fn a_burst_of_zero_is_refused_when_the_layer_is_made() {
    let _ = RateLimitLayer::per_actor(1.0, 0);
}

#[test]
#[should_panic(expected = "per_second must be a positive, finite number")]
fn a_rate_of_zero_is_refused_when_the_layer_is_made() {
    let _ = RateLimitLayer::per_actor(0.0, 1);
}
