//! A TCP proxy on loopback between the adapters and Redis that can turn into a black hole:
//! every connection it holds stays open and forwards nothing, as when a NAT or firewall drops
//! a connection or the host vanishes (no FIN, no RST). Connections opened while it is a black
//! hole are accepted and forward nothing either; once it forwards again, new connections pass
//! through, and the black-holed ones stay dead. It can also lose the reply to one command:
//! the connection that sends it forwards it to Redis, which runs it, and then goes dead. And
//! it can hold Redis's replies back for a while (commands still go through), keep one command
//! from Redis (its connection goes dead before it), and tell what the clients sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) struct Proxy {
    addr: SocketAddr,
    /// The path of the upstream URL (`/db`), kept in the proxy's URL.
    path: String,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// Where new connections go (`host:port`); [`Proxy::redirect`] changes it.
    upstream: Mutex<String>,
    black_hole: AtomicBool,
    /// An argument (as sent: `\r\nWORD\r\n`) of the command whose reply is to be lost, once.
    trap: Mutex<Option<Vec<u8>>>,
    /// An argument of the command that is never to reach Redis, once: its connection goes
    /// dead before it.
    swallow: Mutex<Option<Vec<u8>>>,
    /// An argument of the command whose connection is to be closed once Redis answers it,
    /// the answer not passed on, once.
    cut: Mutex<Option<Vec<u8>>>,
    /// Replies are held back (not forwarded to the clients) while set.
    hold: AtomicBool,
    released: tokio::sync::Notify,
    /// Everything the clients sent through the proxy.
    sent: Mutex<Vec<u8>>,
    /// Everything the clients sent into dead connections (lost on the way).
    lost: Mutex<Vec<u8>>,
    /// Connections through to Redis that neither side has closed.
    open: AtomicUsize,
    /// Per connection accepted: whether it is dead (forwards nothing, for good).
    connections: Mutex<Vec<Arc<AtomicBool>>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`, optionally followed by `/db`).
    pub(crate) async fn start(upstream: &str) -> Proxy {
        let (host, path) = match upstream.find('/') {
            Some(i) => (upstream[..i].to_owned(), upstream[i..].to_owned()),
            None => (upstream.to_owned(), String::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            upstream: Mutex::new(host),
            ..State::default()
        });
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let dead = Arc::new(AtomicBool::new(state.black_hole.load(Ordering::SeqCst)));
                    state.connections.lock().unwrap().push(dead.clone());
                    let host = state.upstream.lock().unwrap().clone();
                    let shared = state.clone();
                    let pump = tokio::spawn(async move {
                        let (client_read, client_write) = client.into_split();
                        if dead.load(Ordering::SeqCst) {
                            // Never reaches Redis; the client's socket stays open.
                            let _open = client_write;
                            pump(client_read, None, dead, None).await;
                            return;
                        }
                        let Ok(server) = TcpStream::connect(&host).await else {
                            return;
                        };
                        let (server_read, server_write) = server.into_split();
                        let cut = AtomicBool::new(false);
                        shared.open.fetch_add(1, Ordering::SeqCst);
                        tokio::join!(
                            pump(
                                client_read,
                                Some(server_write),
                                dead.clone(),
                                Some((&*shared, &cut))
                            ),
                            pump_replies(server_read, client_write, dead, &shared, &cut),
                        );
                        shared.open.fetch_sub(1, Ordering::SeqCst);
                    });
                    state.pumps.lock().unwrap().push(pump);
                }
            })
        };
        Proxy {
            addr,
            path,
            state,
            accept,
        }
    }

    /// The proxy's `host:port`, for another proxy's [`redirect`](Self::redirect).
    pub(crate) fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `redis://` URL of the proxy, with the credentials of `REDIS_URL`.
    pub(crate) fn url(&self) -> String {
        let userinfo = crate::support::redis_userinfo();
        format!("redis://{userinfo}{}{}", self.addr, self.path)
    }

    /// Every connection held goes dead, and so do those opened until [`forward`](Self::forward).
    pub(crate) fn black_hole(&self) {
        self.state.black_hole.store(true, Ordering::SeqCst);
        for dead in self.state.connections.lock().unwrap().iter() {
            dead.store(true, Ordering::SeqCst);
        }
    }

    /// The next command with the argument `word` (as fred sends it: `BLOCK` for a blocking
    /// read) sent through the proxy reaches Redis, and its connection then goes dead at once:
    /// the reply, and all else in either direction, is lost, and nothing closes. Other
    /// connections go on.
    pub(crate) fn lose_reply_to(&self, word: &str) {
        *self.state.trap.lock().unwrap() = Some(format!("\r\n{word}\r\n").into_bytes());
    }

    /// The next command with the argument `word` sent through the proxy never reaches Redis:
    /// its connection goes dead before it (nothing in either direction, nothing closes), as
    /// when a NAT drops it. Other connections go on.
    pub(crate) fn swallow(&self, word: &str) {
        *self.state.swallow.lock().unwrap() = Some(format!("\r\n{word}\r\n").into_bytes());
    }

    /// Whether the command [`swallow`](Self::swallow) waits for was sent.
    pub(crate) fn swallowed(&self) -> bool {
        self.state.swallow.lock().unwrap().is_none()
    }

    /// The next command with the argument `word` sent through the proxy reaches Redis, which
    /// runs it; once Redis answers, the proxy closes that connection (the client reads its
    /// end) instead of passing the answer on: the command ran, and its client, which sees the
    /// connection close, cannot know. Other connections go on.
    pub(crate) fn close_after_reply_to(&self, word: &str) {
        *self.state.cut.lock().unwrap() = Some(format!("\r\n{word}\r\n").into_bytes());
    }

    /// Whether the command [`close_after_reply_to`](Self::close_after_reply_to) waits for went
    /// through.
    pub(crate) fn cut_sprung(&self) -> bool {
        self.state.cut.lock().unwrap().is_none()
    }

    /// Whether the command [`lose_reply_to`](Self::lose_reply_to) waits for went through.
    pub(crate) fn reply_lost(&self) -> bool {
        self.state.trap.lock().unwrap().is_none()
    }

    /// How many connections through to Redis are open: neither the client nor Redis closed
    /// them.
    pub(crate) fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// How many connections the proxy accepted.
    pub(crate) fn accepted(&self) -> usize {
        self.state.connections.lock().unwrap().len()
    }

    /// Redis's replies wait in the proxy until [`release_replies`](Self::release_replies).
    pub(crate) fn hold_replies(&self) {
        self.state.hold.store(true, Ordering::SeqCst);
    }

    /// Forwards the replies held back, and those after them.
    pub(crate) fn release_replies(&self) {
        self.state.hold.store(false, Ordering::SeqCst);
        self.state.released.notify_waiters();
    }

    /// Everything the clients sent through the proxy so far.
    pub(crate) fn sent(&self) -> Vec<u8> {
        self.state.sent.lock().unwrap().clone()
    }

    /// How many commands with the argument `word` the clients sent into dead connections.
    pub(crate) fn lost(&self, word: &str) -> usize {
        let needle = format!("\r\n{word}\r\n").into_bytes();
        let lost = self.state.lost.lock().unwrap();
        lost.windows(needle.len())
            .filter(|w| *w == &needle[..])
            .count()
    }

    /// New connections go to `upstream` (`host:port`) from now on; those held stay where they
    /// are, as when a failover moves a DNS name to another server.
    pub(crate) fn redirect(&self, upstream: &str) {
        *self.state.upstream.lock().unwrap() = upstream.to_owned();
    }

    /// New connections pass through again; the dead ones stay dead.
    pub(crate) fn forward(&self) {
        self.state.black_hole.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for pump in self.state.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }
}

