//! The Redis adapters under load, the stream transport's cases each next to raw fred doing the
//! same work in the same run (the pub/sub case has none: it measures the local fan-out):
//!
//! * `publish_one_event`: `RedisStreamTransport::publish` of one event against one raw `XADD`
//!   of the same fields (one round trip each);
//! * `publish_100_events`: a batch of 100 events in one publish (one script, one round trip)
//!   against a fred pipeline of 100 `XADD`s (one round trip);
//! * `consume_and_ack`: a fresh consumer group draining a backlog of 1,000 entries in fetches
//!   of 100, each acknowledged after it is decoded, through the transport's `Consumer` against
//!   `XREADGROUP COUNT 100` + decoding the `record` field + `XACK` (two round trips per batch
//!   on both sides); `consume_and_ack_1000_keys`: the same with a partition key per entry
//!   instead of 64, so the order gate rarely holds an entry back;
//! * `pubsub_fanout`: `RedisPubSub` delivering 1,000 messages from one publisher to 1 and to
//!   100 local subscribers.
//!
//! The transport runs twice in the stream groups: with its default ordering
//! (`KeyOrdering::Lanes(1024)`, what `target ≥ 0.8×` is about) and `Unordered`, which splits
//! the cost of the per-key order gate from the rest. The events carry partition keys cycling
//! through 64 aggregates (`s{n % 64}`), as the Postgres bench's streams do; the raw side writes
//! the same fields but `lane` and `prev` (the transport's order chain), and serializes the
//! record inside its clock as the transport does.
//!
//! Each group works under a key prefix of its own (`cqrs-bench-<group>-<pid>-<nanos>`) on the
//! server at `REDIS_URL` (default `redis://127.0.0.1:6379`), and deletes its keys when it ends;
//! the publish groups also delete their streams after every timed block, outside the clock, so
//! the server's memory stays flat. Also outside the clock, each block checks that the work was
//! done: a publish block left `n × batch` entries in its stream, a drain handled the backlog
//! once (distinct ids) and left nothing pending in its group. When Redis is unreachable the bench says why and measures
//! nothing, or fails when `CQRS_REQUIRE_SERVICES=1`. `docs/benchmarks.md` has the results.
//!
//! As in `postgres.rs`, the machine is shared and its load drifts over the seconds between two
//! criterion cases, so under `cargo bench` each comparison is measured again in alternating
//! blocks and printed as `paired:` lines with the median ratio raw time / transport time: that
//! is the ratio to trust; criterion's tables give the absolute times.

use cqrs_benches::fixtures::Incremented;
use cqrs_benches::paired::{Paired, measuring, paired, testing};
use cqrs_core::ports::{ConsumerOptions, DeliveryId, EventTransport, PubSub};
use cqrs_core::{EventEnvelope, EventRecord, Metadata};
use cqrs_redis::{KeyOrdering, RedisPubSubOptions, RedisStreamOptions, RedisStreamTransport};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface, StreamsInterface};
use fred::prelude::Builder;
use fred::types::Value;
use fred::types::config::Config;
use std::cell::Cell;
use std::collections::HashSet;
use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Runtime;

/// How many partition keys the events cycle through.
const KEYS: u64 = 64;

/// Events per batch in `publish_100_events`, and entries per fetch in `consume_and_ack`.
const BATCH: u64 = 100;

/// Entries each consumer group drains in one `consume_and_ack` iteration.
const BACKLOG: u64 = 1000;

/// Messages one `pubsub_fanout` iteration publishes.
const MESSAGES: u64 = 1000;

/// One current-thread runtime, like the other benches: the numbers are the server's and the
/// round trips', not a scheduler's. fred's connection tasks and the subscribers run on it.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| cqrs_redis::DEFAULT_URL.to_owned())
}

/// A plain fred client: what the raw side of every comparison uses, with fred's defaults.
async fn raw_client(connect_timeout: Duration) -> Result<Client, String> {
    let config = Config::from_url(&redis_url()).map_err(|e| format!("not a redis url: {e}"))?;
    let mut builder = Builder::from_config(config);
    builder.with_connection_config(|config| config.connection_timeout = connect_timeout);
    let client = builder.build().map_err(|e| e.to_string())?;
    client.init().await.map_err(|e| e.to_string())?;
    Ok(client)
}

