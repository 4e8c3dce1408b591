//! The Postgres adapters under load, each next to raw sqlx doing the same writes in the same run
//! and on the same pool:
//!
//! * `append_one_event`: `PgEventStore::append` of one event (its own transaction) against a
//!   plain `INSERT` of the same row into `raw_events`, a copy of the `events` table made with
//!   `LIKE .. INCLUDING ALL` (same columns, identity, defaults, unique constraints);
//! * `append_one_event_8_writers`: the same with eight writers at once, each on its own streams,
//!   which is where the store's append lock shows;
//! * `append_100_events`: a batch of 100 events in one append against a multi-row `INSERT`
//!   (sqlx `QueryBuilder`) of the same 100 rows;
//! * `outbox_relay`: `PgOutboxRelay` shipping a backlog of 1,000 committed events to the
//!   in-memory transport, in batches of 100 (the default) and 1,000.
//!
//! Each group works in a schema of its own in the database at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), created when the group starts and dropped when it
//! ends. When Postgres is unreachable the bench says why and measures nothing, or fails when
//! `CQRS_REQUIRE_SERVICES=1`. `docs/benchmarks.md` has the results and the command.
//!
//! Each case times its own loop (`iter_custom`) with the events built before its clock starts,
//! the same way on both sides of a comparison. The n-th append goes to stream `s{n % 64}` at the
//! version the n-th raw insert writes (with eight writers, the n-th of either side goes to the
//! same writer's stream), so the rows a side wrote depend only on how many it wrote. Criterion
//! runs the two sides for different iteration counts, so their tables differ in size after
//! its cases; before the paired rounds (below), the side behind writes the difference,
//! untimed, and both tables enter the rounds with the same rows and indexes of the same shape.
//!
//! The machine these run on is shared, and its load drifts over the seconds between two
//! criterion cases. So after each comparison, `cargo bench` also measures the two sides in
//! alternating blocks and prints a `paired:` line with the median ratio raw time / store time;
//! that is the ratio to trust, criterion's tables give the absolute times.

use cqrs_benches::fixtures::Incremented;
use cqrs_benches::paired::{measuring, paired, testing};
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::{EventEnvelope, EventRecord, Metadata};
use cqrs_postgres::{PgDatabase, PgEventStore, PgOptions, PgOutboxRelay, RelayBatch};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Postgres, QueryBuilder};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Runtime;

/// The server the test machines run, when `DATABASE_URL` is not set.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How many streams the appends cycle through: the version check then reads a stream that
/// already has events, as a command's usually does.
const STREAMS: u64 = 64;

/// Events per batch in `append_100_events`.
const BATCH: u64 = 100;

/// Concurrent writers in `append_one_event_8_writers`.
const WRITERS: u64 = 8;

/// Committed events waiting for the relay at the start of each `outbox_relay` iteration.
const BACKLOG: u64 = 1000;

/// The columns both sides write; `position` and `recorded_at` come from the table.
const ROW: &str = concat!(
    "stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, ",
    "partition_key"
);

/// One current-thread runtime: the numbers are the server's and the round trips', not a
/// scheduler's. The eight writers are tasks on it, concurrent while they wait for Postgres.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Whether Postgres answers, asked once per run. When it does not: prints why and returns
/// `false`, or panics when `CQRS_REQUIRE_SERVICES=1` (CI), so a missing server fails the run.
fn reachable(rt: &Runtime) -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    *REACHABLE.get_or_init(|| {
        let probe = PgOptions::new(database_url())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect();
        let why = rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(db)) => {
                    // The bench crate builds with the adapters' `tls` feature (the helpdesk,
                    // which `http_load` runs, turns it on): against a server with `ssl = on`
                    // and a URL without `sslmode`, sqlx encrypts. Both sides of each ratio
                    // share the connection settings; said here so runs compare like with like.
                    let tls: Option<bool> = sqlx::query_scalar(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    )
                    .fetch_optional(db.pool())
                    .await
                    .ok()
                    .flatten();
                    eprintln!(
                        "postgres benches: connections {} (`sslmode=disable` or `require` in \
                         DATABASE_URL decides)",
                        match tls {
                            Some(true) => "encrypted (TLS)",
                            Some(false) => "in plain text",
                            None => "of unknown encryption",
                        }
                    );
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("no answer within 5 s".to_owned()),
            }
        });
        let Some(why) = why else {
            return true;
        };
        // The URL is not printed: it may hold a password.
        if std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!(
                "postgres (DATABASE_URL, default {DEFAULT_URL}) is unreachable and \
                 CQRS_REQUIRE_SERVICES=1: {why}"
            );
        }
        eprintln!(
            "skipping the postgres benches, nothing measured: postgres (DATABASE_URL, default \
             {DEFAULT_URL}) is unreachable: {why} (set CQRS_REQUIRE_SERVICES=1 to fail instead)"
        );
        false
    })
}

