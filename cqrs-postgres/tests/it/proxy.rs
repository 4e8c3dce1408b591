//! A TCP proxy in front of Postgres that counts round trips: every `Sync` (the end of an
//! extended-protocol exchange) and every simple `Query` the client sends is one. It can also
//! hold back what clients send for a while: a slow network, on cue; and cut a connection
//! once the server answered a `COMMIT` (or an extended-protocol statement), before the
//! client hears it; and leave the connections open now silent for good, as a server that froze
//! or a network that drops packets would, while new connections work; or only the connection
//! that next sends a `LISTEN`. A connection over TLS is passed on unread: stalled and
//! silenced, but neither counted nor cut.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Until when client messages are held back, on every connection.
type Stall = Arc<Mutex<Option<Instant>>>;

pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    round_trips: Arc<AtomicUsize>,
    stall: Stall,
    cut: Arc<AtomicU8>,
    /// Connections numbered below this pass nothing on any more, either way.
    silenced: Arc<AtomicUsize>,
    /// How many connections were accepted: the next one's number.
    accepted: Arc<AtomicUsize>,
    listen: SwallowListen,
}

/// Whether the next `LISTEN` is swallowed, and how many were.
#[derive(Clone, Default)]
struct SwallowListen {
    armed: Arc<AtomicBool>,
    swallowed: Arc<AtomicUsize>,
}

impl Proxy {
    /// Forwards connections on a free local port to `upstream`.
    pub(crate) async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let round_trips = Arc::new(AtomicUsize::new(0));
        let counter = round_trips.clone();
        let stall = Stall::default();
        let stalled = stall.clone();
        let cut_armed = Arc::new(AtomicU8::new(CUT_NONE));
        let cut = cut_armed.clone();
        let (silenced, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (silence, count) = (silenced.clone(), accepted.clone());
        let listen = SwallowListen::default();
        let swallow = listen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let cues = Cues {
                    counter: counter.clone(),
                    stall: stalled.clone(),
                    cut: cut.clone(),
                    silenced: Silenced {
                        number,
                        below: silence.clone(),
                    },
                    listen: swallow.clone(),
                };
                tokio::spawn(pipe(client, server, cues));
            }
        });
        Proxy {
            addr,
            round_trips,
            stall,
            cut: cut_armed,
            silenced,
            accepted,
            listen,
        }
    }

    /// The next `LISTEN` a client sends never reaches the server, nor anything that client
    /// sends after it, and the connection is left open: a statement whose answer never comes,
    /// on one connection, as when a pooled connection's peer is gone without a word.
    pub(crate) fn swallow_next_listen(&self) {
        self.listen.armed.store(true, Ordering::SeqCst);
    }

    /// How many `LISTEN`s were swallowed so far.
    pub(crate) fn listens_swallowed(&self) -> usize {
        self.listen.swallowed.load(Ordering::SeqCst)
    }

    /// Every connection open now passes nothing on from here on, in either direction, and is
    /// never closed: its peers wait for an answer that never comes, as behind a server that
    /// froze or a network that drops packets. Connections opened later work.
    pub(crate) fn silence_open_connections(&self) {
        self.silenced
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// A proxy in front of the test database (`DATABASE_URL`), and a pool made by `options`
    /// that connects through it.
    pub(crate) async fn in_front_of_the_database(
        options: sqlx::postgres::PgPoolOptions,
    ) -> (Proxy, sqlx::PgPool) {
        use std::str::FromStr;
        let direct = sqlx::postgres::PgConnectOptions::from_str(&crate::support::database_url())
            .expect("DATABASE_URL parses");
        let proxy = Proxy::start(format!("{}:{}", direct.get_host(), direct.get_port())).await;
        let pool = options
            .connect_with(
                direct
                    .host("127.0.0.1")
                    .port(proxy.addr.port())
                    .ssl_mode(sqlx::postgres::PgSslMode::Disable),
            )
            .await
            .expect("connect through the proxy");
        (proxy, pool)
    }

    /// Holds back every message clients send from now on for `duration` after now, then
    /// forwards them in order: the server sees nothing before then.
    pub(crate) fn stall_for(&self, duration: Duration) {
        *self.stall.lock().unwrap() = Some(Instant::now() + duration);
    }

    /// The next `COMMIT` a client sends (as a simple query, as sqlx sends it) reaches the
    /// server, which commits; once its answer comes back, the proxy closes that connection
    /// on both sides instead of passing the answer on.
    pub(crate) fn cut_after_next_commit(&self) {
        self.cut.store(CUT_COMMIT, Ordering::SeqCst);
    }

    /// Like [`cut_after_next_commit`](Self::cut_after_next_commit), for the next
    /// extended-protocol exchange (its `Sync`): a prepared statement that is its own
    /// transaction. Warm the statement up first, or its `Parse` round trip is the one cut.
    pub(crate) fn cut_after_next_statement(&self) {
        self.cut.store(CUT_SYNC, Ordering::SeqCst);
    }

    pub(crate) fn round_trips(&self) -> usize {
        self.round_trips.load(Ordering::SeqCst)
    }

    /// Waits until no message has arrived for 50 ms (the pool pings a connection it gets
    /// back, after the command returned), so the next count starts clean.
    pub(crate) async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let before = self.round_trips();
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.round_trips() == before {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection never went quiet"
            );
        }
    }

    /// Like [`settle`](Self::settle), once every connection of `pool` but the `held` ones
    /// (kept out on purpose, a listener's) is back in it. sqlx pings a connection it gets
    /// back on a task of its own, with no deadline: on a loaded machine that ping can come
    /// after 50 ms of quiet, and be counted (or cut) with what comes next. A connection is
    /// idle only once its ping was answered.
    pub(crate) async fn settle_with(&self, pool: &sqlx::PgPool, held: usize) {
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the pool's connections are back and idle",
            || async { (pool.num_idle() + held == pool.size() as usize).then_some(()) },
        )
        .await;
        self.settle().await;
    }
}

