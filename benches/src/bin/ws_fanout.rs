//! WebSocket fan-out load harness for `cqrs-realtime`.
//!
//! Opens N WebSocket clients to one hub on loopback, all subscribed to one topic, publishes
//! events at a fixed rate, and reports the delivery latency (p50, p99, max) and the hub's memory
//! per connection. The latency runs from the time each publish was due (its slot in the
//! schedule, `start + seq / rate`, so a publish that starts late counts), stamped in the hub
//! process before `Publisher::publish` (under `--raw`, in the raw server before its send), to
//! the client's receipt: a command's dispatch, the event store and the relay hop are not on
//! this path.
//!
//! Every event carries its sequence number, and each client records which ones it received, so
//! the report counts missing and duplicate deliveries, `error` frames, and the clients that
//! failed or were still waiting at the deadline (they report what they received). The latency
//! percentiles are over every expected delivery, a missing one counting as never delivered.
//!
//! The hub runs in a child process (this binary with `--serve`), so its resident memory is
//! measured apart from the clients'. Both raise their open-file limit to the hard limit. The
//! hub's memory "after publishing", the CPU of the publishing phase and the hub's stats are
//! read once every client has reported (has every event, or gave up), before any client closes
//! its socket: they leave out the teardown (one close handshake per client), which comes after.
//!
//! ```text
//! cargo run --release -p cqrs-benches --bin ws_fanout -- --connections 10000 --events 300 --rate 10
//! ```
//!
//! Options (defaults): `--connections 10000`, `--events 300`, `--rate 10` (events per second),
//! `--payload 200` (filler bytes per event), `--ramp 200` (handshakes in flight at once),
//! `--pin` (hub on CPU 0, clients on CPU 1, with `taskset`), `--threads 2` (the clients'
//! tokio worker threads), `--hub-threads 2` (the hub's), `--raw` (the baseline: the same
//! clients and frames served by a hand-written axum + tokio `broadcast` fan-out instead of the
//! hub, see `serve_raw`), `--hub-read-buffer 512` (bytes: each server connection's read buffer,
//! the hub's default; the raw server uses it too).

use axum::Router;
use axum::serve::ListenerExt;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::{EventRecord, Metadata, RecordMetadata};
use cqrs_realtime::{
    AllowAll, AuthenticateFn, EventRouting, Hub, HubOptions, Routed, Topic, Unauthenticated,
};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::time::error::Elapsed;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `HubOptions`' default `read_buffer_size`, the default of `--hub-read-buffer`.
const HUB_READ_BUFFER: usize = 512;