/// Whether Redis answers, asked once per run. When it does not: prints why and returns
/// `false`, or panics when `CQRS_REQUIRE_SERVICES=1` (CI), so a missing server fails the run.
fn reachable(rt: &Runtime) -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    *REACHABLE.get_or_init(|| {
        let why = rt.block_on(async {
            let probe = async {
                let client = raw_client(Duration::from_secs(3)).await?;
                let pong = client.ping::<String>(None).await.map_err(|e| e.to_string());
                let _ = client.quit().await;
                pong
            };
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("no answer within 5 s".to_owned()),
            }
        });
        let Some(why) = why else {
            return true;
        };
        // The URL is not printed: it may hold a password.
        let default = cqrs_redis::DEFAULT_URL;
        if std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!(
                "redis (REDIS_URL, default {default}) is unreachable and \
                 CQRS_REQUIRE_SERVICES=1: {why}"
            );
        }
        eprintln!(
            "skipping the redis benches, nothing measured: redis (REDIS_URL, default \
             {default}) is unreachable: {why} (set CQRS_REQUIRE_SERVICES=1 to fail instead)"
        );
        false
    })
}

/// What one group works with: its runtime, its own key prefix and a raw client, or `None` when
/// Redis is unreachable. Dropping it deletes the group's keys, also when the group panicked.
struct Setup {
    rt: Runtime,
    prefix: String,
    raw: Client,
}

impl Setup {
    fn new(group: &str) -> Option<Self> {
        let rt = runtime();
        if !reachable(&rt) {
            return None;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let prefix = format!("cqrs-bench-{group}-{}-{nanos:x}", std::process::id());
        let raw = rt
            .block_on(raw_client(Duration::from_secs(5)))
            .expect("connect to redis");
        Some(Self { rt, prefix, raw })
    }

    /// A transport under this group's prefix.
    fn transport(&self, ordering: KeyOrdering) -> RedisStreamTransport {
        self.rt
            .block_on(
                RedisStreamOptions::new(redis_url())
                    .key_prefix(&self.prefix)
                    .key_ordering(ordering)
                    .connect(),
            )
            .expect("connect the transport")
    }

    /// The raw side's stream.
    fn raw_stream(&self) -> String {
        format!("{}:raw", self.prefix)
    }
}

impl Drop for Setup {
    /// Deletes every key under the prefix (the transport's streams, lanes and per-group hashes,
    /// the raw stream). It must not panic (it may run while a panic unwinds), so a failure is
    /// printed with what to delete by hand.
    fn drop(&mut self) {
        let deleted = self.rt.block_on(async {
            let deleted = tokio::time::timeout(
                Duration::from_secs(10),
                delete_keys(&self.raw, &self.prefix),
            )
            .await;
            let _ = self.raw.quit().await;
            deleted
        });
        let why = match deleted {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 10 s".to_owned(),
        };
        eprintln!(
            "could not delete the bench keys ({why}); find them with \
             redis-cli --scan --pattern '{}:*'",
            self.prefix
        );
    }
}

/// Deletes the keys matching `{prefix}:*`: `SCAN`, not `KEYS`, since the server is shared.
async fn delete_keys(raw: &Client, prefix: &str) -> Result<(), fred::error::Error> {
    let pattern = format!("{prefix}:*");
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = raw
            .scan_page(cursor, pattern.as_str(), Some(1000), None)
            .await?;
        if !keys.is_empty() {
            let _: u64 = raw.del(keys).await?;
        }
        if next == "0" {
            return Ok(());
        }
        cursor = next;
    }
}

/// The `n`-th event: an `Incremented` with fresh metadata and partition key `s{n % 64}`,
/// serialized as a command's would be.
fn record(n: u64) -> EventRecord {
    keyed_record(n, KEYS)
}

/// The `n`-th event with partition key `s{n % keys}`.
fn keyed_record(n: u64, keys: u64) -> EventRecord {
    let envelope = EventEnvelope::new(Incremented { value: n }, Metadata::new())
        .with_partition_key(format!("s{}", n % keys));
    EventRecord::from_envelope(&envelope).expect("the event serializes")
}

