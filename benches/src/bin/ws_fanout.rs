//! WebSocket fan-out load harness for `cqrs-realtime`.
//!
//! Opens N WebSocket clients to one hub on loopback, all subscribed to one topic, publishes
//! events at a fixed rate, and reports the delivery latency (publish call to receipt: p50, p99,
//! max) and the hub's memory per connection.
//!
//! The hub runs in a child process (this binary with `--serve`), so its resident memory is
//! measured apart from the clients'. Both raise their open-file limit to the hard limit.
//!
//! ```text
//! cargo run --release -p cqrs-benches --bin ws_fanout -- --connections 10000 --events 300 --rate 10
//! ```
//!
//! Options (defaults): `--connections 10000`, `--events 300`, `--rate 10` (events per second),
//! `--payload 200` (filler bytes per event), `--ramp 200` (handshakes in flight at once),
//! `--pin` (hub on CPU 0, clients on CPU 1, with `taskset`), `--threads 2` (the clients'
//! tokio worker threads), `--hub-threads 2` (the hub's).

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
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    connections: usize,
    events: usize,
    rate: u64,
    payload: usize,
    ramp: usize,
    pin: bool,
    serve: bool,
    threads: usize,
    hub_threads: usize,
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
        threads: 2,
        hub_threads: 2,
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
            "--threads" => args.threads = value()?.parse()?,
            "--hub-threads" => args.hub_threads = value()?.parse()?,
            "--pin" => args.pin = true,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(args)
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    if args.serve {
        runtime.block_on(serve(args.payload))
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
async fn serve(payload: usize) -> Result<(), BoxError> {
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
    .options(HubOptions::new().max_connections(50_000))
    .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Small frames written one at a time: without TCP_NODELAY, Nagle's algorithm can hold one
    // back until the previous is acknowledged.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().route("/ws", hub.route());
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("listening {addr}");
    std::io::stdout().flush()?;

    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let publisher = hub.publisher();
    let pad = "x".repeat(payload);
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
                    let record = EventRecord::new(
                        Metadata::new().message_id,
                        "BenchEvent",
                        1,
                        serde_json::json!({ "seq": seq, "sent_ns": due, "pad": pad }),
                        RecordMetadata::from_metadata(&Metadata::new()),
                    );
                    publisher.publish(&record).await?;
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
            ["stats"] => println!("stats {:?}", hub.stats()),
            ["quit"] => break,
            _ => eprintln!("unknown command {command:?}"),
        }
        std::io::stdout().flush()?;
    }
    hub.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub.closed()).await;
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

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
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
        .args(["--threads", &args.hub_threads.to_string()])
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
    let baseline = rss_kib(pid)?;

    // Ramp up: every client connects, subscribes, and waits for `subscribed`.
    let url = format!("ws://{addr}/ws?token=bench");
    let subscribed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.ramp));
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Vec<u32>>();
    let started = Instant::now();
    let mut last_progress = started;
    for _ in 0..args.connections {
        let permit = gate.clone().acquire_owned().await?;
        let (url, counter, failed, done_tx) = (
            url.clone(),
            subscribed.clone(),
            failed.clone(),
            done_tx.clone(),
        );
        let events = args.events;
        tokio::spawn(async move {
            let latencies = client(&url, events, permit, &counter).await;
            match latencies {
                Ok(latencies) => {
                    let _ = done_tx.send(latencies);
                }
                Err(error) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("\nclient failed: {error}");
                    }
                    let _ = done_tx.send(Vec::new());
                }
            }
        });
        if last_progress.elapsed() > Duration::from_millis(250) {
            last_progress = Instant::now();
            eprint!(
                "\rsubscribed {}/{}",
                subscribed.load(Ordering::Relaxed),
                args.connections
            );
        }
    }
    while subscribed.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.connections {
        eprint!(
            "\rsubscribed {}/{}",
            subscribed.load(Ordering::Relaxed),
            args.connections
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ramp = started.elapsed();
    let held = subscribed.load(Ordering::Relaxed);
    eprintln!(
        "\rsubscribed {held}/{} in {:.1} s ({} failed)",
        args.connections,
        ramp.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid)?;

    // Publish at the rate, and wait for every client's report.
    eprintln!(
        "publishing {} events at {}/s to {held} subscribers",
        args.events, args.rate
    );
    let cpu_before = (cpu_seconds(&pid.to_string())?, cpu_seconds("self")?);
    let publishing = Instant::now();
    writeln!(stdin, "publish {} {}", args.events, args.rate)?;
    stdin.flush()?;
    let mut all = Vec::with_capacity(held * args.events);
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(args.events as u64 / args.rate.max(1) + 60);
    let mut reports = 0;
    while reports < args.connections {
        match tokio::time::timeout_at(deadline, done.recv()).await {
            Ok(Some(latencies)) => {
                all.extend(latencies);
                reports += 1;
            }
            _ => break,
        }
    }
    let after = rss_kib(pid)?;
    let elapsed = publishing.elapsed().as_secs_f64();
    let cpu = (
        cpu_seconds(&pid.to_string())? - cpu_before.0,
        cpu_seconds("self")? - cpu_before.1,
    );
    writeln!(stdin, "stats")?;
    stdin.flush()?;
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await {
        if line.starts_with("published") {
            println!("{line}");
        }
        if line.starts_with("stats") {
            eprintln!("hub {line}");
            break;
        }
    }
    writeln!(stdin, "quit")?;
    stdin.flush()?;
    let _ = child.wait();

    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        f64::from(all[i]) / 1000.0
    };
    let expected = held * args.events;
    println!("connections held        {held}");
    println!(
        "deliveries              {} of {expected} ({:.3} %)",
        all.len(),
        100.0 * all.len() as f64 / expected.max(1) as f64
    );
    println!(
        "latency ms              p50 {:.1}  p99 {:.1}  max {:.1}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "CPU while publishing    hub {:.0} %, clients {:.0} % of one core ({elapsed:.1} s)",
        100.0 * cpu.0 / elapsed,
        100.0 * cpu.1 / elapsed
    );
    println!("hub RSS KiB             baseline {baseline}, idle {idle}, after publishing {after}");
    println!(
        "hub memory / connection {:.1} KiB idle, {:.1} KiB after publishing",
        (idle.saturating_sub(baseline)) as f64 / held.max(1) as f64,
        (after.saturating_sub(baseline)) as f64 / held.max(1) as f64
    );
    Ok(())
}

