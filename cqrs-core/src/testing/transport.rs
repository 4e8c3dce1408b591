//! The event transport conformance suite. See [`EventTransport`] for the contract.
//!
//! Run it with [`transport_conformance!`](crate::transport_conformance).

use super::Harness;
use crate::EventRecord;
use crate::ports::{
    Consumer, ConsumerOptions, Delivery, DeliveryId, EventTransport, TransportError,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// What a transport adapter provides to its conformance suite.
#[async_trait]
pub trait TransportHarness: Harness {
    /// The transport under test.
    fn transport(&self) -> Arc<dyn EventTransport>;

    /// Consumer options with short intervals: `block` and `redelivery_delay` of a few hundred
    /// milliseconds at most. The suite sets the consumer name.
    fn options(&self) -> ConsumerOptions {
        ConsumerOptions::default()
            .block(Duration::from_millis(100))
            .redelivery_delay(Duration::from_millis(300))
    }

    /// The messages group `group` of `topic` dead-lettered, as event ids with how many times
    /// each was handed out and, where the adapter keeps it, the failure it kept (`Some`: the
    /// scenario checks it holds the reason of the last
    /// [`nack_with_reason`](crate::ports::Consumer::nack_with_reason), or of the
    /// [`dead_letter`](crate::ports::Consumer::dead_letter) that gave it up), when the adapter
    /// keeps dead letters (the port does not expose them). `None` (the default) leaves the
    /// dead-letter check out: the scenario then only checks that the message stops coming
    /// back.
    #[allow(clippy::type_complexity)]
    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
    ) -> Option<Vec<(Uuid, u32, Option<String>)>> {
        let _ = (topic, group);
        None
    }

    /// How many messages of `topic` are checked out to consumer `consumer` (the full name the
    /// suite gave it) of group `group` and not acknowledged, when the harness can tell (Redis:
    /// the consumer's rows in `XPENDING`). [`a_closed_consumer_releases_what_it_never_handed_out`]
    /// uses it to make sure the fetch it drops was served the message it then publishes,
    /// trying again on a new topic until one was. `None` (the default): the scenario runs
    /// once, and an adapter whose dropped fetch read nothing ahead passes without a release.
    async fn pending_to(&self, topic: &str, group: &str, consumer: &str) -> Option<usize> {
        let _ = (topic, group, consumer);
        None
    }
}

/// Expands to one `#[tokio::test]` per transport scenario.
///
/// `transport_conformance!(harness, without_key_order)` is for a transport that does not
/// order per key (`ordered_per_key` is false): it leaves out the scenarios on per-key order,
/// which fail on such a transport rather than pass without testing.
#[macro_export]
macro_rules! transport_conformance {
    ($make:path) => {
        $crate::transport_conformance!($make, without_key_order);
        $crate::__conformance!(
            $make,
            transport,
            [
                events_of_one_key_keep_their_order_across_two_consumers,
                a_keys_events_in_one_batch_come_in_order_with_one_order_key,
                a_closed_consumer_releases_what_it_held_behind_its_key,
            ]
        );
    };
    ($make:path, without_key_order) => {
        $crate::__conformance!(
            $make,
            transport,
            [
                a_transport_declares_the_capabilities_the_contract_requires,
                published_events_reach_a_consumer_in_order,
                a_stored_record_arrives_whole,
                a_group_created_later_sees_earlier_events,
                every_group_sees_every_event,
                two_consumers_in_one_group_split_the_events,
                two_consumers_fetching_at_once_never_share_an_event,
                a_nacked_event_comes_back_after_the_delay,
                an_unacknowledged_event_is_redelivered_to_another_consumer,
                an_acknowledged_event_is_not_delivered_again,
                events_without_a_partition_key_are_delivered_once_each,
                a_fetch_of_zero_takes_nothing,
                a_fetch_may_block_without_limit,
                a_delivery_kept_alive_is_not_handed_out_again,
                a_redelivery_delay_of_duration_max_never_redelivers,
                consumer_options_that_break_the_port_rules_are_refused,
                topics_that_break_the_port_rules_are_refused,
                a_payload_too_deep_to_read_back_is_refused_whole,
                a_group_without_a_name_is_refused,
                a_consumer_name_in_use_in_its_group_is_refused,
                keep_alive_leaves_alone_a_delivery_another_consumer_took_over,
                a_deferred_delivery_is_no_attempt,
                a_message_is_dead_lettered_after_max_deliveries,
                a_message_a_consumer_gives_up_on_is_dead_lettered_at_once,
                a_due_redelivery_comes_before_new_messages,
                a_defer_by_a_consumer_that_lost_the_delivery_takes_no_attempt_back,
                a_malformed_delivery_id_is_refused,
                a_nack_by_a_consumer_that_lost_the_delivery_does_not_hold_it_back,
                a_consumer_tells_its_redelivery_delay_and_keep_alive_interval,
                a_closed_consumer_releases_what_it_never_handed_out,
                a_closed_consumer_goes_on_fetching,
                an_event_bus_consumer_hands_a_redelivery_only_to_the_handlers_that_failed,
            ]
        );
    };
}

/// Fails a scenario on per-key order for a transport that does not order per key: it would
/// test nothing.
fn requires_key_order<H: TransportHarness>(h: &H) {
    assert!(
        h.transport().capabilities().ordered_per_key,
        "this transport does not order per key (`ordered_per_key` is false), so this scenario \
         tests nothing: run the suite with `transport_conformance!(harness, without_key_order)`, \
         which leaves the scenarios on order out"
    );
}

fn event(key: &str, n: u64) -> EventRecord {
    crate::testing::event_store::record(n).with_partition_key(Some(key.to_owned()))
}

fn n_of(d: &Delivery) -> u64 {
    d.record.payload["n"].as_u64().unwrap_or(u64::MAX)
}

async fn consumer<H: TransportHarness>(
    h: &H,
    topic: &str,
    group: &str,
    name: &str,
) -> Box<dyn Consumer> {
    consumer_with(h, topic, group, name, |o| o).await
}

/// Like [`consumer`], with the harness's options changed by `configure`.
async fn consumer_with<H: TransportHarness>(
    h: &H,
    topic: &str,
    group: &str,
    name: &str,
    configure: impl FnOnce(ConsumerOptions) -> ConsumerOptions,
) -> Box<dyn Consumer> {
    let options = configure(h.options().consumer_name(format!("{}-{name}", h.test_id())));
    h.transport()
        .consumer(topic, group, options)
        .await
        .expect("join the group")
}

/// One message of key `k` on `topic`, handed to consumer `slow` of group `g`, then, `slow`
/// stalling past the redelivery delay, taken over by consumer `other` of the group (both made
/// with the harness's options changed by `configure`).
struct TakenOver {
    slow: Box<dyn Consumer>,
    other: Box<dyn Consumer>,
    event: EventRecord,
    first: Delivery,
    taken: Delivery,
}

async fn taken_over<H: TransportHarness>(
    h: &H,
    topic: &str,
    configure: impl Fn(ConsumerOptions) -> ConsumerOptions,
) -> TakenOver {
    let mut slow = consumer_with(h, topic, "g", "slow", &configure).await;
    let mut other = consumer_with(h, topic, "g", "other", &configure).await;
    let event = event("k", 1);
    h.transport()
        .publish(topic, std::slice::from_ref(&event))
        .await
        .unwrap();
    let first = fetch_one(slow.as_mut(), "the first delivery").await;
    let taken = fetch_one(other.as_mut(), "the takeover").await;
    TakenOver {
        slow,
        other,
        event,
        first,
        taken,
    }
}

/// `c.fetch(max)`, checked against the port's bound: a transport that hands out more than
/// `max` overfills its caller's batch (and `fetch_one` would lose the rest).
async fn fetch_up_to(c: &mut dyn Consumer, max: usize) -> Vec<Delivery> {
    let batch = c.fetch(max).await.expect("fetch");
    let n = batch.len();
    assert!(
        n <= max,
        "fetch({max}) returned {n} deliveries: the port allows at most max"
    );
    batch
}

/// Fetches and acknowledges until `count` distinct events arrived or `deadline` passes.
async fn drain(c: &mut dyn Consumer, count: usize, deadline: Duration) -> Vec<Delivery> {
    let until = tokio::time::Instant::now() + deadline;
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < count && tokio::time::Instant::now() < until {
        let batch = fetch_up_to(c, 10).await;
        let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
        c.ack(&ids).await.expect("ack");
        for d in batch {
            seen.insert(d.record.event_id);
            got.push(d);
        }
    }
    got
}