/// The fields the transport writes for an event, but its order chain (`lane`, `prev`).
fn raw_fields(r: &EventRecord) -> Vec<(&'static str, Value)> {
    let record = serde_json::to_string(r).expect("the record serializes");
    vec![
        ("id", Value::from(r.event_id.to_string())),
        ("type", Value::from(r.event_type.as_str())),
        ("v", Value::from(i64::from(r.schema_version))),
        (
            "key",
            Value::from(r.partition_key.as_deref().unwrap_or_default()),
        ),
        ("record", Value::from(record)),
    ]
}

/// One `XADD`, one round trip.
async fn raw_publish_one(raw: &Client, stream: &str, r: &EventRecord) {
    let _: String = raw
        .xadd(stream, false, None::<()>, "*", raw_fields(r))
        .await
        .expect("raw XADD");
}

/// One `XADD` per event in a fred pipeline: one round trip for the batch.
async fn raw_publish_batch(raw: &Client, stream: &str, records: &[EventRecord]) {
    let pipeline = raw.pipeline();
    for r in records {
        let _: () = pipeline
            .xadd(stream, false, None::<()>, "*", raw_fields(r))
            .await
            .expect("queue a raw XADD");
    }
    let ids: Vec<String> = pipeline.all().await.expect("raw XADD pipeline");
    assert_eq!(ids.len(), records.len(), "entries the pipeline added");
}

/// Times `n` publishes of `batch` events each with `publish`, the events built before the
/// clock starts; then, outside the clock, checks that `stream` holds every one of them and
/// deletes it so memory stays flat.
async fn timed_publish<F>(
    n: u64,
    batch: u64,
    counter: &Cell<u64>,
    raw: &Client,
    stream: &str,
    publish: F,
) -> Duration
where
    F: AsyncFn(Vec<EventRecord>),
{
    let first = counter.get();
    counter.set(first + n);
    let inputs: Vec<Vec<EventRecord>> = (first..first + n)
        .map(|k| (0..batch).map(|i| record(k * batch + i)).collect())
        .collect();
    let start = Instant::now();
    for events in inputs {
        publish(events).await;
    }
    let elapsed = start.elapsed();
    let len: u64 = raw.xlen(stream).await.expect("XLEN of the bench stream");
    assert_eq!(
        len,
        n * batch,
        "entries {n} publishes of {batch} added to {stream}"
    );
    let _: u64 = raw.del(stream).await.expect("delete the bench stream");
    elapsed
}

/// How one comparison group is run.
struct Spec<'a> {
    group: &'a str,
    /// Events per operation, for criterion's throughput.
    elements: u64,
    /// Criterion samples (10 for the slow, many-round-trip operations).
    samples: usize,
    /// Operations per block of the paired measurement.
    block: u64,
    /// Rounds of the paired measurement.
    rounds: usize,
}

/// One criterion group comparing a raw baseline with the transport, ordered and unordered,
/// each a function timing `n` operations of its own; then, under `cargo bench`, the paired
/// ratio of the baseline to each (see [`paired`]), printed as `paired:` lines. A pair is
/// measured only when criterion measured both its cases: criterion calls a case's routine only
/// when its filter (a regex or `--exact`) selects the case.
fn compare<A, B, C>(
    c: &mut Criterion,
    rt: &Runtime,
    spec: &Spec<'_>,
    (name_a, a): (&str, A),
    (name_b, b): (&str, B),
    (name_c, cc): (&str, C),
) where
    A: AsyncFn(u64) -> Duration,
    B: AsyncFn(u64) -> Duration,
    C: AsyncFn(u64) -> Duration,
{
    compare_with_baselines(c, rt, spec, (name_a, &a), (name_b, b), (name_c, cc), &a);
}