/// One client: connects, subscribes, then records the latency of each event (µs) until it
/// has `events` of them.
async fn client(
    url: &str,
    events: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    subscribed: &AtomicUsize,
) -> Result<Vec<u32>, BoxError> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
    ws.send(Message::Text(
        r#"{"type":"subscribe","topic":"bench"}"#.into(),
    ))
    .await?;
    let mut latencies = Vec::new();
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: Frame = serde_json::from_str(text.as_str())?;
        match frame.kind.as_str() {
            "subscribed" => {
                subscribed.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                latencies.reserve_exact(events);
                // `permit` moved; the rest of the loop records events.
                return record_events(ws, events, latencies).await;
            }
            other => return Err(format!("expected subscribed, got {other}").into()),
        }
    }
    Err("closed before subscribed".into())
}

/// The `sent_ns` number in an event frame.
fn sent_ns(text: &str) -> Option<u64> {
    let start = text.find("\"sent_ns\":")? + "\"sent_ns\":".len();
    let digits: &str = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

async fn record_events<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    events: usize,
    mut latencies: Vec<u32>,
) -> Result<Vec<u32>, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while latencies.len() < events {
        let Some(message) = ws.next().await else {
            return Err("closed".into());
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let received = now_ns();
        // Only the timestamp is needed: a scan keeps the clients' CPU (which shares the
        // machine with the hub) low. Non-event frames have no `sent_ns`.
        if let Some(sent) = sent_ns(text.as_str()) {
            let micros = received.saturating_sub(sent) / 1000;
            latencies.push(micros.min(u64::from(u32::MAX)) as u32);
        }
    }
    let _ = ws.close(None).await;
    Ok(latencies)
}
