//! The in-memory adapters on their per-event paths, which tests and single-process servers
//! (the helpdesk without `DATABASE_URL`) run on:
//!
//! * `memory_consume`: a consumer of a fresh group draining a backlog of `n` events (64
//!   partition keys) through `InMemoryTransport`, `fetch(100)` then `ack` of each batch; the
//!   backlog is published and the group created outside the clock. A fetch used to pop and
//!   re-queue the group's whole backlog, so a drain grew with the square of the backlog;
//! * `memory_consume/fetch_behind_a_busy_key/n`: publish, fetch and acknowledge one message
//!   while `n` messages of another key wait behind one of theirs in flight: flat in `n` once
//!   held-back messages are parked under their key;
//! * `decode`: `EventTypes::decode` of a stored record (what a projection or an aggregate load
//!   does for each event), next to `serde_json::from_value` of a clone of the payload, the
//!   least a decode of an owned payload costs.
//!
//! ```sh
//! cargo bench -p cqrs-benches --bench memory -- --warm-up-time 1 --measurement-time 3
//! ```

use cqrs_benches::fixtures::Incremented;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, DeliveryId, EventTransport};
use cqrs_core::{EventEnvelope, EventRecord, EventTypes, Metadata, Position};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

fn record(n: u64) -> EventRecord {
    let envelope = EventEnvelope::new(Incremented { value: n }, Metadata::new())
        .with_partition_key(format!("k{}", n % 64));
    EventRecord::from_envelope(&envelope).expect("the event serializes")
}

/// Drains `backlog` events, `iters` times, each by a new group; only the drains are timed.
async fn drain(
    transport: &InMemoryTransport,
    topic: &str,
    backlog: u64,
    iters: u64,
    groups: &Cell<u64>,
) -> Duration {
    let mut measured = Duration::ZERO;
    for _ in 0..iters {
        // A group of its own for each drain: a new group starts at the beginning of the topic.
        groups.set(groups.get() + 1);
        let group = format!("g{}", groups.get());
        let mut consumer = transport
            .consumer(topic, &group, ConsumerOptions::default())
            .await
            .expect("a consumer");
        let start = Instant::now();
        let mut handled = 0;
        while handled < backlog {
            let batch = consumer.fetch(100).await.expect("fetch");
            assert!(!batch.is_empty(), "the backlog ran dry at {handled}");
            let ids: Vec<DeliveryId> = batch.into_iter().map(|d| d.id).collect();
            handled += ids.len() as u64;
            consumer.ack(&ids).await.expect("ack");
        }
        measured += start.elapsed();
        assert_eq!(handled, backlog);
    }
    measured
}

fn memory_consume(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory_consume");
    let groups = Cell::new(0);
    for backlog in [1_000_u64, 10_000] {
        let transport = InMemoryTransport::new();
        let topic = format!("backlog-{backlog}");
        let records: Vec<EventRecord> = (0..backlog).map(record).collect();
        rt.block_on(transport.publish(&topic, &records))
            .expect("publish the backlog");
        group.throughput(Throughput::Elements(backlog));
        group.bench_with_input(
            BenchmarkId::new("drain", backlog),
            &backlog,
            |b, &backlog| {
                b.to_async(&rt)
                    .iter_custom(|iters| drain(&transport, &topic, backlog, iters, &groups));
            },
        );
    }
    group.finish();
}

/// A group whose key `busy` has `held` messages waiting behind one in flight (fetched, not
/// acknowledged): each iteration publishes one message of another key, fetches it and
/// acknowledges it. A fetch that looked at every waiting message of the busy key grew with
/// `held`; parked under their key, they are looked at once.
fn fetch_behind_a_busy_key(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory_consume");
    for held in [0_u64, 10_000] {
        let transport = InMemoryTransport::new();
        let topic = format!("busy-{held}");
        let busy = |n: u64| {
            let envelope = EventEnvelope::new(Incremented { value: n }, Metadata::new())
                .with_partition_key("busy");
            EventRecord::from_envelope(&envelope).expect("the event serializes")
        };
        let records: Vec<EventRecord> = (0..=held).map(busy).collect();
        let mut consumer = rt.block_on(async {
            transport.publish(&topic, &records).await.expect("publish");
            let mut consumer = transport
                .consumer(
                    &topic,
                    "g",
                    // The busy key's first message stays in flight for the whole run: under
                    // the default 30 s delay it would come back in a long measurement.
                    ConsumerOptions::default()
                        .block(Duration::ZERO)
                        .redelivery_delay(Duration::from_secs(3600)),
                )
                .await
                .expect("a consumer");
            // The first of the busy key goes in flight and stays there; the rest wait.
            let first = consumer.fetch(1).await.expect("fetch");
            assert_eq!(first.len(), 1);
            consumer
        });
        let sequence = Cell::new(0_u64);
        group.bench_with_input(
            BenchmarkId::new("fetch_behind_a_busy_key", held),
            &held,
            |b, _| {
                // `block_on` inside: the async body borrows the consumer only while it runs.
                b.iter_custom(|iters| {
                    // The messages are built before the clock starts: it times the publish,
                    // the fetch and the acknowledgement.
                    let first = sequence.get();
                    sequence.set(first + iters);
                    let records: Vec<EventRecord> = (first..first + iters).map(record).collect();
                    rt.block_on(async {
                        let start = Instant::now();
                        for record in &records {
                            transport
                                .publish(&topic, std::slice::from_ref(record))
                                .await
                                .expect("publish");
                            let batch = consumer.fetch(10).await.expect("fetch");
                            assert_eq!(batch.len(), 1, "only the new message is free");
                            let ids: Vec<DeliveryId> = batch.into_iter().map(|d| d.id).collect();
                            consumer.ack(&ids).await.expect("ack");
                        }
                        start.elapsed()
                    })
                });
            },
        );
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut types = EventTypes::new();
    types.register::<Incremented>();
    let record = record(7)
        .with_stream("counter-1", 3)
        .with_position(Position::new(42));
    let mut group = c.benchmark_group("decode");
    group.bench_function("event_types_decode", |b| {
        b.iter(|| types.decode(black_box(&record)).expect("decodes"));
    });
    group.bench_function("serde_from_value_of_a_clone", |b| {
        b.iter(|| {
            serde_json::from_value::<Incremented>(black_box(&record).payload.clone())
                .expect("decodes")
        });
    });
    group.finish();
}

criterion_group!(benches, memory_consume, fetch_behind_a_busy_key, decode);
criterion_main!(benches);