/// Fetches until one delivery arrives, or panics after 10 s naming `what`.
async fn fetch_one(c: &mut dyn Consumer, what: &str) -> Delivery {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(d) = fetch_up_to(c, 1).await.pop() {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
    }
}

/// Fetches for two redelivery delays and a margin, failing with `what` if anything comes.
async fn nothing_comes_again<H: TransportHarness>(h: &H, c: &mut dyn Consumer, what: &str) {
    let delay = h.options().redelivery_delay;
    let until = tokio::time::Instant::now() + delay * 2 + Duration::from_millis(200);
    while tokio::time::Instant::now() < until {
        let again = fetch_up_to(c, 10).await;
        assert!(
            again.is_empty(),
            "{what}: {:?}",
            again.iter().map(|d| d.record.event_id).collect::<Vec<_>>()
        );
    }
}

fn missing_and_twice(expected: &[EventRecord], got: &[Delivery]) -> (Vec<Uuid>, Vec<Uuid>) {
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for d in got {
        *counts.entry(d.record.event_id).or_default() += 1;
    }
    let missing = expected
        .iter()
        .map(|e| e.event_id)
        .filter(|id| !counts.contains_key(id))
        .collect();
    let twice = counts
        .into_iter()
        .filter(|(_, c)| *c > 1)
        .map(|(id, _)| id)
        .collect();
    (missing, twice)
}

/// The transport declares what the port's contract requires of every transport: consumer
/// groups and redelivery. Scenarios skip what a transport declares it lacks, and a skipped
/// test passes: without this one, a transport declaring no redelivery would pass the suite
/// without a redelivery checked. (Per-key order is the one optional capability.)
pub async fn a_transport_declares_the_capabilities_the_contract_requires<H: TransportHarness>(
    h: &H,
) {
    let caps = h.transport().capabilities();
    assert!(
        caps.consumer_groups && caps.redelivery_delay,
        "the port's contract includes consumer groups and redelivery, but the transport \
         declares {caps:?}: the scenarios that skip without them would pass unchecked"
    );
}

/// A consumer receives published events with their content; in publish order when the
/// transport orders per key (all five share one).
pub async fn published_events_reach_a_consumer_in_order<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t1", h.test_id());
    let mut c = consumer(h, &topic, "g", "c1").await;
    let events: Vec<_> = (1..=5).map(|n| event("k", n)).collect();
    h.transport()
        .publish(&topic, &events)
        .await
        .expect("publish");
    let got = drain(c.as_mut(), 5, Duration::from_secs(10)).await;
    let (missing, twice) = missing_and_twice(&events, &got);
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {missing:?}, twice {twice:?}"
    );
    let mut order: Vec<u64> = got.iter().map(n_of).collect();
    if !h.transport().capabilities().ordered_per_key {
        // Order is not part of this transport's contract.
        order.sort_unstable();
    }
    assert_eq!(order, [1, 2, 3, 4, 5]);
    for d in &got {
        let sent = events.iter().find(|e| e.event_id == d.record.event_id);
        assert_eq!(Some(&d.record), sent, "the record arrives unchanged");
        assert_eq!(d.attempt, 1);
    }
}

/// A record as a relay publishes it, read from a store (stream id, version, position) with an
/// actor, a trace context and a payload JSON can get wrong, arrives field for field: a
/// transport-fed projection saves its checkpoint from the position, a realtime resume starts
/// from it, and handlers read the rest.
pub async fn a_stored_record_arrives_whole<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t-whole", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let sent = crate::testing::event_store::detailed_record()
        .with_stream("ticket-7", 12)
        .with_position(crate::Position::new(4_242));
    h.transport()
        .publish(&topic, std::slice::from_ref(&sent))
        .await
        .expect("publish");
    let got = fetch_one(c.as_mut(), "the stored record").await;
    let record = &got.record;
    assert_eq!(record.event_id, sent.event_id, "event id");
    assert_eq!(record.stream_id.as_deref(), Some("ticket-7"), "stream id");
    assert_eq!(record.stream_version, Some(12), "stream version");
    assert_eq!(
        record.position,
        Some(crate::Position::new(4_242)),
        "position"
    );
    assert_eq!(record.event_type, sent.event_type, "event type");
    assert_eq!(record.schema_version, 3, "schema version");
    assert_eq!(record.partition_key, sent.partition_key, "partition key");
    assert_eq!(record.payload, sent.payload, "payload");
    assert_eq!(record.metadata, sent.metadata, "metadata");
    assert_eq!(record, &sent, "the record arrives unchanged");
}

/// A group that joins after events were published still gets them.
pub async fn a_group_created_later_sees_earlier_events<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t2", h.test_id());
    let events: Vec<_> = (1..=3).map(|n| event("k", n)).collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let mut c = consumer(h, &topic, "late", "c1").await;
    let got = drain(c.as_mut(), 3, Duration::from_secs(10)).await;
    let (missing, _) = missing_and_twice(&events, &got);
    assert!(missing.is_empty(), "the late group missed {missing:?}");
}

/// Two groups each get every event, and only their topic's.
pub async fn every_group_sees_every_event<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t3", h.test_id());
    let mut a = consumer(h, &topic, "ga", "a").await;
    let mut b = consumer(h, &topic, "gb", "b").await;
    // Another topic's events, published first: a transport that mixed topics would hand
    // them out ahead of this topic's.
    let elsewhere: Vec<_> = (5..=6).map(|n| event(&format!("k{n}"), n)).collect();
    h.transport()
        .publish(&format!("{topic}-other"), &elsewhere)
        .await
        .unwrap();
    let events: Vec<_> = (1..=4).map(|n| event(&format!("k{n}"), n)).collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let ours: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    for (name, c) in [("ga", &mut a), ("gb", &mut b)] {
        let got = drain(c.as_mut(), 4, Duration::from_secs(10)).await;
        let (missing, _) = missing_and_twice(&events, &got);
        assert!(missing.is_empty(), "group {name} missed {missing:?}");
        let foreign: Vec<u64> = got
            .iter()
            .filter(|d| !ours.contains(&d.record.event_id))
            .map(n_of)
            .collect();
        assert!(
            foreign.is_empty(),
            "group {name} got events of another topic: {foreign:?}"
        );
    }
}

/// Two consumers in one group split the events: together they handle each exactly once (when
/// nothing fails), and both get some.
pub async fn two_consumers_in_one_group_split_the_events<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t4", h.test_id());
    let mut a = consumer(h, &topic, "g", "a").await;
    let mut b = consumer(h, &topic, "g", "b").await;
    let events: Vec<_> = (1..=40).map(|n| event(&format!("k{n}"), n)).collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while got_a.len() + got_b.len() < 40 && tokio::time::Instant::now() < until {
        // Take small batches in turn, so both consumers get a share.
        for (c, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
            let batch = fetch_up_to(c.as_mut(), 3).await;
            c.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
                .await
                .unwrap();
            got.extend(batch);
        }
    }
    let all: Vec<Delivery> = got_a.iter().chain(got_b.iter()).cloned().collect();
    let (missing, twice) = missing_and_twice(&events, &all);
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {missing:?}, twice {twice:?}"
    );
    if h.transport().capabilities().consumer_groups {
        assert!(
            !got_a.is_empty() && !got_b.is_empty(),
            "both consumers got work: a {}, b {}",
            got_a.len(),
            got_b.len()
        );
    }
}

/// Two consumers of one group fetching at the same time (both fetches in flight at once) never
/// get the same event when nothing fails, and together get every one: an adapter whose
/// hand-out is not atomic (reads its cursor, hands the event out, advances the cursor after
/// an `.await`) gives both the events they raced for.
pub async fn two_consumers_fetching_at_once_never_share_an_event<H: TransportHarness>(h: &H) {
    const EVENTS: usize = 200;
    let topic = format!("{}-t4c", h.test_id());
    // A redelivery delay no stall of a loaded machine reaches: an event fetched and not yet
    // acknowledged must not be handed to the other consumer as a redelivery.
    let long = |o: ConsumerOptions| o.redelivery_delay(Duration::from_secs(60));
    let a = consumer_with(h, &topic, "g", "a", long).await;
    let b = consumer_with(h, &topic, "g", "b", long).await;
    let events: Vec<_> = (1..=EVENTS as u64)
        .map(|n| event(&format!("k{n}"), n))
        .collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Each consumer on a task of its own, started together: on one task (`join!`) the two
    // fetches would only interleave at their `.await`s, and a hand-out that reads and
    // advances its cursor without one in between would never race.
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    let run = |mut c: Box<dyn Consumer>| {
        let (taken, start) = (taken.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            let mut got = Vec::new();
            while taken.load(std::sync::atomic::Ordering::SeqCst) < EVENTS
                && tokio::time::Instant::now() < until
            {
                let batch = fetch_up_to(c.as_mut(), 5).await;
                c.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
                    .await
                    .unwrap();
                taken.fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
                got.extend(batch);
            }
            got
        })
    };
    let (a, b) = (run(a), run(b));
    let (got_a, got_b) = (a.await.unwrap(), b.await.unwrap());
    let all: Vec<Delivery> = got_a.into_iter().chain(got_b).collect();
    let (missing, twice) = missing_and_twice(&events, &all);
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {missing:?}, twice {twice:?}"
    );
}