/// [`compare`], with `a_for_c` as the baseline `c` is paired with (the raw side doing what
/// `c` does, where that differs from what `b` does); criterion's report still lists `a`, and
/// `c`'s pair is measured when criterion measured `a` and `c`. Returns which of the three
/// cases criterion measured (none unless [`measuring`]).
fn compare_with_baselines<A, B, C, D>(
    c: &mut Criterion,
    rt: &Runtime,
    spec: &Spec<'_>,
    (name_a, a): (&str, &A),
    (name_b, b): (&str, B),
    (name_c, cc): (&str, C),
    a_for_c: &D,
) -> [bool; 3]
where
    A: AsyncFn(u64) -> Duration,
    B: AsyncFn(u64) -> Duration,
    C: AsyncFn(u64) -> Duration,
    D: AsyncFn(u64) -> Duration,
{
    let mut g = c.benchmark_group(spec.group);
    g.throughput(Throughput::Elements(spec.elements));
    g.sample_size(spec.samples);
    let ran = [Cell::new(false), Cell::new(false), Cell::new(false)];
    g.bench_function(name_a, |bench| {
        ran[0].set(true);
        bench.to_async(rt).iter_custom(|n| a(n))
    });
    g.bench_function(name_b, |bench| {
        ran[1].set(true);
        bench.to_async(rt).iter_custom(|n| b(n))
    });
    g.bench_function(name_c, |bench| {
        ran[2].set(true);
        bench.to_async(rt).iter_custom(|n| cc(n))
    });
    g.finish();
    let ran = ran.map(|r| r.get());
    let (measuring, testing) = (measuring(), testing());
    let measured = ran.map(|r| measuring && r);
    let report = |name_x: &str, result: Paired| {
        let ([q1, median, q3], per_a, per_x) = result;
        println!(
            "paired: {}: {name_a} {per_a:.2?}, {name_x} {per_x:.2?} per operation; time ratio \
             {name_a}/{name_x} {median:.3} (quartiles {q1:.3} - {q3:.3}) over {} alternating \
             rounds of {}",
            spec.group, spec.rounds, spec.block
        );
    };
    // In a test run (`cargo test --benches`), the paired path runs too, once, unreported: a
    // fault in it would otherwise first show in a published figure.
    let (block, rounds) = if measuring {
        (spec.block, spec.rounds)
    } else {
        (1, 2)
    };
    if ran[0] && ran[1] && (measuring || testing) {
        let result = rt.block_on(paired(a, &b, block, rounds));
        if measuring {
            report(name_b, result);
        }
    }
    if ran[0] && ran[2] && (measuring || testing) {
        let result = rt.block_on(paired(a_for_c, &cc, block, rounds));
        if measuring {
            report(name_c, result);
        }
    }
    measured
}

/// `publish_one_event` and `publish_100_events`: the same comparison with batches of 1 and 100.
fn publish(c: &mut Criterion, group: &str, batch: u64, block: u64) {
    let Some(setup) = Setup::new(group) else {
        return;
    };
    let rt = &setup.rt;
    let ordered = setup.transport(KeyOrdering::Lanes(1024));
    let unordered = setup.transport(KeyOrdering::Unordered);
    let (raw, raw_stream) = (&setup.raw, setup.raw_stream());
    let ordered_stream = ordered.stream_key("ordered").expect("a topic name");
    let unordered_stream = unordered.stream_key("unordered").expect("a topic name");
    let (raw_n, ordered_n, unordered_n) = (Cell::new(0), Cell::new(0), Cell::new(0));
    compare(
        c,
        rt,
        &Spec {
            group,
            elements: batch,
            samples: if batch == 1 { 100 } else { 50 },
            block,
            rounds: 20,
        },
        (
            if batch == 1 {
                "raw_xadd"
            } else {
                "raw_xadd_pipeline"
            },
            async |n| {
                timed_publish(n, batch, &raw_n, raw, &raw_stream, async |events| {
                    if let [event] = events.as_slice() {
                        raw_publish_one(raw, &raw_stream, event).await;
                    } else {
                        raw_publish_batch(raw, &raw_stream, &events).await;
                    }
                })
                .await
            },
        ),
        ("transport", async |n| {
            timed_publish(n, batch, &ordered_n, raw, &ordered_stream, async |events| {
                ordered.publish("ordered", &events).await.expect("publish");
            })
            .await
        }),
        ("transport_unordered", async |n| {
            timed_publish(
                n,
                batch,
                &unordered_n,
                raw,
                &unordered_stream,
                async |events| {
                    unordered
                        .publish("unordered", &events)
                        .await
                        .expect("publish");
                },
            )
            .await
        }),
    );
    drop((ordered, unordered));
}