/// Copies `from` to `to` until either side closes; once `dead`, reads and discards (the
/// sender never blocks, nothing arrives), keeping both sockets open. `trap` (client to server
/// only): a chunk with the armed command is the last one forwarded. (`readable` and
/// `try_read` rather than `AsyncReadExt`: the tests build tokio without `io-util`.)
async fn pump(
    from: OwnedReadHalf,
    mut to: Option<OwnedWriteHalf>,
    dead: Arc<AtomicBool>,
    trap: Option<(&State, &AtomicBool)>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    'copy: while let Some(n) = read_some(&from, &mut buffer).await {
        if dead.load(Ordering::SeqCst) {
            if let Some((state, _)) = trap {
                state.lost.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
            continue;
        }
        if let Some((state, cut)) = trap {
            state.sent.lock().unwrap().extend_from_slice(&buffer[..n]);
            let mut cut_armed = state.cut.lock().unwrap();
            if cut_armed
                .as_ref()
                .is_some_and(|needle| buffer[..n].windows(needle.len()).any(|w| w == &needle[..]))
            {
                *cut_armed = None;
                cut.store(true, Ordering::SeqCst);
            }
            drop(cut_armed);
            let mut swallow = state.swallow.lock().unwrap();
            if swallow
                .as_ref()
                .is_some_and(|needle| buffer[..n].windows(needle.len()).any(|w| w == &needle[..]))
            {
                *swallow = None;
                dead.store(true, Ordering::SeqCst);
                continue;
            }
            drop(swallow);
            let mut armed = state.trap.lock().unwrap();
            let sprung = armed
                .as_ref()
                .is_some_and(|needle| buffer[..n].windows(needle.len()).any(|w| w == &needle[..]));
            if sprung {
                *armed = None;
                // Before the command goes out: its reply must find the connection dead.
                dead.store(true, Ordering::SeqCst);
            }
        }
        let Some(to) = to.as_mut() else { continue };
        if !write_all(to, &buffer[..n]).await {
            break 'copy;
        }
    }
    if dead.load(Ordering::SeqCst) {
        // Closed by the peer after the connection died: the other side hears nothing of it.
        std::future::pending::<()>().await;
    }
}