/// A nacked event is delivered again, after the redelivery delay, with a higher attempt.
pub async fn a_nacked_event_comes_back_after_the_delay<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t5", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let e = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&e))
        .await
        .unwrap();
    let first = fetch_one(c.as_mut(), "the first delivery").await;
    let nacked = std::time::Instant::now();
    c.nack(&first.id).await.unwrap();
    let again = fetch_one(c.as_mut(), "the redelivery").await;
    let waited = nacked.elapsed();
    assert_eq!(again.record.event_id, e.event_id);
    assert!(again.attempt >= 2, "attempt {} after a nack", again.attempt);
    // Not before the delay (less a little: a server's clock in whole milliseconds).
    let delay = h.options().redelivery_delay;
    assert!(
        waited + Duration::from_millis(10) >= delay,
        "redelivered after {waited:?}, before the redelivery delay of {delay:?}"
    );
    c.ack(std::slice::from_ref(&again.id)).await.unwrap();
}

/// An event a consumer took but never acknowledged (it crashed) reaches another consumer of
/// the group after the redelivery delay, not before, as its second delivery.
pub async fn an_unacknowledged_event_is_redelivered_to_another_consumer<H: TransportHarness>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t6", h.test_id());
    let mut crashed = consumer(h, &topic, "g", "crashed").await;
    let e = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&e))
        .await
        .unwrap();
    // The delivery happens after this instant, so its redelivery is due no sooner than a
    // redelivery delay after it.
    let before_taken = tokio::time::Instant::now();
    let taken = fetch_one(crashed.as_mut(), "the crashed consumer's delivery").await;
    assert_eq!((taken.record.event_id, taken.attempt), (e.event_id, 1));
    drop(crashed);
    // The survivor's fetches block for a fraction of the delay, so several of them end
    // within it; each must come back empty.
    let delay = h.options().redelivery_delay;
    let mut survivor = consumer_with(h, &topic, "g", "survivor", |o| o.block(delay / 6)).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let reclaimed = loop {
        let got = fetch_up_to(survivor.as_mut(), 1).await.pop();
        // Sound, whatever the timing: a redelivery returned by a fetch that ended before the
        // delay was over (less a little: a server's clock in whole milliseconds) happened
        // before the delay was over.
        let ended = tokio::time::Instant::now();
        if let Some(d) = got {
            assert!(
                ended + Duration::from_millis(10) >= before_taken + delay,
                "redelivered {:?} after it was taken, before the redelivery delay of {delay:?}",
                ended.saturating_duration_since(before_taken)
            );
            break d;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for the reclaimed event"
        );
    };
    assert_eq!(reclaimed.record.event_id, e.event_id);
    assert_eq!(reclaimed.attempt, 2, "the second delivery");
    survivor
        .ack(std::slice::from_ref(&reclaimed.id))
        .await
        .unwrap();
}

/// Two consumers handle a group's events concurrently; each key's events take effect in
/// publish order, though a consumer fails now and then.
pub async fn events_of_one_key_keep_their_order_across_two_consumers<H: TransportHarness>(h: &H) {
    requires_key_order(h);
    let topic = format!("{}-t7", h.test_id());
    let keys = ["a", "b", "c"];
    let events: Vec<_> = (1..=30).map(|n| event(keys[n as usize % 3], n)).collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let applied: Arc<tokio::sync::Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for name in ["a", "b"] {
        let mut c = consumer(h, &topic, "g", name).await;
        let applied = applied.clone();
        tasks.push(tokio::spawn(async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            let mut fail_next = true;
            while tokio::time::Instant::now() < until {
                if applied.lock().await.values().map(Vec::len).sum::<usize>() >= 30 {
                    break;
                }
                // The chains of this batch with a failed delivery: the rest of such a chain
                // is handed back unhandled, as the `Consumer::fetch` contract asks.
                let mut broken = HashSet::new();
                let batch = fetch_up_to(c.as_mut(), 4).await;
                for d in batch {
                    let key = d.record.partition_key.clone().unwrap_or_default();
                    if d.order_key.as_ref().is_some_and(|k| broken.contains(k)) {
                        c.defer(std::slice::from_ref(&d.id)).await.unwrap();
                        continue;
                    }
                    // Fail every other first attempt, to force redeliveries.
                    if d.attempt == 1 && fail_next {
                        fail_next = false;
                        broken.extend(d.order_key.clone());
                        c.nack(&d.id).await.unwrap();
                        continue;
                    }
                    fail_next = true;
                    let mut applied = applied.lock().await;
                    let list = applied.entry(key.clone()).or_default();
                    let n = d.record.payload["n"].as_u64().unwrap();
                    // A copy is at-least-once (a reclaim of a delivery whose consumer stalled):
                    // taken once, as an inbox would. (Not told apart by its `attempt`, which a
                    // transport may report one low after a reclaim.)
                    if !list.contains(&n) {
                        list.push(n);
                    }
                    drop(applied);
                    c.ack(std::slice::from_ref(&d.id)).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let applied = applied.lock().await;
    for key in keys {
        let expected: Vec<u64> = events
            .iter()
            .filter(|e| e.partition_key.as_deref() == Some(key))
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            applied.get(key).cloned().unwrap_or_default(),
            expected,
            "order of key {key}"
        );
    }
}

/// Where a batch holds several events of one key, they are in publish order and share one
/// order key (a chain, see `Consumer::fetch`); every key's events arrive in order overall.
pub async fn a_keys_events_in_one_batch_come_in_order_with_one_order_key<H: TransportHarness>(
    h: &H,
) {
    requires_key_order(h);
    let topic = format!("{}-t9", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let events: Vec<_> = (1..=12)
        .map(|n| event(["a", "b", "c"][n as usize % 3], n))
        .collect();
    h.transport().publish(&topic, &events).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while all.len() < events.len() && tokio::time::Instant::now() < until {
        let batch = fetch_up_to(c.as_mut(), 8).await;
        let mut order_keys: HashMap<String, Option<String>> = HashMap::new();
        let mut last: HashMap<String, u64> = HashMap::new();
        for d in &batch {
            let key = d.record.partition_key.clone().unwrap_or_default();
            assert!(
                d.order_key.is_some(),
                "a delivery of key `{key}` came without an order key: on a transport that \
                 orders per key, every keyed delivery names its chain"
            );
            let first = order_keys.entry(key.clone()).or_insert(d.order_key.clone());
            assert_eq!(
                *first, d.order_key,
                "key {key}'s deliveries share an order key"
            );
            let n = n_of(d);
            if let Some(prev) = last.insert(key.clone(), n) {
                assert!(prev < n, "key {key} in batch order: {prev} then {n}");
            }
        }
        let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
        c.ack(&ids).await.expect("ack");
        all.extend(batch);
    }
    for key in ["a", "b", "c"] {
        let got: Vec<u64> = all
            .iter()
            .filter(|d| d.record.partition_key.as_deref() == Some(key))
            .map(n_of)
            .collect();
        let expected: Vec<u64> = events
            .iter()
            .filter(|e| e.partition_key.as_deref() == Some(key))
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(got, expected, "key {key} arrives once each, in order");
    }
}

/// Once acknowledged, an event is not delivered again, even after the redelivery delay.
pub async fn an_acknowledged_event_is_not_delivered_again<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t8", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let e = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&e))
        .await
        .unwrap();
    let got = drain(c.as_mut(), 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    // Wait past the redelivery delay, then look again.
    nothing_comes_again(h, c.as_mut(), "delivered again after ack").await;
}

/// A delivery id not of the transport's form (written by hand, another transport's) is
/// refused as [`TransportError::Invalid`] by every call that takes one, and a batch holding it
/// settles nothing of the batch: passed over without a word, a typo would leave the message
/// to come back as if it were never answered. (See [`Consumer`]: one of the right form that
/// is no longer the consumer's is left alone instead.)
pub async fn a_malformed_delivery_id_is_refused<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t-badid", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let e = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&e))
        .await
        .unwrap();
    let d = fetch_one(c.as_mut(), "the event").await;
    let made_up = DeliveryId("not a delivery id".to_owned());
    let both = [d.id.clone(), made_up.clone()];
    let refused = |what: &str, result: Result<(), TransportError>| match result {
        Err(TransportError::Invalid(_)) => {}
        other => panic!("{what} of a made-up id: refused as `Invalid`, not: {other:?}"),
    };
    refused("ack", c.ack(&both).await);
    refused("nack", c.nack(&made_up).await);
    refused(
        "nack_with_reason",
        c.nack_with_reason(&made_up, "a reason").await,
    );
    refused("defer", c.defer(&both).await);
    refused("dead_letter", c.dead_letter(&made_up, "a reason").await);
    refused("keep_alive", c.keep_alive(&both).await);
    // The refused ack settled nothing: the real delivery is still this consumer's, so its
    // nack hands it back (an acknowledged one would not come again), as a second attempt.
    c.nack(&d.id).await.unwrap();
    let again = fetch_one(c.as_mut(), "the event nacked after the refused calls").await;
    assert_eq!(
        (again.record.event_id, again.attempt),
        (e.event_id, 2),
        "the refused ack or defer took effect"
    );
    c.ack(std::slice::from_ref(&again.id)).await.unwrap();
    nothing_comes_again(h, c.as_mut(), "an acknowledged message came back").await;
}

/// Events without a partition key (ordered by nothing, in no lane) are delivered like keyed
/// ones, batched or alone: each once, unchanged (still without a key), and not again once
/// acknowledged.
pub async fn events_without_a_partition_key_are_delivered_once_each<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t-nokey", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    let mut events: Vec<_> = (1..=4).map(crate::testing::event_store::record).collect();
    assert!(events.iter().all(|e| e.partition_key.is_none()));
    events.push(event("k", 5));
    h.transport()
        .publish(&topic, &events)
        .await
        .expect("publish");
    let alone = crate::testing::event_store::record(6);
    h.transport()
        .publish(&topic, std::slice::from_ref(&alone))
        .await
        .expect("publish one");
    events.push(alone);
    let got = drain(c.as_mut(), events.len(), Duration::from_secs(10)).await;
    let (missing, twice) = missing_and_twice(&events, &got);
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {missing:?}, twice {twice:?}"
    );
    for d in &got {
        let sent = events.iter().find(|e| e.event_id == d.record.event_id);
        assert_eq!(Some(&d.record), sent, "the record arrives unchanged");
    }
    nothing_comes_again(h, c.as_mut(), "delivered again after ack").await;
}

/// `fetch(0)` asks for nothing and takes nothing: it returns an empty batch at once (not after
/// its `block`, here 10 s, whether events wait or not) without counting a delivery, and the
/// next fetch gets the event on its first attempt. (A Redis `XREADGROUP` with `COUNT 0` reads
/// every entry.)
pub async fn a_fetch_of_zero_takes_nothing<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t12", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.block(Duration::from_secs(10))).await;
    let at_once = Duration::from_secs(2);
    let fetched = tokio::time::timeout(at_once, c.fetch(0))
        .await
        .expect("fetch(0) on an empty topic waited for its block");
    assert!(fetched.unwrap().is_empty());
    h.transport()
        .publish(&topic, &[event("k", 1), event("k", 2)])
        .await
        .unwrap();
    let fetched = tokio::time::timeout(at_once, c.fetch(0))
        .await
        .expect("fetch(0) waited for its block");
    assert!(fetched.unwrap().is_empty(), "fetch(0) handed out events");
    let got = drain(c.as_mut(), 2, Duration::from_secs(10)).await;
    let mut attempts: Vec<(u64, u32)> = got.iter().map(|d| (n_of(d), d.attempt)).collect();
    // In publish order where the transport orders per key; either way each on its first try.
    if !h.transport().capabilities().ordered_per_key {
        attempts.sort_unstable();
    }
    assert_eq!(
        attempts,
        [(1, 1), (2, 1)],
        "(event, attempt) of the two events after a fetch(0): each on its first delivery, so \
         fetch(0) must not have taken one"
    );
}

/// `block(Duration::MAX)` means "wait as long as it takes": a fetch waiting that way returns
/// once an event is published (it must not overflow the clock computing its deadline).
pub async fn a_fetch_may_block_without_limit<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t20", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.block(Duration::MAX)).await;
    let fetch = c.fetch(10);
    tokio::pin!(fetch);
    // With nothing published it waits: no early empty answer, no error from a deadline
    // that overflowed. (Not dropped: a dropped read may leave what it got pending.)
    tokio::select! {
        answer = &mut fetch => panic!("a fetch with nothing to fetch returned: {answer:?}"),
        () = tokio::time::sleep(Duration::from_millis(200)) => {}
    }
    // Published while the fetch waits.
    h.transport()
        .publish(&topic, &[event("k", 1)])
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the fetch returns once an event is published")
        .expect("fetch");
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [1]);
}