struct Args {
    connections: usize,
    events: usize,
    rate: u64,
    payload: usize,
    ramp: usize,
    pin: bool,
    serve: bool,
    raw: bool,
    threads: usize,
    hub_threads: usize,
    hub_read_buffer: usize,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        connections: 10_000,
        events: 300,
        rate: 10,
        payload: 200,
        ramp: 200,
        pin: false,
        serve: false,
        raw: false,
        threads: 2,
        hub_threads: 2,
        hub_read_buffer: HUB_READ_BUFFER,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<String, BoxError> {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value").into())
        };
        match flag.as_str() {
            "--connections" => args.connections = value()?.parse()?,
            "--events" => args.events = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--payload" => args.payload = value()?.parse()?,
            "--ramp" => args.ramp = value()?.parse()?,
            "--serve" => args.serve = true,
            "--raw" => args.raw = true,
            "--threads" => args.threads = value()?.parse()?,
            "--hub-threads" => args.hub_threads = value()?.parse()?,
            "--hub-read-buffer" => args.hub_read_buffer = value()?.parse()?,
            "--pin" => args.pin = true,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let mut problems = Vec::new();
    if args.connections == 0 {
        problems.push("--connections must be at least 1");
    }
    if !(1..=1_000_000).contains(&args.rate) {
        problems.push("--rate must be from 1 to 1000000 events a second");
    }
    if args.ramp == 0 {
        problems.push("--ramp must be at least 1 (handshakes in flight at once)");
    }
    if args.threads == 0 || args.hub_threads == 0 {
        problems.push("--threads and --hub-threads must be at least 1");
    }
    if args.hub_read_buffer < 256 {
        problems.push("--hub-read-buffer must be at least 256 bytes (the hub's least)");
    }
    if !problems.is_empty() {
        return Err(problems.join("; ").into());
    }
    Ok(args)
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    // Each client holds a socket here, and the hub one per client: short of that the ramp
    // would stall on accept, with no error.
    let needed = args.connections as u64 + 64;
    if !args.serve && limit < needed {
        return Err(format!(
            "the open-file limit is {limit} (the hard limit), and {} connections need about \
             {needed}: raise it (`ulimit -Hn`, or `LimitNOFILE=` for a service) or ask for \
             fewer connections",
            args.connections
        )
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    if args.serve && args.raw {
        eprintln!("hub open-file limit: {limit}");
        runtime.block_on(serve_raw(args.payload, args.hub_read_buffer))
    } else if args.serve {
        eprintln!("hub open-file limit: {limit}");
        runtime.block_on(serve(args.payload, args.hub_read_buffer))
    } else {
        eprintln!("open-file limit: {limit}");
        runtime.block_on(drive(args))
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Topic `bench` on channel `bench`; the pushed event is the record's payload.
struct BenchRouting;

impl EventRouting for BenchRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        (topic.as_str() == "bench").then(|| "bench".to_owned())
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        Some(Routed::new(record.payload.clone()).topic(Topic::parse("bench").ok()?))
    }
}

/// The hub process: serves, then obeys `publish N RATE`, `stats` and `quit` on stdin.
async fn serve(payload: usize, read_buffer: usize) -> Result<(), BoxError> {
    let hub = Hub::builder(AuthenticateFn::new(|token: String| async move {
        if token.is_empty() {
            Err(Unauthenticated::new("token required"))
        } else {
            Ok(token)
        }
    }))
    .authorizer(AllowAll)
    .routing(BenchRouting)
    .pubsub(Arc::new(InMemoryPubSub::new()))
    .options(
        HubOptions::new()
            .max_connections(50_000)
            .read_buffer_size(read_buffer),
    )
    .build()?;
    listen(Router::new().route("/ws", hub.route())).await?;

    let publisher = hub.publisher();
    let pad = "x".repeat(payload);
    obey_stdin(
        async |seq, due| {
            let record = EventRecord::new(
                Metadata::new().message_id,
                "BenchEvent",
                1,
                serde_json::json!({ "seq": seq, "sent_ns": due, "pad": pad }),
                RecordMetadata::from_metadata(&Metadata::new()),
            );
            publisher.publish(&record).await?;
            Ok(())
        },
        || format!("stats {:?}", hub.stats()),
    )
    .await?;
    hub.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub.closed()).await;
    Ok(())
}

/// The baseline for the hub (`--raw`): the same clients, frames and publishing schedule, served
/// by the smallest fan-out one would write by hand on axum's WebSocket: a tokio `broadcast`
/// channel, and per connection one task that answers `subscribe` and forwards every frame. No
/// authentication, authorization, registry, send queue, keepalive or limits; the socket has
/// the hub's buffer settings. Obeys the same stdin commands as [`serve`].
async fn serve_raw(payload: usize, read_buffer: usize) -> Result<(), BoxError> {
    use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
    let (events, _) = tokio::sync::broadcast::channel::<Utf8Bytes>(1024);
    let connections = Arc::new(AtomicUsize::new(0));
    let lagged = Arc::new(AtomicUsize::new(0));
    let accept = {
        let (events, connections, lagged) = (events.clone(), connections.clone(), lagged.clone());
        move |ws: WebSocketUpgrade| async move {
            // The hub's buffer settings (`HubOptions`: its defaults, or `--hub-read-buffer`).
            ws.read_buffer_size(read_buffer)
                .write_buffer_size(0)
                .max_write_buffer_size(256 * 1024)
                .on_upgrade(move |mut socket: WebSocket| async move {
                    // Subscribed before `subscribed` is sent, as the hub promises.
                    let mut feed = events.subscribe();
                    let Some(Ok(WsMessage::Text(_))) = socket.recv().await else {
                        return;
                    };
                    let subscribed = r#"{"type":"subscribed","topic":"bench"}"#;
                    if socket
                        .send(WsMessage::Text(subscribed.into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    let (mut sink, mut stream) = socket.split();
                    loop {
                        tokio::select! {
                            frame = feed.recv() => match frame {
                                Ok(frame) => {
                                    if sink.send(WsMessage::Text(frame)).await.is_err() {
                                        break;
                                    }
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                    lagged.fetch_add(n as usize, Ordering::Relaxed);
                                }
                                Err(_) => break,
                            },
                            incoming = stream.next() => {
                                if !matches!(incoming, Some(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    connections.fetch_sub(1, Ordering::Relaxed);
                })
        }
    };
    listen(Router::new().route("/ws", axum::routing::get(accept))).await?;

    let pad = "x".repeat(payload);
    obey_stdin(
        async |seq, due| {
            // The frame the hub sends for this event (its fields in the hub's order), encoded
            // once and shared by every connection.
            let event = serde_json::json!({ "seq": seq, "sent_ns": due, "pad": pad });
            let frame = format!(r#"{{"type":"event","topic":"bench","event":{event}}}"#);
            let _ = events.send(Utf8Bytes::from(frame));
            Ok(())
        },
        || {
            format!(
                "stats raw {{ connections: {}, lagged: {} }}",
                connections.load(Ordering::Relaxed),
                lagged.load(Ordering::Relaxed)
            )
        },
    )
    .await
}

/// Serves `app` on a free loopback port and tells the driver which (`listening ADDR`).
async fn listen(app: Router) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Small frames written one at a time: without TCP_NODELAY, Nagle's algorithm can hold one
    // back until the previous is acknowledged.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("listening {addr}");
    std::io::stdout().flush()?;
    Ok(())
}

/// Obeys `publish N RATE` (N events at RATE a second, each by `publish(seq, due_ns)`),
/// `stats` (prints `stats()`) and `quit` on stdin, until `quit` or the end of stdin.
async fn obey_stdin(
    mut publish: impl AsyncFnMut(u64, u64) -> Result<(), BoxError>,
    stats: impl Fn() -> String,
) -> Result<(), BoxError> {
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(command) = commands.recv().await {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["publish", count, rate] => {
                let (count, rate): (u64, u64) = (count.parse()?, rate.parse()?);
                let period = 1_000_000_000 / rate;
                let mut tick = tokio::time::interval(Duration::from_nanos(period));
                let start = now_ns();
                let mut late = Vec::with_capacity(count as usize);
                for seq in 0..count {
                    tick.tick().await;
                    // Stamped with when the event was due, not when the tick fired: a late
                    // tick (the hub still fanning out the previous event) counts as latency,
                    // as it would for a command arriving on schedule.
                    let due = start + seq * period;
                    late.push(now_ns().saturating_sub(due));
                    publish(seq, due).await?;
                }
                late.sort_unstable();
                let ms = |q: f64| {
                    let i = ((late.len() as f64 * q).ceil() as usize).max(1) - 1;
                    late.get(i).map_or(0.0, |&ns| ns as f64 / 1e6)
                };
                println!(
                    "published {count}; publish started after its due time by p50 {:.1} ms, \
                     p99 {:.1} ms, max {:.1} ms",
                    ms(0.5),
                    ms(0.99),
                    ms(1.0)
                );
            }
            ["stats"] => println!("{}", stats()),
            ["quit"] => break,
            _ => eprintln!("unknown command {command:?}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// A process's resident memory, KiB, from `/proc/<pid>/status`.
#[derive(Clone, Copy)]
struct Resident {
    /// `VmRSS`: everything resident, the binary's pages included.
    all: u64,
    /// `RssAnon`: heap, stacks and other anonymous memory, what connections allocate; code
    /// paged in while serving them does not count.
    anonymous: u64,
}

fn resident(pid: u32) -> Result<Resident, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64, BoxError> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| format!("bad {name} line {line:?}"))?
            .parse()?)
    };
    Ok(Resident {
        all: field("VmRSS:")?,
        anonymous: field("RssAnon:")?,
    })
}

/// A non-event frame, read in full (they are few).
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    /// An `error` frame's code.
    code: Option<String>,
}

/// What one client saw, sent back whether it finished, failed or ran out of time, so a
/// client in trouble still counts with what it received.
#[derive(Default)]
struct Report {
    /// Whether it got `subscribed`: only then are events expected of it.
    subscribed: bool,
    /// The latency (µs) of each event's first delivery.
    latencies: Vec<u32>,
    /// Events delivered again after their first delivery.
    duplicates: usize,
    /// Event frames without a `seq` or `sent_ns`, or with a `seq` that was not published.
    malformed: usize,
    /// `error` frames, and the first one's code.
    errors: usize,
    first_error: Option<String>,
    /// Frames neither `event` nor `error` (an unexpected `subscribed`, `unsubscribed`).
    other: usize,
    /// Why it failed, before or after subscribing.
    failure: Option<String>,
    /// Still waiting for events at the deadline.
    timed_out: bool,
}

/// The reports of every client, added up.
#[derive(Default)]
struct Summary {
    latencies: Vec<u32>,
    duplicates: usize,
    malformed: usize,
    errors: usize,
    error_codes: std::collections::BTreeSet<String>,
    other: usize,
    failed_mid_run: usize,
    timed_out: usize,
}

impl Summary {
    fn add(&mut self, report: Report) {
        self.latencies.extend(report.latencies);
        self.duplicates += report.duplicates;
        self.malformed += report.malformed;
        self.errors += report.errors;
        self.error_codes.extend(report.first_error);
        self.other += report.other;
        if report.subscribed && report.failure.is_some() {
            self.failed_mid_run += 1;
        }
        if report.timed_out {
            self.timed_out += 1;
        }
    }
}

/// The client process: starts the hub, ramps up clients, publishes, reports.
async fn drive(args: Args) -> Result<(), BoxError> {
    // With --pin, the hub runs on CPU 0 and the clients on CPU 1 (through `taskset`), so the
    // clients' wake-ups do not preempt the hub on its own CPU: closer to clients on other
    // machines.
    let exe = std::env::current_exe()?;
    let mut command = if args.pin {
        let status = Command::new("taskset")
            .args(["-a", "-cp", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err("taskset failed".into());
        }
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]).arg(&exe);
        command
    } else {
        Command::new(&exe)
    };
    let mut child = command
        .args(["--serve", "--payload", &args.payload.to_string()])
        .args(args.raw.then_some("--raw"))
        .args(["--threads", &args.hub_threads.to_string()])
        .args(["--hub-read-buffer", &args.hub_read_buffer.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines.recv().await.ok_or("the hub process exited")?;
    let addr = first
        .strip_prefix("listening ")
        .ok_or_else(|| format!("unexpected hub output {first:?}"))?
        .to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = resident(pid)?;
    let kernel_before = kernel_memory();

    // Ramp up: every client connects, subscribes, and waits for `subscribed`.
    let url = format!("ws://{addr}/ws?token=bench");
    let subscribed = Arc::new(AtomicUsize::new(0));
    let ramp_failed = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.ramp));
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Report>();
    // Set at the deadline: the clients still waiting report what they have.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // Set once every client has reported and the hub has been measured: only then do the
    // clients close their sockets, so the close handshakes stay out of the measurements.
    let (close_tx, close) = tokio::sync::watch::channel(false);
    let mut clients = Vec::with_capacity(args.connections);
    let started = Instant::now();
    let mut last_progress = started;
    for _ in 0..args.connections {
        let permit = gate.clone().acquire_owned().await?;
        let (url, counter, ramp_failed, failures, done_tx, stop, close) = (
            url.clone(),
            subscribed.clone(),
            ramp_failed.clone(),
            failures.clone(),
            done_tx.clone(),
            stop.clone(),
            close.clone(),
        );
        let events = args.events;
        clients.push(tokio::spawn(async move {
            let (report, ws) = client(&url, events, permit, &counter, stop).await;
            if let Some(error) = &report.failure {
                if !report.subscribed {
                    ramp_failed.fetch_add(1, Ordering::Relaxed);
                }
                if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                    let when = if report.subscribed {
                        "after subscribing"
                    } else {
                        "before subscribing"
                    };
                    eprintln!("\nclient failed {when}: {error}");
                }
            }
            let _ = done_tx.send(report);
            drop(done_tx);
            if let Some(mut ws) = ws {
                let mut close = close;
                let _ = close.wait_for(|close| *close).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            }
        }));
        if last_progress.elapsed() > Duration::from_millis(250) {
            last_progress = Instant::now();
            hub_alive(&mut child)?;
            eprint!(
                "\rsubscribed {}/{}",
                subscribed.load(Ordering::Relaxed),
                args.connections
            );
        }
    }
    // Only the clients hold senders now, so `recv` ends once every one has reported.
    drop(done_tx);
    while subscribed.load(Ordering::Relaxed) + ramp_failed.load(Ordering::Relaxed)
        < args.connections
    {
        hub_alive(&mut child)?;
        eprint!(
            "\rsubscribed {}/{}",
            subscribed.load(Ordering::Relaxed),
            args.connections
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ramp = started.elapsed();
    let held = subscribed.load(Ordering::Relaxed);
    let ramp_failed = ramp_failed.load(Ordering::Relaxed);
    eprintln!(
        "\rsubscribed {held}/{} in {:.1} s ({ramp_failed} failed)",
        args.connections,
        ramp.as_secs_f64(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = resident(pid)?;
    let kernel_idle = kernel_memory();

    // Publish at the rate, and wait for every client's report.
    eprintln!(
        "publishing {} events at {}/s to {held} subscribers",
        args.events, args.rate
    );
    let cpu_before = (cpu_seconds(&pid.to_string())?, cpu_seconds("self")?);
    let publishing = Instant::now();
    writeln!(stdin, "publish {} {}", args.events, args.rate)?;
    stdin.flush()?;
    let mut summary = Summary {
        latencies: Vec::with_capacity(held * args.events),
        ..Summary::default()
    };
    let wait = Duration::from_secs(args.events as u64 / args.rate.max(1) + 60);
    let mut until = tokio::time::Instant::now() + wait;
    let (mut reports, mut stopped) = (0, false);
    while reports < args.connections {
        match tokio::time::timeout_at(until, done.recv()).await {
            Ok(Some(report)) => {
                summary.add(report);
                reports += 1;
            }
            Ok(None) => break,
            Err(_) if !stopped => {
                // The deadline: the clients still waiting send what they have.
                stopped = true;
                stop_tx.send_replace(true);
                until = tokio::time::Instant::now() + Duration::from_secs(10);
            }
            Err(_) => break,
        }
    }
    // Every client has its events (or gave up), and none has closed its socket yet: the
    // memory, CPU and stats of the publishing phase, without the teardown.
    let unreported = args.connections - reports;
    // A hub that died meanwhile has no memory or CPU left to read: the deliveries are still
    // reported below (that is when they matter most).
    let exited = child.try_wait()?;
    if let Some(status) = exited {
        eprintln!("the hub exited while publishing ({status}): its figures are missing below");
    }
    let after = resident(pid).ok();
    let elapsed = publishing.elapsed().as_secs_f64();
    let cpu = (
        cpu_seconds(&pid.to_string())
            .ok()
            .map(|hub| hub - cpu_before.0),
        cpu_seconds("self")? - cpu_before.1,
    );
    let _ = writeln!(stdin, "stats").and_then(|()| stdin.flush());
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await {
        if line.starts_with("published") {
            println!("{line}");
        }
        if line.starts_with("stats") {
            eprintln!("hub {line}");
            break;
        }
    }
    // Now the clients close their sockets; the hub shuts down once they have (or in 30 s).
    close_tx.send_replace(true);
    let closing = futures_util::future::join_all(clients);
    if tokio::time::timeout(Duration::from_secs(30), closing)
        .await
        .is_err()
    {
        eprintln!("some clients were still closing after 30 s");
    }
    let _ = writeln!(stdin, "quit").and_then(|()| stdin.flush());
    let _ = child.wait();

    let all = &mut summary.latencies;
    all.sort_unstable();
    let expected = held * args.events;
    let missing = expected.saturating_sub(all.len());
    // Over every expected delivery, a missing one counting as never delivered: with more than
    // 1 % missing, p99 reads "never", so lost events cannot flatter the tail.
    let pct = |p: f64| -> String {
        if expected == 0 {
            return "-".to_owned();
        }
        let i = ((expected as f64 * p).ceil() as usize).clamp(1, expected) - 1;
        all.get(i).map_or("never".to_owned(), |&us| {
            format!("{:.1}", f64::from(us) / 1000.0)
        })
    };
    println!("connections held        {held} ({ramp_failed} failed to subscribe)");
    println!(
        "deliveries              {} of {expected} ({:.3} %), each event counted once per client",
        all.len(),
        100.0 * all.len() as f64 / expected.max(1) as f64
    );
    println!("missing                 {missing}");
    println!("duplicates              {}", summary.duplicates);
    let codes: Vec<&str> = summary.error_codes.iter().map(String::as_str).collect();
    println!(
        "error frames            {}{}",
        summary.errors,
        if codes.is_empty() {
            String::new()
        } else {
            format!(" ({})", codes.join(", "))
        }
    );
    println!("malformed event frames  {}", summary.malformed);
    println!("clients failed mid-run  {}", summary.failed_mid_run);
    println!(
        "clients timed out       {} (waiting at the deadline, {} s after publishing began), \
         {unreported} unreported",
        summary.timed_out,
        wait.as_secs()
    );
    println!(
        "latency ms              p50 {}  p99 {}  max {}  (over all {expected} expected \
         deliveries; a missing one counts as never)",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!("other frames            {}", summary.other);
    let hub_cpu = cpu.0.map_or("-".to_owned(), |hub| {
        format!("{:.0}", 100.0 * hub / elapsed)
    });
    println!(
        "CPU while publishing    hub {hub_cpu} %, clients {:.0} % of one core ({elapsed:.1} s)",
        100.0 * cpu.1 / elapsed
    );
    let after_kib = |kib: fn(Resident) -> u64| after.map_or("-".to_owned(), |r| kib(r).to_string());
    println!(
        "hub RSS KiB             baseline {}, idle {}, after publishing {}; of it anonymous \
         (RssAnon) {}, {}, {}",
        baseline.all,
        idle.all,
        after_kib(|r| r.all),
        baseline.anonymous,
        idle.anonymous,
        after_kib(|r| r.anonymous),
    );
    let per_connection = |r: Resident| {
        let per = |now: u64, then: u64| now.saturating_sub(then) as f64 / held.max(1) as f64;
        (
            per(r.anonymous, baseline.anonymous),
            per(r.all, baseline.all),
        )
    };
    let (idle_anonymous, idle_all) = per_connection(idle);
    println!(
        "hub memory / connection {idle_anonymous:.1} KiB idle, {} KiB after publishing (user \
         space: the growth of the hub's anonymous resident memory; of all of it, code pages \
         included, {idle_all:.1} KiB idle)",
        after.map_or("-".to_owned(), |after| format!(
            "{:.1}",
            per_connection(after).0
        ))
    );
    match (kernel_before, kernel_idle) {
        (Some(before), Some(idle)) => println!(
            "kernel memory / pair    {:.1} KiB TCP buffers, {:.1} KiB slab (sockets, their \
             files and epoll entries), per connection with both of its ends (client and hub \
             share this kernel); the hub's share is about half",
            idle.tcp_kib.saturating_sub(before.tcp_kib) as f64 / held.max(1) as f64,
            idle.slab_kib.saturating_sub(before.slab_kib) as f64 / held.max(1) as f64,
        ),
        _ => println!("kernel memory / pair    - (/proc/net/sockstat or /proc/meminfo unreadable)"),
    }
    // A run that lost, duplicated or garbled deliveries, or lost clients or the hub, fails
    // (exit status 1), so a script reading only the status does not take it for a pass.
    let problems: Vec<String> = [
        (ramp_failed, "failed to subscribe"),
        (missing, "deliveries missing"),
        (summary.duplicates, "duplicates"),
        (summary.errors, "error frames"),
        (summary.malformed, "malformed event frames"),
        (summary.failed_mid_run, "clients failed mid-run"),
        (summary.timed_out, "clients timed out"),
        (unreported, "clients unreported"),
        (usize::from(exited.is_some()), "hub exits"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the run was not clean: {} (figures above)",
            problems.join(", ")
        )
        .into())
    }
}

/// Fails when the hub process has exited (the ramp would otherwise wait for it for ever).
fn hub_alive(child: &mut std::process::Child) -> Result<(), BoxError> {
    match child.try_wait()? {
        Some(status) => Err(format!("the hub process exited during the ramp ({status})").into()),
        None => Ok(()),
    }
}

/// The kernel's memory for sockets, machine-wide: what connections cost beyond a process's
/// resident memory.
#[derive(Clone, Copy)]
struct KernelMemory {
    /// TCP buffer memory (`/proc/net/sockstat`, `TCP: ... mem`, in pages).
    tcp_kib: u64,
    /// Kernel slab memory (`/proc/meminfo`, `Slab`): socket structures, files, epoll entries.
    slab_kib: u64,
}

fn kernel_memory() -> Option<KernelMemory> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    let pages: u64 = loop {
        if words.next()? == "mem" {
            break words.next()?.parse().ok()?;
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab = meminfo.lines().find(|l| l.starts_with("Slab:"))?;
    let slab_kib = slab.split_whitespace().nth(1)?.parse().ok()?;
    Some(KernelMemory {
        // 4 KiB pages (x86-64, most arm64 kernels): a 16 or 64 KiB page kernel reads low.
        tcp_kib: pages * 4,
        slab_kib,
    })
}

type Socket = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// How long a client may take to connect and be subscribed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// After the last event arrives, how long a client waits for the ones before it: the hub
/// sends a connection's frames in order, so one still missing then was lost, not late.
const GAP_GRACE: Duration = Duration::from_secs(2);

/// One client: connects, subscribes, then records the latency of each event's first delivery
/// until it has all `events`, or the last and no more within [`GAP_GRACE`], or `stop` is set.
/// Returns its report and, unless it failed, its socket, still open: the caller closes it.
async fn client(
    url: &str,
    events: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    subscribed: &AtomicUsize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Report, Option<Socket>) {
    let mut report = Report::default();
    // Bounded: a hub that stopped accepting (out of file descriptors) would hold the ramp.
    let subscribing = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(url)).await;
    let mut ws = match subscribing {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            report.failure = Some(error.to_string());
            return (report, None);
        }
        Err(_) => {
            report.failure = Some(format!("not subscribed within {SUBSCRIBE_TIMEOUT:?}"));
            return (report, None);
        }
    };
    report.subscribed = true;
    subscribed.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    if let Err(error) = record_events(&mut ws, events, GAP_GRACE, stop, &mut report).await {
        report.failure = Some(error.to_string());
        return (report, None);
    }
    (report, Some(ws))
}

/// Connects and subscribes to `bench`; returns once the hub says `subscribed`.
async fn subscribe(url: &str) -> Result<Socket, BoxError> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
    ws.send(Message::Text(
        r#"{"type":"subscribe","topic":"bench"}"#.into(),
    ))
    .await?;
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: Frame = serde_json::from_str(text.as_str())?;
        return match frame.kind.as_str() {
            "subscribed" => Ok(ws),
            "error" => Err(format!("error frame {}", frame.code.unwrap_or_default()).into()),
            other => Err(format!("expected subscribed, got {other}").into()),
        };
    }
    Err("closed before subscribed".into())
}

/// The number after `key` in a frame.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The next message, or `Err` when `grace` (if any) passes first.
async fn next_message<S>(
    ws: &mut WebSocketStream<S>,
    grace: Option<Duration>,
) -> Result<Option<Result<Message, tokio_tungstenite::tungstenite::Error>>, Elapsed>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match grace {
        Some(grace) => tokio::time::timeout(grace, ws.next()).await,
        None => Ok(ws.next().await),
    }
}

/// Records the events into `report` by their `seq`: the first delivery of each gives a latency,
/// a later one is a duplicate. On an error `report` keeps what arrived before it. Leaves the
/// socket open.
async fn record_events<S>(
    ws: &mut WebSocketStream<S>,
    events: usize,
    gap_grace: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    report: &mut Report,
) -> Result<(), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut seen = vec![false; events];
    report.latencies.reserve_exact(events);
    let stopped = stop.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    while report.latencies.len() < events {
        let grace = seen.last().copied().unwrap_or(false).then_some(gap_grace);
        let message = tokio::select! {
            biased;
            _ = &mut stopped => {
                report.timed_out = true;
                break;
            }
            message = next_message(ws, grace) => message,
        };
        let Ok(message) = message else {
            break; // the last event came, and the missing ones did not within the grace
        };
        let Some(message) = message else {
            return Err("closed".into());
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let received = now_ns();
        let text = text.as_str();
        // Event frames are scanned for their two numbers, not parsed: that keeps the clients'
        // CPU (which shares the machine with the hub) low. The tag comes first.
        if !text.starts_with(r#"{"type":"event""#) {
            match serde_json::from_str::<Frame>(text) {
                Ok(frame) if frame.kind == "error" => {
                    report.errors += 1;
                    if report.first_error.is_none() {
                        report.first_error = Some(frame.code.unwrap_or_default());
                    }
                }
                Ok(_) => report.other += 1,
                Err(_) => report.malformed += 1,
            }
            continue;
        }
        let seq = number_after(text, r#""seq":"#).and_then(|seq| usize::try_from(seq).ok());
        let (Some(seq), Some(sent)) = (seq, number_after(text, r#""sent_ns":"#)) else {
            report.malformed += 1;
            continue;
        };
        match seen.get_mut(seq) {
            None => report.malformed += 1,
            Some(true) => report.duplicates += 1,
            Some(slot) => {
                *slot = true;
                let micros = received.saturating_sub(sent) / 1000;
                report
                    .latencies
                    .push(micros.min(u64::from(u32::MAX)) as u32);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A client's socket and the hub's end of it, over an in-memory pipe.
    async fn pipe() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let hub = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, hub)
    }

    fn event(seq: u64) -> Message {
        let sent = now_ns();
        Message::Text(
            format!(
                r#"{{"type":"event","topic":"bench","event":{{"pad":"xx","sent_ns":{sent},"seq":{seq}}}}}"#
            )
            .into(),
        )
    }

    #[tokio::test]
    async fn duplicates_gaps_and_error_frames_are_counted_not_hidden() {
        let (mut client, mut hub) = pipe().await;
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let frames = [
            event(0),
            event(1),
            event(1),
            Message::Text(r#"{"type":"error","code":"event_too_large","message":"m"}"#.into()),
            event(9),
            Message::Text(r#"{"type":"unsubscribed","topic":"bench"}"#.into()),
            Message::Text(r#"{"type":"event","topic":"bench","event":{}}"#.into()),
            event(3),
        ];
        for frame in frames {
            hub.send(frame).await.unwrap();
        }
        let mut report = Report::default();
        let grace = Duration::from_millis(50);
        record_events(&mut client, 4, grace, stop, &mut report)
            .await
            .unwrap();
        // Four frames carried a `seq`, but only 0, 1 and 3 arrived: 2 is missing.
        assert_eq!(report.latencies.len(), 3);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.malformed, 2);
        assert_eq!(report.errors, 1);
        assert_eq!(report.first_error.as_deref(), Some("event_too_large"));
        assert_eq!(report.other, 1, "an unexpected frame is counted");
        assert!(!report.timed_out);
    }

    #[tokio::test]
    async fn a_client_stopped_or_failing_keeps_what_it_received() {
        let (mut client, mut hub) = pipe().await;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        hub.send(event(0)).await.unwrap();
        let mut report = Report::default();
        let stopping = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop_tx.send_replace(true);
        };
        let (result, ()) = tokio::join!(
            record_events(&mut client, 3, GAP_GRACE, stop, &mut report),
            stopping
        );
        result.unwrap();
        assert!(report.timed_out);
        assert_eq!(report.latencies.len(), 1);

        let (mut client, mut hub) = pipe().await;
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        hub.send(event(0)).await.unwrap();
        drop(hub);
        let mut report = Report::default();
        let result = record_events(&mut client, 3, GAP_GRACE, stop, &mut report).await;
        assert!(result.is_err());
        assert_eq!(report.latencies.len(), 1);
    }
}