fn publish_one_event(c: &mut Criterion) {
    publish(c, "publish_one_event", 1, 200);
}

fn publish_100_events(c: &mut Criterion) {
    publish(c, "publish_100_events", BATCH, 10);
}

/// A new group name per drained backlog.
fn next_group(groups: &Cell<u64>) -> String {
    let n = groups.get();
    groups.set(n + 1);
    format!("g{n}")
}

/// What a consumer does with an entry: decode the `record` field. Returns the entry's id.
fn handle_raw_entry(entry: Value) -> Option<String> {
    let mut parts = items(entry).into_iter();
    let id = parts.next()?.into_string()?;
    let fields = items(parts.next()?);
    let record = fields
        .chunks(2)
        .find(|pair| pair[0].as_str().is_some_and(|name| name == "record"))
        .and_then(|pair| pair.get(1))
        .and_then(Value::as_bytes)
        .expect("every entry has a record");
    let record: EventRecord = serde_json::from_slice(record).expect("the record decodes");
    black_box(record);
    Some(id)
}

/// The items of an array reply; none for nil.
fn items(value: Value) -> Vec<Value> {
    if value.is_null() {
        Vec::new()
    } else {
        value.into_array()
    }
}

/// How many entries `group` has read from `stream` and not acknowledged (`XPENDING`'s count).
async fn pending(raw: &Client, stream: &str, group: &str) -> u64 {
    let summary: Value = raw.xpending(stream, group, ()).await.expect("XPENDING");
    items(summary)
        .into_iter()
        .next()
        .and_then(|count| count.as_u64())
        .expect("XPENDING starts with the count")
}