/// [`pump`] from Redis to a client, holding the replies back while the proxy holds them.
async fn pump_replies(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    dead: Arc<AtomicBool>,
    state: &State,
    cut: &AtomicBool,
) {
    let (held, mut to_held) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let forward = async move {
        while let Some(chunk) = to_held.recv().await {
            loop {
                let released = state.released.notified();
                if !state.hold.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
            if !write_all(&to, &chunk).await {
                return;
            }
        }
    };
    let read = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Some(n) = read_some(&from, &mut buffer).await {
            if dead.load(Ordering::SeqCst) {
                continue;
            }
            if cut.load(Ordering::SeqCst) {
                // The answer to the command cut after: not passed on. Dropping the sender ends
                // the forwarding, whose end of the client's socket closes.
                break;
            }
            if held.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
        drop(held);
        if dead.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    };
    tokio::join!(read, forward);
}

/// Writes all of `bytes`; false once the socket fails.
async fn write_all(to: &OwnedWriteHalf, bytes: &[u8]) -> bool {
    let mut written = 0;
    while written < bytes.len() {
        if to.writable().await.is_err() {
            return false;
        }
        match to.try_write(&bytes[written..]) {
            Ok(k) => written += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads what has arrived into `buffer`: how many bytes, or `None` once the peer closed or the
/// socket failed.
async fn read_some(from: &OwnedReadHalf, buffer: &mut [u8]) -> Option<usize> {
    loop {
        from.readable().await.ok()?;
        match from.try_read(buffer) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

/// A proxy in front of the test server, and a world `name` whose transport connects through
/// it: commands time out after 2 s (not short: a step through the proxy on a loaded machine
/// must not time out; a lost reply times out after its block and this), reconnects are quick.
/// `None` (skip) without a plain server to put the proxy in front of.
pub(crate) async fn env_behind_a_proxy(name: &str) -> Option<(Proxy, crate::support::Env)> {
    let host = crate::support::plain_redis_host()?;
    let proxy = Proxy::start(&host).await;
    let env = crate::support::Env::with(name, |o| {
        o.connection(
            cqrs_redis::ConnectionOptions::new(proxy.url())
                .command_timeout(std::time::Duration::from_secs(2))
                .reconnect_delays(
                    std::time::Duration::from_millis(20),
                    std::time::Duration::from_millis(200),
                ),
        )
    })
    .await?;
    Some((proxy, env))
}

/// A consumer of a new topic of `env` (group `g`, `max_deliveries(1)`, blocking reads of up to
/// `block`, redelivery delay `delay`) whose blocking read, with the proxy armed by `arm` for
/// that read (the commands with `BLOCK`), Redis served the event `n = 1` published while it
/// waited: the topic, the consumer and what that fetch returned. A read that ended before the
/// publish reached it (a machine stalled for a claim interval) is tried again on a new topic,
/// at most five times; `went_through` tells whether the armed command passed the proxy.
pub(crate) async fn a_served_blocking_read(
    env: &crate::support::Env,
    proxy: &Proxy,
    block: std::time::Duration,
    delay: std::time::Duration,
    arm: impl Fn(&Proxy),
    went_through: impl Fn(&Proxy) -> bool,
) -> (
    String,
    cqrs_redis::RedisConsumer,
    Result<Vec<cqrs_core::ports::Delivery>, cqrs_core::ports::TransportError>,
) {
    use cqrs_core::ports::{Consumer, EventTransport};
    let events = [crate::support::event(Some("k"), 1)];
    for attempt in 1..=5 {
        let topic = env.topic(&format!("events-{attempt}"));
        let mut consumer = env
            .transport
            .redis_consumer(
                &topic,
                "g",
                crate::support::consumer_options(&format!("{}-c{attempt}", env.id))
                    .max_deliveries(1)
                    .block(block)
                    .redelivery_delay(delay),
            )
            .await
            .unwrap();
        let ids = consumer.client_ids().await.unwrap();
        arm(proxy);
        let (read, ()) = tokio::join!(consumer.fetch(10), async {
            crate::support::blocked_connections(&env.admin, &ids).await;
            env.transport.publish(&topic, &events).await.unwrap();
        });
        let stream = env.transport.stream_key(&topic).unwrap();
        let pending = crate::support::raw(
            &env.admin,
            "XPENDING",
            vec![stream.as_str().into(), "g".into()],
        )
        .await;
        // Redis served the armed read.
        if went_through(proxy)
            && pending
                .into_array()
                .first()
                .and_then(fred::types::Value::as_u64)
                == Some(1)
        {
            return (topic, consumer, read);
        }
    }
    panic!("in 5 tries, no blocking read waited until the publish reached it");
}