/// A group's schema, dropped with it: also when the group panics (an assertion, a failed
/// append), which left a `bench_*` schema in the shared database.
struct BenchSchema<'a> {
    rt: &'a Runtime,
    db: PgDatabase,
}

impl std::ops::Deref for BenchSchema<'_> {
    type Target = PgDatabase;
    fn deref(&self) -> &PgDatabase {
        &self.db
    }
}

impl Drop for BenchSchema<'_> {
    fn drop(&mut self) {
        // Bounded: a server gone away must not hang the bench's exit.
        let dropped = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), self.db.drop_schema()).await
        });
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the bench schema {}", self.db.schema());
        }
    }
}

/// A fresh, migrated schema for one group, or `None` when Postgres is unreachable. The pool has
/// `PgOptions`' defaults (10 connections); both sides of every comparison use it.
fn schema<'a>(rt: &'a Runtime, group: &str) -> Option<BenchSchema<'a>> {
    if !reachable(rt) {
        return None;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("bench_{group}_{}_{nanos:x}", std::process::id());
    let db = rt.block_on(
        PgOptions::new(database_url())
            .schema(&name)
            .application_name(format!("cqrs-bench {name}"))
            .connect(),
    );
    // Guarded before the migration, which may fail halfway.
    let db = BenchSchema {
        rt,
        db: db.expect("connect to postgres"),
    };
    rt.block_on(db.migrate()).expect("migrate the bench schema");
    Some(db)
}

/// The `n`-th event: an `Incremented` with fresh metadata, serialized as a command's would be.
fn record(n: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(
        Incremented { value: n },
        Metadata::new(),
    ))
    .expect("the event serializes")
}

fn stream(n: u64) -> String {
    format!("s{}", n % STREAMS)
}

/// The baseline's table: a copy of `events`, and the insert of one row into it.
struct Raw {
    pool: PgPool,
    table: String,
    insert: Arc<str>,
}

impl Raw {
    fn create(rt: &Runtime, db: &PgDatabase) -> Self {
        let schema = db.schema();
        let table = format!("\"{schema}\".raw_events");
        let create = format!("CREATE TABLE {table} (LIKE \"{schema}\".events INCLUDING ALL)");
        rt.block_on(sqlx::query(AssertSqlSafe(create)).execute(db.pool()))
            .expect("create the raw table");
        let insert =
            format!("INSERT INTO {table} ({ROW}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)").into();
        Self {
            pool: db.pool().clone(),
            table,
            insert,
        }
    }

    /// One row, one autocommitted statement.
    async fn insert_one(&self, stream: &str, version: u64, r: &EventRecord) {
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(stream)
            .bind(i64::try_from(version).expect("a version fits"))
            .bind(r.event_id)
            .bind(&r.event_type)
            .bind(i32::try_from(r.schema_version).expect("a schema version fits"))
            .bind(Json(&r.payload))
            .bind(Json(&r.metadata))
            .bind(r.partition_key.as_deref())
            .execute(&self.pool)
            .await
            .expect("raw insert");
    }