/// No cut armed; the next `COMMIT`; the next `Sync`.
const CUT_NONE: u8 = 0;
const CUT_COMMIT: u8 = 1;
const CUT_SYNC: u8 = 2;

/// What a connection's pipe counts and obeys.
struct Cues {
    counter: Arc<AtomicUsize>,
    stall: Stall,
    cut: Arc<AtomicU8>,
    silenced: Silenced,
    listen: SwallowListen,
}

/// A connection's number, and the number below which connections are silenced.
struct Silenced {
    number: usize,
    below: Arc<AtomicUsize>,
}

impl Silenced {
    /// Never returns once this connection is silenced.
    async fn hold(&self) {
        if self.number < self.below.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

async fn pipe(mut client: TcpStream, mut server: TcpStream, cues: Cues) {
    let Cues {
        counter,
        stall,
        cut: cut_armed,
        silenced,
        listen,
    } = cues;
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    // Set once the message a cut was armed for went to the server on this connection.
    let cut_sent = AtomicBool::new(false);
    let cut = tokio::sync::Notify::new();
    let upstream = async {
        // Untyped messages (an SSL request, the startup message) until the startup is sent,
        // then `type byte, i32 length including itself, body`.
        let mut started = false;
        // Over TLS (a handshake record where the startup message would be), what the client
        // sends is passed on as it comes, unread: stalled and silenced, not counted or cut.
        let mut encrypted = false;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = client_rx.read(&mut chunk).await?;
            if n == 0 {
                silenced.hold().await;
                return server_tx.shutdown().await;
            }
            buffer.extend_from_slice(&chunk[..n]);
            loop {
                // 0x16: a TLS handshake record, after the server accepted the SSL request.
                encrypted |= !started && buffer.first() == Some(&0x16);
                if encrypted {
                    let bytes: Vec<u8> = std::mem::take(&mut buffer);
                    let until = *stall.lock().unwrap();
                    if let Some(until) = until {
                        tokio::time::sleep_until(until).await;
                    }
                    silenced.hold().await;
                    server_tx.write_all(&bytes).await?;
                    break;
                }
                let header = if started { 5 } else { 4 };
                if buffer.len() < header {
                    break;
                }
                let len_at = if started { 1 } else { 0 };
                let len = i32::from_be_bytes([
                    buffer[len_at],
                    buffer[len_at + 1],
                    buffer[len_at + 2],
                    buffer[len_at + 3],
                ]) as usize;
                let total = len + len_at;
                if buffer.len() < total {
                    break;
                }
                if started {
                    if matches!(buffer[0], b'S' | b'Q') {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    // 80877103 is the SSL request; anything else is the startup message.
                    let code = i32::from_be_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]);
                    started = code != 80_877_103;
                }
                let message: Vec<u8> = buffer.drain(..total).collect();
                let until = *stall.lock().unwrap();
                if let Some(until) = until {
                    tokio::time::sleep_until(until).await;
                }
                let armed_for = if !started {
                    CUT_NONE
                } else if message[0] == b'Q' && message[5..].starts_with(b"COMMIT") {
                    CUT_COMMIT
                } else if message[0] == b'S' {
                    CUT_SYNC
                } else {
                    CUT_NONE
                };
                if armed_for != CUT_NONE
                    && cut_armed
                        .compare_exchange(armed_for, CUT_NONE, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    cut_sent.store(true, Ordering::SeqCst);
                }
                if started
                    && message[0] == b'Q'
                    && message[5..].starts_with(b"LISTEN")
                    && listen
                        .armed
                        .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    listen.swallowed.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                silenced.hold().await;
                server_tx.write_all(&message).await?;
            }
        }
    };
    let downstream = async {
        let mut chunk = [0u8; 8192];
        loop {
            let n = server_rx.read(&mut chunk).await?;
            if n == 0 {
                // The server ended the session: the client reads the end of its connection.
                silenced.hold().await;
                return client_tx.shutdown().await;
            }
            // The server answered the `COMMIT` (it answers once it committed): the client
            // never hears it.
            if cut_sent.load(Ordering::SeqCst) {
                cut.notify_one();
                return Ok(());
            }
            silenced.hold().await;
            client_tx.write_all(&chunk[..n]).await?;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(upstream, downstream) } => {}
        // Both sockets are dropped: the client reads the end of its connection.
        () = cut.notified() => {}
    }
}