/// A delivery its consumer keeps alive ([`Consumer::keep_alive`]) is not handed out to
/// another consumer, however long past the redelivery delay; once acknowledged, it is gone.
pub async fn a_delivery_kept_alive_is_not_handed_out_again<H: TransportHarness>(h: &H) {
    // A run this machine stalls for a whole delay between two keep-alives tells nothing: run
    // again on a fresh topic, a few times, and fail if none could tell.
    const RUNS: usize = 3;
    for run in 1..=RUNS {
        if kept_alive_run(h, run).await {
            return;
        }
        eprintln!(
            "inconclusive run {run} of {RUNS}: this test stalled for the whole redelivery delay \
             between two keep-alives"
        );
    }
    panic!("no run of {RUNS} could tell: each stalled for a whole redelivery delay");
}

/// One run of [`a_delivery_kept_alive_is_not_handed_out_again`]: `false` when it could not
/// tell (it stalled for a whole delay between two keep-alives).
async fn kept_alive_run<H: TransportHarness>(h: &H, run: usize) -> bool {
    let topic = format!("{}-t10-{run}", h.test_id());
    // One turn of the loop below is a keep-alive, then a fetch by `c2` that blocks 50 ms: about
    // 50 ms and two round trips, so the 1 s delay is some twenty turns, and a slow machine
    // stretching every turn several times over still keeps the delivery alive.
    let delay = Duration::from_secs(1);
    let turn = Duration::from_millis(50);
    let mut c1 = consumer_with(h, &topic, "g", "c1", |o| o.redelivery_delay(delay)).await;
    let mut c2 = consumer_with(h, &topic, "g", "c2", |o| {
        o.redelivery_delay(delay).block(turn)
    })
    .await;
    h.transport()
        .publish(&topic, &[event("k", 1)])
        .await
        .unwrap();
    let d = fetch_one(c1.as_mut(), "the event").await;
    let until = tokio::time::Instant::now() + delay * 3;
    while tokio::time::Instant::now() < until {
        let kept_from = tokio::time::Instant::now();
        c1.keep_alive(std::slice::from_ref(&d.id)).await.unwrap();
        let again = fetch_up_to(c2.as_mut(), 10).await;
        if again.is_empty() {
            continue;
        }
        // Sound, whatever the timing: the keep-alive took effect after `kept_from`, so a
        // delivery to `c2` before a whole delay after it broke the keep-alive. Later, the
        // machine stalled this loop for a delay: the delivery was due again, rightly.
        assert!(
            tokio::time::Instant::now() >= kept_from + delay,
            "handed out again while kept alive: {:?}",
            again.iter().map(n_of).collect::<Vec<_>>()
        );
        return false;
    }
    c1.ack(std::slice::from_ref(&d.id)).await.unwrap();
    // A keep-alive that raced the ack (a consume loop's timer) leaves the acknowledged
    // delivery alone: it must not bring it back.
    c1.keep_alive(std::slice::from_ref(&d.id)).await.unwrap();
    let until = tokio::time::Instant::now() + delay + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        assert!(
            fetch_up_to(c2.as_mut(), 10).await.is_empty(),
            "delivered again after its ack (and a keep-alive after the ack)"
        );
    }
    true
}

/// `redelivery_delay(Duration::MAX)` ("never redeliver by time") is no panic: a consumer
/// fetches, hands back, keeps alive and defers with it, and nothing comes back meanwhile.
pub async fn a_redelivery_delay_of_duration_max_never_redelivers<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t11", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.redelivery_delay(Duration::MAX)).await;
    h.transport()
        .publish(&topic, &[event("k", 1), event("k", 2)])
        .await
        .unwrap();
    let got = drain_unacked(c.as_mut(), 2).await;
    let ids: Vec<_> = got.iter().map(|d| d.id.clone()).collect();
    c.keep_alive(&ids).await.unwrap();
    c.nack(&ids[0]).await.unwrap();
    c.defer(&ids[1..]).await.unwrap();
    // Nothing is due, even well past the delay every other scenario runs with (one fetch
    // would return before a redelivery by that delay came due).
    nothing_comes_again(h, c.as_mut(), "nothing is due, but got").await;
    if let Some(every) = c.keep_alive_interval() {
        assert!(every > Duration::ZERO);
    }
}