    /// `records` as consecutive versions after `version`, in one multi-row statement.
    async fn insert_many(&self, stream: &str, version: u64, records: &[EventRecord]) {
        let mut insert =
            QueryBuilder::<Postgres>::new(format!("INSERT INTO {} ({ROW}) ", self.table));
        insert.push_values(records.iter().zip(version + 1..), |mut row, (r, v)| {
            row.push_bind(stream)
                .push_bind(i64::try_from(v).expect("a version fits"))
                .push_bind(r.event_id)
                .push_bind(r.event_type.as_str())
                .push_bind(i32::try_from(r.schema_version).expect("a schema version fits"))
                .push_bind(Json(&r.payload))
                .push_bind(Json(&r.metadata))
                .push_bind(r.partition_key.as_deref());
        });
        insert
            .build()
            .execute(&self.pool)
            .await
            .expect("raw multi-row insert");
    }

    async fn count(&self) -> u64 {
        count(&self.pool, &self.table).await
    }
}

async fn count(pool: &PgPool, table: &str) -> u64 {
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("count rows");
    u64::try_from(n).unwrap_or(0)
}

async fn store_append(store: &PgEventStore, stream: &str, version: u64, events: Vec<EventRecord>) {
    let stored = store
        .append(stream, ExpectedVersion::Exactly(version), events)
        .await
        .expect("event store append");
    debug_assert!(stored.iter().all(|e| e.position.is_some()));
}

/// Checks that each side wrote every row it was asked to, so no case measured a failure.
fn assert_rows(rt: &Runtime, db: &PgDatabase, raw: &Raw, store_rows: u64, raw_rows: u64) {
    rt.block_on(async {
        let events = format!("\"{}\".events", db.schema());
        assert_eq!(
            count(db.pool(), &events).await,
            store_rows,
            "rows the event store wrote"
        );
        assert_eq!(raw.count().await, raw_rows, "rows the raw inserts wrote");
    });
}

/// One criterion group comparing two ways of doing the same work, each a function timing `n`
/// operations of its own (inputs built before its clock starts); then, under `cargo bench`, the
/// paired ratio of the two (see [`paired`]), printed as `paired:` lines.
///
/// The paired rounds run only when criterion measured both cases: it calls a case's routine
/// (always with `n` of at least 1) only when its filter selects the case. Criterion gives the
/// two cases different iteration counts, so before the rounds the side that did fewer
/// operations does the difference, in blocks of `block`, its time thrown away: the two tables
/// enter the rounds with the same rows, and the rounds add the same to each.
#[allow(clippy::too_many_arguments)]
fn compare<A, B>(
    c: &mut Criterion,
    rt: &Runtime,
    group: &str,
    elements: u64,
    block: u64,
    (name_a, a): (&str, A),
    (name_b, b): (&str, B),
) where
    A: AsyncFn(u64) -> Duration,
    B: AsyncFn(u64) -> Duration,
{
    // Operations each side was asked for by criterion.
    let (done_a, done_b) = (Cell::new(0u64), Cell::new(0u64));
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(elements));
    g.bench_function(name_a, |bench| {
        bench.to_async(rt).iter_custom(|n| {
            done_a.set(done_a.get() + n);
            a(n)
        })
    });
    g.bench_function(name_b, |bench| {
        bench.to_async(rt).iter_custom(|n| {
            done_b.set(done_b.get() + n);
            b(n)
        })
    });
    g.finish();
    // In a test run (`cargo test --benches`), the top-up and the paired path run too, once,
    // unreported: a fault in them would otherwise first show in a published figure.
    let measuring = measuring();
    if done_a.get() > 0 && done_b.get() > 0 && (measuring || testing()) {
        rt.block_on(async {
            let (mut behind_a, mut behind_b) = (
                done_b.get().saturating_sub(done_a.get()),
                done_a.get().saturating_sub(done_b.get()),
            );
            while behind_a > 0 {
                let n = behind_a.min(block);
                a(n).await;
                behind_a -= n;
            }
            while behind_b > 0 {
                let n = behind_b.min(block);
                b(n).await;
                behind_b -= n;
            }
        });
        const ROUNDS: usize = 20;
        if !measuring {
            rt.block_on(paired(&a, &b, 1, 2));
            return;
        }
        let ([q1, median, q3], per_a, per_b) = rt.block_on(paired(&a, &b, block, ROUNDS));
        println!(
            "paired: {group}: {name_a} {per_a:.2?}, {name_b} {per_b:.2?} per operation; \
             time ratio {name_a}/{name_b} {median:.3} (quartiles {q1:.3} - {q3:.3}) over \
             {ROUNDS} alternating rounds of {block}"
        );
    }
}