/// The tasks alive on the current runtime.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits, up to 5 s, until no more tasks are alive than `before`: a dropped consumer quits its
/// connection in a task of its own, and fred's tasks for that connection end with it.
async fn settle(before: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive_tasks() > before {
        assert!(
            Instant::now() < deadline,
            "a closed consumer's tasks still run after 5 s ({} alive, {before} before it)",
            alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Times `n` drains of the backlog in `stream`, each by a new group, with `XREADGROUP COUNT
/// 100`, decoding each entry's record, then `XACK` of the batch.
async fn raw_consume(n: u64, raw: &Client, stream: &str, groups: &Cell<u64>) -> Duration {
    let mut measured = Duration::ZERO;
    for _ in 0..n {
        let group = next_group(groups);
        let _: Value = raw
            .xgroup_create(stream, group.as_str(), "0", false)
            .await
            .expect("create the raw group");
        let start = Instant::now();
        let (mut handled, mut acked) = (0, 0);
        while handled < BACKLOG {
            let reply: Value = raw
                .xreadgroup(group.as_str(), "raw", Some(BATCH), None, false, stream, ">")
                .await
                .expect("XREADGROUP");
            let mut ids = Vec::new();
            for stream_reply in items(reply) {
                let entries = items(stream_reply)
                    .into_iter()
                    .nth(1)
                    .unwrap_or(Value::Null);
                ids.extend(items(entries).into_iter().filter_map(handle_raw_entry));
            }
            assert!(!ids.is_empty(), "the raw backlog ran dry at {handled}");
            handled += ids.len() as u64;
            let now_acked: u64 = raw.xack(stream, group.as_str(), ids).await.expect("XACK");
            acked += now_acked;
        }
        measured += start.elapsed();
        // `XACK` counts only ids still pending, each once: `acked == handled` means the ids
        // were distinct, as the transport side checks by hand.
        assert_eq!(handled, BACKLOG, "entries the raw drain handled");
        assert_eq!(
            acked, BACKLOG,
            "distinct entries the raw drain acknowledged"
        );
        assert_eq!(
            pending(raw, stream, &group).await,
            0,
            "left pending by the raw drain"
        );
        let _: Value = raw
            .xgroup_destroy(stream, group.as_str())
            .await
            .expect("destroy the raw group");
    }
    measured
}

/// Times `n` drains of `topic`'s backlog, each by a consumer of a new group through the port:
/// `fetch(100)`, then `ack` of what it handed out. Counts the fetches in `fetches`.
async fn transport_consume(
    n: u64,
    transport: &RedisStreamTransport,
    topic: &str,
    raw: &Client,
    groups: &Cell<u64>,
    fetches: &Cell<u64>,
) -> Duration {
    let stream = transport.stream_key(topic).expect("a topic name");
    let mut measured = Duration::ZERO;
    for _ in 0..n {
        let group = next_group(groups);
        let tasks_before = alive_tasks();
        // Joining (the group and the consumer's own connection) is outside the clock.
        let mut consumer = transport
            .consumer(topic, &group, ConsumerOptions::default())
            .await
            .expect("join the group");
        let mut all = Vec::with_capacity(BACKLOG as usize);
        let start = Instant::now();
        let mut handled = 0;
        while handled < BACKLOG {
            let batch = consumer.fetch(BATCH as usize).await.expect("fetch");
            assert!(!batch.is_empty(), "the backlog ran dry at {handled}");
            let ids: Vec<DeliveryId> = batch
                .into_iter()
                .map(|delivery| {
                    black_box(&delivery.record);
                    delivery.id
                })
                .collect();
            consumer.ack(&ids).await.expect("ack");
            handled += ids.len() as u64;
            // Moved, not cloned, into room made before the clock: checked after it.
            all.extend(ids);
            fetches.set(fetches.get() + 1);
        }
        measured += start.elapsed();
        assert_eq!(handled, BACKLOG, "entries the transport handed out");
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(
            distinct.len(),
            all.len(),
            "distinct entries the transport handed out"
        );
        assert_eq!(
            pending(raw, &stream, &group).await,
            0,
            "left pending by the transport"
        );
        // Closed here, and its connection's tasks left to finish, so none of its cleanup runs
        // inside the next timed block (the paired rounds alternate with the raw side).
        consumer.close().await.expect("close the consumer");
        drop(consumer);
        settle(tasks_before).await;
        let _: Value = raw
            .xgroup_destroy(stream.as_str(), group.as_str())
            .await
            .expect("destroy the group");
    }
    measured
}

/// `consume_and_ack`: the backlog's partition keys cycle through 64 aggregates, so a batch of
/// 100 has entries waiting for their predecessor in their lane. `consume_and_ack_1000_keys`:
/// every entry of the backlog has a key of its own, so only keys sharing one of the 1,024
/// lanes wait for each other.
fn consume(c: &mut Criterion, group: &'static str, keys: u64) {
    let Some(setup) = Setup::new(group) else {
        return;
    };
    let rt = &setup.rt;
    let ordered = setup.transport(KeyOrdering::Lanes(1024));
    let unordered = setup.transport(KeyOrdering::Unordered);
    // The backlogs, published once. Each transport is paired with a raw drain of its own
    // stream: the ordered one's entries carry `lane` and `prev` besides the unordered one's
    // fields, so they are bigger to read.
    rt.block_on(async {
        for k in 0..BACKLOG / BATCH {
            let events: Vec<_> = (0..BATCH)
                .map(|i| keyed_record(k * BATCH + i, keys))
                .collect();
            ordered.publish("ordered", &events).await.expect("publish");
            unordered
                .publish("unordered", &events)
                .await
                .expect("publish");
        }
    });
    let raw = &setup.raw;
    let ordered_stream = ordered.stream_key("ordered").expect("a topic name");
    let unordered_stream = unordered.stream_key("unordered").expect("a topic name");
    let groups = Cell::new(0);
    let (ordered_fetches, unordered_fetches, ordered_drains, unordered_drains) =
        (Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0));
    let raw_on_ordered = async |n| raw_consume(n, raw, &ordered_stream, &groups).await;
    let raw_on_unordered = async |n| raw_consume(n, raw, &unordered_stream, &groups).await;
    let measured = compare_with_baselines(
        c,
        rt,
        &Spec {
            group,
            elements: BACKLOG,
            samples: 10,
            block: 1,
            rounds: 20,
        },
        ("raw_xreadgroup_xack", &raw_on_ordered),
        ("transport", async |n| {
            ordered_drains.set(ordered_drains.get() + n);
            transport_consume(n, &ordered, "ordered", raw, &groups, &ordered_fetches).await
        }),
        ("transport_unordered", async |n| {
            unordered_drains.set(unordered_drains.get() + n);
            transport_consume(n, &unordered, "unordered", raw, &groups, &unordered_fetches).await
        }),
        &raw_on_unordered,
    );
    if measured[1] || measured[2] {
        // NaN for a transport criterion did not measure (filtered out).
        let per =
            |fetches: &Cell<u64>, drains: &Cell<u64>| fetches.get() as f64 / drains.get() as f64;
        println!(
            "{group}: fetches per {BACKLOG} entries: transport {:.1}, \
             transport_unordered {:.1}, raw {} (by construction: batches of {BATCH})",
            per(&ordered_fetches, &ordered_drains),
            per(&unordered_fetches, &unordered_drains),
            BACKLOG / BATCH
        );
    }
    drop((ordered, unordered));
}

fn consume_and_ack(c: &mut Criterion) {
    consume(c, "consume_and_ack", KEYS);
}

fn consume_and_ack_1000_keys(c: &mut Criterion) {
    consume(c, "consume_and_ack_1000_keys", BACKLOG);
}

fn pubsub_fanout(c: &mut Criterion) {
    const GROUP: &str = "pubsub_fanout";
    let Some(setup) = Setup::new(GROUP) else {
        return;
    };
    let rt = &setup.rt;
    let pubsub = rt
        .block_on(
            RedisPubSubOptions::new(redis_url())
                .channel_prefix(&setup.prefix)
                .connect(),
        )
        .expect("connect the pub/sub");
    // A realtime push is about the size of a stream entry's record.
    let payload: Arc<str> = serde_json::to_string(&record(0))
        .expect("the record serializes")
        .into();

    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    for subscribers in [1usize, 100] {
        let channel = format!("fanout-{subscribers}");
        let subscriptions = rt.block_on(async {
            let mut all = Vec::with_capacity(subscribers);
            for _ in 0..subscribers {
                all.push(pubsub.subscribe(&channel).await.expect("subscribe"));
            }
            all
        });
        let held = std::cell::RefCell::new(subscriptions);
        let id = BenchmarkId::new("redis_pubsub/subscribers", subscribers);
        group.bench_function(id, |b| {
            let (pubsub, channel, payload, held) = (&pubsub, &channel, &payload, &held);
            b.to_async(rt).iter_custom(|iters| async move {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    // Each subscriber reads on a task of its own, as a WebSocket connection's
                    // writer would; the clock runs until every one has every message.
                    let readers: Vec<_> = held
                        .take()
                        .into_iter()
                        .map(|mut subscription| {
                            tokio::spawn(async move {
                                let mut got = 0;
                                while got < MESSAGES && subscription.recv().await.is_some() {
                                    got += 1;
                                }
                                (subscription, got)
                            })
                        })
                        .collect();
                    let start = Instant::now();
                    for _ in 0..MESSAGES {
                        pubsub
                            .publish(channel, payload.clone())
                            .await
                            .expect("publish");
                    }
                    let mut back = Vec::with_capacity(readers.len());
                    for reader in readers {
                        let (subscription, got) =
                            tokio::time::timeout(Duration::from_secs(30), reader)
                                .await
                                .expect("every subscriber gets every message within 30 s")
                                .expect("a subscriber task");
                        assert_eq!(got, MESSAGES, "messages a subscriber received");
                        assert_eq!(subscription.missed(), 0, "messages a subscriber missed");
                        back.push(subscription);
                    }
                    measured += start.elapsed();
                    *held.borrow_mut() = back;
                }
                measured
            });
        });
        drop(held);
    }
    group.finish();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    drop(pubsub);
}

criterion_group!(
    benches,
    publish_one_event,
    publish_100_events,
    consume_and_ack,
    consume_and_ack_1000_keys,
    pubsub_fanout
);
criterion_main!(benches);