/// Fetches until `count` deliveries arrived (without acknowledging them), for up to 10 s.
async fn drain_unacked(c: &mut dyn Consumer, count: usize) -> Vec<Delivery> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < count && tokio::time::Instant::now() < until {
        got.extend(fetch_up_to(c, count - got.len()).await);
    }
    assert_eq!(got.len(), count, "deliveries");
    got
}

/// Options that break the rules every transport holds ([`ConsumerOptions::validate`]: no
/// consumer name, no delivery allowed) are refused with `Invalid`, naming the problem, by
/// every adapter alike: a test on the in-memory transport fails where production would.
pub async fn consumer_options_that_break_the_port_rules_are_refused<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t21", h.test_id());
    let transport = h.transport();
    for (what, options) in [
        (
            "max_deliveries",
            h.options().consumer_name("c").max_deliveries(0),
        ),
        ("consumer_name", h.options().consumer_name("")),
    ] {
        match transport.consumer(&topic, "g", options).await {
            Err(crate::ports::TransportError::Invalid(message)) => {
                assert!(message.contains(what), "{what}: {message}");
            }
            Err(other) => panic!("{what}: expected Invalid, got {other}"),
            Ok(_) => panic!("{what}: a consumer with broken options was made"),
        }
    }
}

/// Topic names that break the rules every transport holds
/// ([`validate_topic`](crate::ports::validate_topic): a name, no `{` or `}`) are
/// refused with `Invalid` by `consumer` and `publish` alike, naming the topic and the rule: a
/// test on the in-memory transport fails where Redis would.
pub async fn topics_that_break_the_port_rules_are_refused<H: TransportHarness>(h: &H) {
    let transport = h.transport();
    let id = h.test_id();
    for (topic, rule) in [
        (String::new(), "must not be empty"),
        (format!("{id}-a{{b"), "must not contain `{` or `}`"),
        (format!("}}{id}-t"), "must not contain `{` or `}`"),
    ] {
        let named = format!("topic `{topic}`");
        let check = |what: &str, result: Result<(), TransportError>| match result {
            Err(TransportError::Invalid(message)) => assert!(
                message.contains(&named) && message.contains(rule),
                "{what} of {named}: the message names the topic and the rule `{rule}`: {message}"
            ),
            Err(other) => panic!("{what} of {named}: expected Invalid, got {other}"),
            Ok(()) => panic!("{what} of {named}: accepted"),
        };
        let consumer = transport
            .consumer(&topic, "g", h.options().consumer_name(format!("{id}-c")))
            .await
            .map(drop);
        check("consumer", consumer);
        check("publish", transport.publish(&topic, &[event("k", 1)]).await);
        check("an empty publish", transport.publish(&topic, &[]).await);
    }
    let fine = format!("{id}-fine.topic:with/marks");
    transport
        .publish(&fine, &[event("k", 1)])
        .await
        .expect("a topic within the rules");
}

/// A batch holding a payload nested more than
/// [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH) deep is refused whole with `Codec`
/// ([`validate_payloads`](crate::ports::validate_payloads)), the bound every event store
/// holds payloads to, below what a decoder reads. One exactly that deep arrives whole.
pub async fn a_payload_too_deep_to_read_back_is_refused_whole<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t-deep", h.test_id());
    let mut c = consumer(h, &topic, "g", "c").await;
    // `{"n": n, "deep": [[..]]}`, nested `depth` deep in all.
    let nested = |n: u64, depth: usize| {
        let mut deep = serde_json::json!(1);
        for _ in 1..depth {
            deep = serde_json::json!([deep]);
        }
        let mut record = event("k", n);
        record.payload = serde_json::json!({ "n": n, "deep": deep });
        record
    };
    let max = crate::ports::MAX_PAYLOAD_DEPTH;
    let too_deep = nested(1, max + 1);
    for batch in [vec![too_deep.clone()], vec![event("k", 1), too_deep]] {
        match h.transport().publish(&topic, &batch).await {
            Err(TransportError::Codec(why)) => assert!(
                why.to_string().contains(&format!("more than {max} deep")),
                "the error says why: {why}"
            ),
            other => panic!("a payload {} deep: expected Codec, got {other:?}", max + 1),
        }
    }
    let at_the_limit = nested(2, max);
    h.transport()
        .publish(&topic, std::slice::from_ref(&at_the_limit))
        .await
        .expect("a payload as deep as the limit");
    let got = fetch_one(c.as_mut(), "the payload as deep as the limit").await;
    assert_eq!(
        got.record, at_the_limit,
        "it arrives whole, and nothing of the refused batches was published"
    );
}

/// A group without a name ([`validate_group`](crate::ports::validate_group)) is refused with
/// `Invalid` naming the rule, before anything joins: a group named `` would be no group to a
/// Redis dead-letter replay, which then reaches every group.
pub async fn a_group_without_a_name_is_refused<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t25", h.test_id());
    let joined = h
        .transport()
        .consumer(
            &topic,
            "",
            h.options().consumer_name(format!("{}-c", h.test_id())),
        )
        .await
        .map(drop);
    match joined {
        Err(TransportError::Invalid(message)) => assert!(
            message.contains("consumer group `` must not be empty"),
            "the message names the rule: {message}"
        ),
        Err(other) => panic!("a group named ``: expected Invalid, got {other}"),
        Ok(()) => panic!("a group named `` was joined"),
    }
}

/// A consumer name a live consumer of the group already has is refused with `Invalid` naming
/// it (two consumers of one name would share their deliveries' bookkeeping); the name is free
/// in another group and on another topic, and again once the consumer is dropped.
pub async fn a_consumer_name_in_use_in_its_group_is_refused<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t13", h.test_id());
    let name = format!("{}-same", h.test_id());
    let join = |topic: String, group: &'static str| {
        let (transport, options) = (h.transport(), h.options().consumer_name(name.clone()));
        async move { transport.consumer(&topic, group, options).await }
    };
    let first = join(topic.clone(), "g").await.expect("the first consumer");
    match join(topic.clone(), "g").await {
        Err(TransportError::Invalid(message)) => assert!(
            message.contains(&name),
            "the message names the consumer: {message}"
        ),
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("two live consumers named {name} in one group"),
    }
    let other_group = join(topic.clone(), "other").await.expect("another group");
    let other_topic = join(format!("{topic}-other"), "g")
        .await
        .expect("another topic");
    drop(first);
    let again = join(topic.clone(), "g")
        .await
        .expect("the name is free once its consumer is dropped");
    drop((again, other_group, other_topic));
}

/// A consumer's [`keep_alive`](Consumer::keep_alive) of a delivery another consumer took over
/// (after the redelivery delay, as after a crash) leaves that delivery alone: it comes back
/// after the delay as if the first consumer had said nothing. Once acknowledged, a keep-alive
/// of it is no error.
pub async fn keep_alive_leaves_alone_a_delivery_another_consumer_took_over<H: TransportHarness>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t14", h.test_id());
    // `slow` stalls past the delay; `other` takes the message over.
    let TakenOver {
        mut slow,
        mut other,
        first,
        taken,
        ..
    } = taken_over(h, &topic, |o| o).await;
    assert_eq!(taken.record.event_id, first.record.event_id);
    assert!(
        taken.attempt >= 2,
        "attempt {} after a takeover",
        taken.attempt
    );
    // `other` now stalls too, while `slow` keeps "its" delivery alive: the message must come
    // back all the same.
    let delay = h.options().redelivery_delay;
    let until = tokio::time::Instant::now() + delay * 4 + Duration::from_secs(2);
    let back = loop {
        slow.keep_alive(std::slice::from_ref(&first.id))
            .await
            .expect("a keep-alive of a delivery no longer owned is no error");
        if let Some(d) = fetch_up_to(other.as_mut(), 10)
            .await
            .into_iter()
            .find(|d| d.record.event_id == first.record.event_id)
        {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not handed out again within {:?}: a keep-alive by a consumer that no longer owned \
             the delivery kept it",
            delay * 4 + Duration::from_secs(2)
        );
    };
    assert!(back.attempt > taken.attempt, "attempt {}", back.attempt);
    other.ack(std::slice::from_ref(&back.id)).await.unwrap();
    slow.keep_alive(std::slice::from_ref(&first.id))
        .await
        .expect("a keep-alive of an acknowledged delivery is no error");
}