/// A function timing `n` single-row appends of one side: the n-th goes to stream
/// `{prefix}s{n % 64}` after version `n / 64`.
async fn timed<F, Fut>(n: u64, counter: &Cell<u64>, append: F) -> Duration
where
    F: Fn(String, u64, EventRecord) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let first = counter.get();
    counter.set(first + n);
    let inputs: Vec<_> = (first..first + n)
        .map(|k| (stream(k), k / STREAMS, record(k)))
        .collect();
    let start = Instant::now();
    for (stream, version, event) in inputs {
        append(stream, version, event).await;
    }
    start.elapsed()
}

fn append_one_event(c: &mut Criterion) {
    let rt = runtime();
    let Some(db) = schema(&rt, "append_one") else {
        return;
    };
    let raw = Raw::create(&rt, &db);
    let store = db.event_store();
    let (raw_n, store_n) = (Cell::new(0u64), Cell::new(0u64));
    compare(
        c,
        &rt,
        "append_one_event",
        1,
        100,
        ("raw_insert", async |n| {
            timed(n, &raw_n, async |stream, version, event| {
                raw.insert_one(&stream, version + 1, &event).await
            })
            .await
        }),
        ("pg_event_store", async |n| {
            timed(n, &store_n, async |stream, version, event| {
                store_append(&store, &stream, version, vec![event]).await
            })
            .await
        }),
    );
    assert_rows(&rt, &db, &raw, store_n.get(), raw_n.get());
}