/// A [`defer`](Consumer::defer) is no attempt: a message deferred again and again keeps its
/// attempt number and is never dead-lettered for it (with `max_deliveries` 2, a third
/// counted delivery would dead-letter it); a nack counts. Like a nack, a defer hands the
/// message back for after the redelivery delay.
pub async fn a_deferred_delivery_is_no_attempt<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t15", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.max_deliveries(2)).await;
    let e = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&e))
        .await
        .unwrap();
    let delay = h.options().redelivery_delay;
    let mut deferred = None;
    for round in 1..=3 {
        let d = fetch_one(c.as_mut(), "the deferred message").await;
        // Like a nack, a defer hands the message back for after the redelivery delay (less
        // a little: a server's clock in whole milliseconds), not at once.
        if let Some(at) = deferred {
            let waited = tokio::time::Instant::now() - at;
            assert!(
                waited + Duration::from_millis(10) >= delay,
                "round {round}: deferred, then handed out again after {waited:?}, before the \
                 redelivery delay of {delay:?}"
            );
        }
        assert_eq!(d.record.event_id, e.event_id);
        assert_eq!(d.attempt, 1, "round {round}: a defer took no attempt");
        deferred = Some(tokio::time::Instant::now());
        c.defer(std::slice::from_ref(&d.id)).await.unwrap();
    }
    let d = fetch_one(c.as_mut(), "the message after its defers").await;
    assert_eq!(d.attempt, 1, "three defers took no attempt");
    c.nack(&d.id).await.unwrap();
    let d = fetch_one(c.as_mut(), "the nacked message").await;
    assert_eq!(d.attempt, 2, "a nack counts");
    c.ack(std::slice::from_ref(&d.id)).await.unwrap();
}

/// A message its consumer gives up on ([`Consumer::dead_letter`]) on its first delivery never
/// comes back (also past the harness's redelivery delay), is dead-lettered with that one
/// delivery and the reason given (where the harness can tell), and the message of its key
/// behind it arrives at once, without waiting for a redelivery delay; a consumer that lost
/// the delivery to another cannot give it up, and the one that took it over can, on its
/// second delivery, as at once.
pub async fn a_message_a_consumer_gives_up_on_is_dead_lettered_at_once<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t16b", h.test_id());
    // A redelivery delay no loaded machine reaches: the next message arriving at all says
    // the poison one was settled at once, not redelivered and dead-lettered later.
    let mut c = consumer_with(h, &topic, "g", "c", |o| {
        o.redelivery_delay(Duration::from_secs(3600))
    })
    .await;
    let (poison, next) = (event("k", 1), event("k", 2));
    h.transport()
        .publish(&topic, &[poison.clone(), next.clone()])
        .await
        .unwrap();
    let d = fetch_one(c.as_mut(), "the poison message").await;
    assert_eq!((d.record.event_id, d.attempt), (poison.event_id, 1));
    c.dead_letter(&d.id, "refused for good").await.unwrap();
    let d = fetch_one(c.as_mut(), "the message behind the dead-lettered one").await;
    assert_eq!(
        d.record.event_id, next.event_id,
        "the poison message came back"
    );
    c.ack(std::slice::from_ref(&d.id)).await.unwrap();
    if let Some(dead) = h.dead_letters(&topic, "g").await {
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!((dead[0].0, dead[0].1), (poison.event_id, 1), "{dead:?}");
        if let Some(reason) = &dead[0].2 {
            assert!(reason.contains("refused for good"), "{reason}");
        }
    }
    let mut after = consumer(h, &topic, "g", "after").await;
    nothing_comes_again(h, after.as_mut(), "a dead-lettered message came back").await;

    // With the harness's short redelivery delay, a message given up on does not come back
    // after it either, key order or not (a transport without it hands out the message
    // behind at once whatever became of the first, so the part above cannot tell a give-up
    // from a nack there).
    let topic = format!("{}-t16d", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.max_deliveries(10)).await;
    let poison = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&poison))
        .await
        .unwrap();
    let d = fetch_one(c.as_mut(), "the poison message").await;
    assert_eq!(d.record.event_id, poison.event_id);
    c.dead_letter(&d.id, "refused for good").await.unwrap();
    nothing_comes_again(
        h,
        c.as_mut(),
        "a message given up on came back after the redelivery delay",
    )
    .await;

    // Taken over by another consumer after the redelivery delay: the first can no longer
    // give it up.
    let topic = format!("{}-t16c", h.test_id());
    let TakenOver {
        mut slow,
        mut other,
        event: e,
        first,
        taken,
    } = taken_over(h, &topic, |o| o).await;
    assert_eq!((taken.record.event_id, taken.attempt), (e.event_id, 2));
    slow.dead_letter(&first.id, "too late")
        .await
        .expect("giving up a delivery no longer owned is no error");
    if let Some(dead) = h.dead_letters(&topic, "g").await {
        assert!(
            dead.is_empty(),
            "a consumer that lost the delivery dead-lettered it: {dead:?}"
        );
    }
    // The consumer that took it over gives it up on its second delivery: dead-lettered with
    // both, as at once as on the first.
    other
        .dead_letter(&taken.id, "refused on the second delivery")
        .await
        .unwrap();
    if let Some(dead) = h.dead_letters(&topic, "g").await {
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!((dead[0].0, dead[0].1), (e.event_id, 2), "{dead:?}");
        if let Some(reason) = &dead[0].2 {
            assert!(reason.contains("on the second delivery"), "{reason}");
        }
    }
    nothing_comes_again(h, other.as_mut(), "a dead-lettered message came back").await;
}

/// A message handed out `max_deliveries` times without an acknowledgement stops coming back
/// (it is dead-lettered, with that many deliveries, where the harness can tell), and the
/// messages of its key behind it go on.
pub async fn a_message_is_dead_lettered_after_max_deliveries<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t16", h.test_id());
    let mut c = consumer_with(h, &topic, "g", "c", |o| o.max_deliveries(2)).await;
    let poison = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&poison))
        .await
        .unwrap();
    for attempt in 1..=2 {
        let d = fetch_one(c.as_mut(), "the poison message").await;
        assert_eq!(d.record.event_id, poison.event_id);
        assert_eq!(
            d.attempt, attempt,
            "delivery {attempt} of the poison message: each nack_with_reason counts an attempt"
        );
        c.nack_with_reason(&d.id, "poison").await.unwrap();
    }
    let nacked = tokio::time::Instant::now();
    let next = event("k", 2);
    h.transport()
        .publish(&topic, std::slice::from_ref(&next))
        .await
        .unwrap();
    // Until the next message of its key arrived, and past two redelivery delays and their
    // lag after the last nack, and until it is dead-lettered (where the harness can tell):
    // the poison message never comes back. A transport may write the dead letter only when a
    // fetch looks for due redeliveries, and where keys are not ordered the next message does
    // not wait for that: so the dead letters are polled while fetching goes on.
    let options = h.options();
    let quiet = nacked + options.redelivery_delay * 2 + options.redelivery_lag();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got_next = false;
    loop {
        assert!(
            got_next || tokio::time::Instant::now() < until,
            "the message behind the dead-lettered one did not arrive"
        );
        let batch = fetch_up_to(c.as_mut(), 10).await;
        for d in &batch {
            assert_ne!(
                d.record.event_id, poison.event_id,
                "handed out more than max_deliveries (2) times: attempt {}",
                d.attempt
            );
            got_next |= d.record.event_id == next.event_id;
        }
        c.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        if !got_next || tokio::time::Instant::now() < quiet {
            continue;
        }
        if dead_lettered(h, &topic, poison.event_id, until, "its last nack").await {
            break;
        }
    }
}

/// Whether group `g` of `topic` has dead-lettered the event `expected`, after its 2
/// deliveries, and it alone (keeping the last nack's reason, `poison`, where the adapter keeps
/// reasons): `false` while nothing is dead-lettered yet (a failure past `until`, naming
/// `after`), `true` once it is, or when the harness cannot list dead letters.
async fn dead_lettered<H: TransportHarness>(
    h: &H,
    topic: &str,
    expected: Uuid,
    until: tokio::time::Instant,
    after: &str,
) -> bool {
    let Some(dead) = h.dead_letters(topic, "g").await else {
        eprintln!("the harness cannot list dead letters: checked only that it stops coming");
        return true;
    };
    if dead.is_empty() {
        assert!(
            tokio::time::Instant::now() < until,
            "not dead-lettered within 10 s of {after}"
        );
        return false;
    }
    let found: Vec<_> = dead.iter().map(|(id, n, _)| (*id, *n)).collect();
    assert_eq!(
        found,
        [(expected, 2)],
        "dead-lettered once, after its 2 deliveries; nothing else"
    );
    if let Some(error) = &dead[0].2 {
        assert!(
            error.contains("poison"),
            "the dead letter keeps the last nack's reason: {error:?}"
        );
    }
    true
}

/// A redelivery comes before new messages once it has been due for the
/// [`redelivery_lag`](ConsumerOptions::redelivery_lag) (a transport may look for due
/// redeliveries only that often): a consumer fetching all the while, with new messages
/// published before every fetch, gets the nacked message first in the first batch it fetches
/// after that, at the latest.
pub async fn a_due_redelivery_comes_before_new_messages<H: TransportHarness>(h: &H) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t17", h.test_id());
    let transport = h.transport();
    let mut c = consumer(h, &topic, "g", "c").await;
    let nacked = event("nacked", 0);
    transport
        .publish(&topic, std::slice::from_ref(&nacked))
        .await
        .unwrap();
    let d = fetch_one(c.as_mut(), "the message to nack").await;
    c.nack(&d.id).await.unwrap();
    let options = h.options();
    let due = tokio::time::Instant::now() + options.redelivery_delay;
    // Plus a little for clocks that count whole milliseconds.
    let bound = due + options.redelivery_lag() + Duration::from_millis(20);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    for n in 1.. {
        assert!(
            tokio::time::Instant::now() < until,
            "the nacked message did not come back"
        );
        // Every key its own, so none waits behind another.
        transport
            .publish(&topic, &[event(&format!("new-{n}"), n)])
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let batch = fetch_up_to(c.as_mut(), 10).await;
        c.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        if let Some(at) = batch
            .iter()
            .position(|d| d.record.event_id == nacked.event_id)
        {
            assert_eq!(
                at, 0,
                "the redelivery comes before the new messages of its batch"
            );
            assert_eq!(batch[0].attempt, 2);
            return;
        }
        assert!(
            batch.is_empty() || started < bound,
            "new messages {:?} handed out, by a fetch begun {:?} after a redelivery fell due \
             (the port allows {:?})",
            batch.iter().map(n_of).collect::<Vec<_>>(),
            started.saturating_duration_since(due),
            options.redelivery_lag()
        );
        // A consumer busy all along, not one that fetches only now and then.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A [`defer`](Consumer::defer) by a consumer that no longer owns the delivery (another
/// consumer took it over after the redelivery delay, as after a stall) leaves it alone, as a
/// [`keep_alive`](Consumer::keep_alive) does: it does not take back the taker's attempt. With
/// `max_deliveries` 2, the takeover is the second delivery, so once the taker nacks, the
/// message is dead-lettered (where the harness can tell), never handed out a third time.
pub async fn a_defer_by_a_consumer_that_lost_the_delivery_takes_no_attempt_back<
    H: TransportHarness,
>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t18", h.test_id());
    // `slow` stalls past the delay; `other` takes the message over: its second delivery.
    let TakenOver {
        mut slow,
        mut other,
        event: e,
        first,
        taken,
    } = taken_over(h, &topic, |o| o.max_deliveries(2)).await;
    assert_eq!((first.record.event_id, first.attempt), (e.event_id, 1));
    assert_eq!((taken.record.event_id, taken.attempt), (e.event_id, 2));
    slow.defer(std::slice::from_ref(&first.id))
        .await
        .expect("a defer of a delivery no longer owned is no error");
    other.nack_with_reason(&taken.id, "poison").await.unwrap();
    let nacked = tokio::time::Instant::now();
    // Past two redelivery delays and their lag after the nack, and until it is dead-lettered
    // (where the harness can tell): the message never comes back.
    let options = h.options();
    let quiet = nacked + options.redelivery_delay * 2 + options.redelivery_lag();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let batch = fetch_up_to(other.as_mut(), 10).await;
        for d in &batch {
            assert_ne!(
                d.record.event_id, e.event_id,
                "handed out a third time (attempt {}) with max_deliveries 2: a defer by a \
                 consumer that no longer owned the delivery took back an attempt, or the \
                 nack_with_reason of the second delivery was not counted, or a message past \
                 max_deliveries is still handed out",
                d.attempt
            );
        }
        other
            .ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        if tokio::time::Instant::now() < quiet {
            continue;
        }
        if dead_lettered(h, &topic, e.event_id, until, "its second delivery's nack").await {
            break;
        }
    }
}

/// A [`nack`](Consumer::nack) or a [`nack_with_reason`](Consumer::nack_with_reason) by a
/// consumer that no longer owns the delivery (another consumer took it over) leaves it alone,
/// as a [`keep_alive`](Consumer::keep_alive) does: it does not restart the redelivery delay,
/// so while the taker stalls too, the message comes back all the same, however often the
/// first consumer nacks it, either way. Once acknowledged, a nack of it is no error.
pub async fn a_nack_by_a_consumer_that_lost_the_delivery_does_not_hold_it_back<
    H: TransportHarness,
>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t19", h.test_id());
    let TakenOver {
        mut slow,
        mut other,
        event: e,
        first,
        taken,
    } = taken_over(h, &topic, |o| o).await;
    assert_eq!((taken.record.event_id, taken.attempt), (e.event_id, 2));
    // `other` stalls too, while `slow` nacks "its" delivery before every fetch, more often
    // than the redelivery delay: the message must come back all the same.
    let delay = h.options().redelivery_delay;
    let within = delay * 4 + Duration::from_secs(2);
    let until = tokio::time::Instant::now() + within;
    let mut with_reason = false;
    let back = loop {
        if with_reason {
            slow.nack_with_reason(&first.id, "stale")
                .await
                .expect("a nack_with_reason of a delivery no longer owned is no error");
        } else {
            slow.nack(&first.id)
                .await
                .expect("a nack of a delivery no longer owned is no error");
        }
        with_reason = !with_reason;
        if let Some(d) = fetch_up_to(other.as_mut(), 10)
            .await
            .into_iter()
            .find(|d| d.record.event_id == e.event_id)
        {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not handed out again within {within:?}: a nack by a consumer that no longer owned \
             the delivery restarted its redelivery delay"
        );
    };
    assert_eq!(back.attempt, 3, "the third delivery");
    other.ack(std::slice::from_ref(&back.id)).await.unwrap();
    slow.nack(&first.id)
        .await
        .expect("a nack of an acknowledged delivery is no error");
}

/// A consumer of a transport that redelivers by time tells its redelivery delay (the one it
/// was given) and a keep-alive interval shorter than it, which
/// [`consume_until_shutdown`](crate::projection::consume_until_shutdown) relies on to keep a
/// long batch its own and to tell when a failed delivery can no longer come back.
pub async fn a_consumer_tells_its_redelivery_delay_and_keep_alive_interval<H: TransportHarness>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-t22", h.test_id());
    let delay = Duration::from_millis(1_234);
    let c = consumer_with(h, &topic, "g", "c", |o| o.redelivery_delay(delay)).await;
    assert_eq!(c.redelivery_delay(), Some(delay), "the delay it was given");
    let interval = c
        .keep_alive_interval()
        .expect("a consumer that redelivers by time tells how often to keep deliveries alive");
    assert!(
        !interval.is_zero() && interval < delay,
        "keep-alive interval {interval:?}: more than zero, less than the delay {delay:?}"
    );
}