/// Runs `iters` appends spread over [`WRITERS`] tasks. The side's k-th append (`counter`
/// counts them) is writer `k % 8`'s j-th, `j = k / 8`, and goes to its stream `w{k % 8}-s{j % 64}`
/// after version `j / 64`: which rows a side wrote depends only on how many, not on how
/// criterion split them into calls.
async fn concurrently<F, Fut>(iters: u64, counter: &Cell<u64>, append: F) -> Duration
where
    F: Fn(String, u64, EventRecord) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let first = counter.get();
    counter.set(first + iters);
    // Built before the clock starts, like the single-writer cases' events.
    let mut work: Vec<Vec<(String, u64, EventRecord)>> = (0..WRITERS).map(|_| Vec::new()).collect();
    for k in first..first + iters {
        let (w, j) = (k % WRITERS, k / WRITERS);
        work[w as usize].push((format!("w{w}-{}", stream(j)), j / STREAMS, record(k)));
    }
    let start = Instant::now();
    let writers: Vec<_> = work
        .into_iter()
        .map(|appends| {
            let append = append.clone();
            tokio::spawn(async move {
                for (stream, version, event) in appends {
                    append(stream, version, event).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("a writer finished");
    }
    start.elapsed()
}

fn append_one_event_8_writers(c: &mut Criterion) {
    let rt = runtime();
    let Some(db) = schema(&rt, "append_8w") else {
        return;
    };
    let raw = Arc::new(Raw::create(&rt, &db));
    let store = db.event_store();
    let (raw_n, store_n) = (Cell::new(0u64), Cell::new(0u64));
    compare(
        c,
        &rt,
        "append_one_event_8_writers",
        1,
        400,
        ("raw_insert", async |n| {
            let raw = raw.clone();
            concurrently(n, &raw_n, move |stream, version, event| {
                let raw = raw.clone();
                async move { raw.insert_one(&stream, version + 1, &event).await }
            })
            .await
        }),
        ("pg_event_store", async |n| {
            let store = store.clone();
            concurrently(n, &store_n, move |stream, version, event| {
                let store = store.clone();
                async move { store_append(&store, &stream, version, vec![event]).await }
            })
            .await
        }),
    );
    assert_rows(&rt, &db, &raw, store_n.get(), raw_n.get());
}

/// A function timing `n` appends of [`BATCH`] events of one side: the n-th batch goes to
/// stream `s{n % 64}` after version `n / 64 * 100`.
async fn timed_batches<F, Fut>(n: u64, counter: &Cell<u64>, append: F) -> Duration
where
    F: Fn(String, u64, Vec<EventRecord>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let first = counter.get();
    counter.set(first + n);
    let inputs: Vec<_> = (first..first + n)
        .map(|k| {
            let events = (0..BATCH)
                .map(|i| record(k * BATCH + i))
                .collect::<Vec<_>>();
            (stream(k), k / STREAMS * BATCH, events)
        })
        .collect();
    let start = Instant::now();
    for (stream, version, events) in inputs {
        append(stream, version, events).await;
    }
    start.elapsed()
}

fn append_100_events(c: &mut Criterion) {
    let rt = runtime();
    let Some(db) = schema(&rt, "append_100") else {
        return;
    };
    let raw = Raw::create(&rt, &db);
    let store = db.event_store();
    let (raw_n, store_n) = (Cell::new(0u64), Cell::new(0u64));
    compare(
        c,
        &rt,
        "append_100_events",
        BATCH,
        30,
        ("raw_multi_row_insert", async |n| {
            timed_batches(n, &raw_n, async |stream, version, events| {
                raw.insert_many(&stream, version, &events).await
            })
            .await
        }),
        ("pg_event_store", async |n| {
            timed_batches(n, &store_n, async |stream, version, events| {
                store_append(&store, &stream, version, events).await
            })
            .await
        }),
    );
    assert_rows(&rt, &db, &raw, store_n.get() * BATCH, raw_n.get() * BATCH);
}

fn outbox_relay(c: &mut Criterion) {
    let rt = runtime();
    let Some(db) = schema(&rt, "relay") else {
        return;
    };
    // The backlog: committed once, shipped again by a relay of a new name in every iteration
    // (a new name starts at the beginning).
    rt.block_on(async {
        let store = db.event_store();
        for k in 0..BACKLOG / BATCH {
            let events = (0..BATCH).map(|i| record(k * BATCH + i)).collect();
            store_append(&store, &stream(k), k / STREAMS * BATCH, events).await;
        }
    });
    let relays = Cell::new(0u64);

    let mut group = c.benchmark_group("outbox_relay");
    group.throughput(Throughput::Elements(BACKLOG));
    for batch_size in [100, 1000] {
        let id = BenchmarkId::new("in_memory_transport/batch_size", batch_size);
        group.bench_function(id, |b| {
            let (db, relays): (&PgDatabase, _) = (&db, &relays);
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let name = format!("bench-{}", relays.get());
                    relays.set(relays.get() + 1);
                    let transport = Arc::new(InMemoryTransport::new());
                    let relay = PgOutboxRelay::new(db.clone(), transport.clone())
                        .relay_name(name)
                        .batch_size(batch_size)
                        .listen(false);
                    relay
                        .ensure_checkpoint()
                        .await
                        .expect("create the checkpoint");

                    let start = Instant::now();
                    let mut shipped = 0;
                    while shipped < BACKLOG {
                        match relay.relay_once().await.expect("relay a batch") {
                            RelayBatch::Shipped(0) => panic!("the backlog ran dry at {shipped}"),
                            RelayBatch::Shipped(n) => shipped += n as u64,
                            other => panic!("the only relay of its name got {other:?}"),
                        }
                    }
                    measured += start.elapsed();

                    // No group joined: the backlog is the topic's whole log.
                    let delivered = transport.backlog("events", "bench") as u64;
                    assert_eq!(delivered, BACKLOG, "events the transport received");
                }
                measured
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    append_one_event,
    append_one_event_8_writers,
    append_100_events,
    outbox_relay
);
criterion_main!(benches);