/// [`Consumer::close`] releases what the consumer read but never handed out, so another
/// consumer of the group takes it at once, not after the redelivery delay: here an event
/// published while a fetch waited and was dropped (a shutdown). A delivery handed out and not
/// acknowledged is not released: it stays the closed consumer's until the delay passes. (An
/// adapter that reads nothing ahead, the in-memory one, passes without releasing anything:
/// the scenario tests those that do, as Redis's blocking read. With
/// [`TransportHarness::pending_to`] it makes sure the dropped fetch was served the event.)
pub async fn a_closed_consumer_releases_what_it_never_handed_out<H: TransportHarness>(h: &H) {
    let caps = h.transport().capabilities();
    if !caps.redelivery_delay || !caps.consumer_groups {
        eprintln!("skipped: no redelivery delay or no consumer groups");
        return;
    }
    // Far longer than the test: whatever another consumer gets, it got by a release.
    let delay = Duration::from_secs(120);
    let name = format!("{}-a", h.test_id());
    let mut attempt = 0;
    let (topic, released) = loop {
        attempt += 1;
        let topic = format!("{}-t23-{attempt}", h.test_id());
        let mut a = consumer_with(h, &topic, "g", "a", |o| {
            o.redelivery_delay(delay).block(Duration::from_secs(10))
        })
        .await;
        let kept = event("kept", 1);
        h.transport()
            .publish(&topic, std::slice::from_ref(&kept))
            .await
            .unwrap();
        let handed = fetch_one(a.as_mut(), "the delivery a keeps").await;
        assert_eq!(handed.record.event_id, kept.event_id);
        // A fetch that waits and is dropped, as at a shutdown; an event published then may
        // have been read for it.
        let dropped = tokio::time::timeout(Duration::from_millis(300), a.fetch(10)).await;
        assert!(
            dropped.is_err(),
            "a fetch with nothing new returned: {dropped:?}"
        );
        let released = event("free", 2);
        h.transport()
            .publish(&topic, std::slice::from_ref(&released))
            .await
            .unwrap();
        // Served to the dropped fetch (checked out to `a` with the delivery it keeps), or,
        // when its read had ended before the publish reached it, tried again on a new topic.
        let served = match h.pending_to(&topic, "g", &name).await {
            None => true,
            Some(_) => {
                let until = tokio::time::Instant::now() + Duration::from_secs(3);
                loop {
                    if h.pending_to(&topic, "g", &name).await == Some(2) {
                        break true;
                    }
                    if tokio::time::Instant::now() >= until {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        a.close().await.expect("close");
        drop(a);
        if served {
            break (topic, released);
        }
        assert!(
            attempt < 5,
            "in {attempt} tries, no dropped fetch was served the event published while it waited"
        );
    };

    let mut b = consumer_with(h, &topic, "g", "b", |o| o.redelivery_delay(delay)).await;
    let got = fetch_one(
        b.as_mut(),
        "the event a never handed out, released by close",
    )
    .await;
    assert_eq!(
        got.record.event_id,
        released.event_id,
        "b got {} (n = {}) first",
        got.record.event_id,
        n_of(&got)
    );
    b.ack(std::slice::from_ref(&got.id)).await.unwrap();
    // Fetches for a moment (each blocks for the harness's `block`): the delivery a kept does
    // not come, since its redelivery delay is far from over.
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        let batch = fetch_up_to(b.as_mut(), 10).await;
        assert!(
            batch.is_empty(),
            "the delivery a kept was handed out again before its redelivery delay: {:?}",
            batch.iter().map(n_of).collect::<Vec<_>>()
        );
    }
}

/// A consumer stays usable after [`Consumer::close`]: a later fetch gets what was published
/// since, and acknowledges it (workers keep their consumer across restarts and close it at
/// each stop).
pub async fn a_closed_consumer_goes_on_fetching<H: TransportHarness>(h: &H) {
    let topic = format!("{}-t42", h.test_id());
    let mut a = consumer_with(h, &topic, "g", "a", |o| o).await;
    let first = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&first))
        .await
        .unwrap();
    let got = fetch_one(a.as_mut(), "the first event").await;
    assert_eq!(got.record.event_id, first.event_id);
    a.ack(std::slice::from_ref(&got.id)).await.expect("ack");
    a.close().await.expect("close");

    let second = event("k", 2);
    h.transport()
        .publish(&topic, std::slice::from_ref(&second))
        .await
        .unwrap();
    let got = fetch_one(a.as_mut(), "the event published after the close").await;
    assert_eq!(got.record.event_id, second.event_id);
    a.ack(std::slice::from_ref(&got.id))
        .await
        .expect("ack after the close");
    a.close().await.expect("close again");
}

/// [`Consumer::close`] releases the messages the consumer held back behind an earlier delivery
/// of their key (read, and not handed out while that one was in flight), so another consumer
/// of the group takes them at once, not after the redelivery delay. The closed consumer stays
/// alive until then: what an adapter releases when a consumer is dropped does not count.
pub async fn a_closed_consumer_releases_what_it_held_behind_its_key<H: TransportHarness>(h: &H) {
    requires_key_order(h);
    let topic = format!("{}-t24", h.test_id());
    // Far longer than the test: whatever another consumer gets, it got by a release.
    let delay = Duration::from_secs(120);
    let mut a = consumer_with(h, &topic, "g", "a", |o| o.redelivery_delay(delay)).await;
    let first = event("k", 1);
    h.transport()
        .publish(&topic, std::slice::from_ref(&first))
        .await
        .unwrap();
    let in_flight = fetch_one(a.as_mut(), "the first event of key k").await;
    assert_eq!(in_flight.record.event_id, first.event_id);
    // `held` before `other` in the stream: once `a` hands out `other`, it has read `held`,
    // and keeps it back while the first of its key is in flight.
    let held = event("k", 2);
    let other = event("other", 3);
    h.transport()
        .publish(&topic, &[held.clone(), other.clone()])
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let batch = fetch_up_to(a.as_mut(), 10).await;
        assert!(
            batch.iter().all(|d| d.record.event_id != held.event_id),
            "the second event of key k was handed out while the first was in flight"
        );
        let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
        a.ack(&ids).await.expect("ack");
        if batch.iter().any(|d| d.record.event_id == other.event_id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for the event of another key"
        );
    }
    a.ack(std::slice::from_ref(&in_flight.id))
        .await
        .expect("ack");
    a.close().await.expect("close");

    let mut b = consumer_with(h, &topic, "g", "b", |o| o.redelivery_delay(delay)).await;
    let got = fetch_one(
        b.as_mut(),
        "the event a held behind its key, released by close (a is still alive)",
    )
    .await;
    assert_eq!(
        got.record.event_id,
        held.event_id,
        "b got n = {} instead of the held event",
        n_of(&got)
    );
    b.ack(std::slice::from_ref(&got.id)).await.unwrap();
    drop(a);
}

/// The payload of [`event_store::record`](crate::testing::event_store::record), typed, for a
/// bus's handlers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Noted {
    n: u64,
}

impl crate::Message for Noted {
    const NAME: &'static str = "Noted";
}

impl crate::Event for Noted {}

/// Counts what it is handed; fails the first time when `fails_first`.
#[derive(Clone)]
struct CountNoted {
    name: &'static str,
    fails_first: bool,
    seen: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountNoted {
    fn new(name: &'static str, fails_first: bool) -> Self {
        Self {
            name,
            fails_first,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl crate::EventHandler<Noted> for CountNoted {
    async fn handle(
        &self,
        _event: &Noted,
        _ctx: crate::EventContext<'_>,
    ) -> Result<(), crate::HandlerError> {
        let before = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fails_first && before == 0 {
            // Not permanent: retried.
            return Err(crate::HandlerError::internal(format!(
                "{} fails the first time",
                self.name
            )));
        }
        Ok(())
    }

    fn name(&self) -> &str {
        self.name
    }
}

/// An [`EventBusConsumer`](crate::projection::EventBusConsumer) on this transport hands an
/// event that comes back after one of its handlers failed to that handler only (the other
/// took it the first time), and acknowledges it once it took it: no consumer of the group
/// gets it again.
pub async fn an_event_bus_consumer_hands_a_redelivery_only_to_the_handlers_that_failed<
    H: TransportHarness,
>(
    h: &H,
) {
    if !h.transport().capabilities().redelivery_delay {
        eprintln!("skipped: no redelivery delay");
        return;
    }
    let topic = format!("{}-bus", h.test_id());
    let (steady, flaky) = (
        CountNoted::new("steady", false),
        CountNoted::new("flaky", true),
    );
    let bus = crate::EventBus::builder()
        .handler(steady.clone())
        .handler(flaky.clone())
        .build()
        .expect("a bus of two handlers");
    let options = h.options().consumer_name(format!("{}-bus", h.test_id()));
    let runtime = crate::runtime::Runtime::builder()
        .worker(crate::projection::EventBusConsumer::new(
            bus,
            h.transport(),
            &topic,
            "g",
            options,
        ))
        .start();
    h.transport()
        .publish(&topic, &[event("k", 1)])
        .await
        .unwrap();
    crate::testing::eventually(
        Duration::from_secs(10),
        "the failed handler handed the event again",
        || async { (flaky.seen() >= 2).then_some(()) },
    )
    .await;
    runtime
        .shutdown(Duration::from_secs(5))
        .await
        .expect("the consumer stops");
    assert_eq!(flaky.seen(), 2, "failed once, took it the second time");
    assert_eq!(
        steady.seen(),
        1,
        "the handler that took it was not asked again"
    );
    let mut after = consumer(h, &topic, "g", "after").await;
    nothing_comes_again(h, after.as_mut(), "an event its handlers took came back").await;
}
