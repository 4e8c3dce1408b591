//! A client that does not finish its request headers in time (a slowloris trickling bytes, or
//! a keep-alive connection left idle) is disconnected, while a prompt one is served.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent before. Fails after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_idle_connections_are_closed() {
    within(async {
        let header_timeout = Duration::from_millis(300);
        let s = TestServer::start_with(|c| c.header_timeout_ms = 300).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();

        // Headers that never finish, then nothing. hyper's header-read timeout ends the
        // connection without a word (it answers parse errors, not a timeout): no 408, no
        // answer at all, and not before the timeout, which starts once the connection is
        // served, so after `connecting`.
        let connecting = tokio::time::Instant::now();
        let mut slow = TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let sent = closed_within(&mut slow, Duration::from_secs(10)).await;
        let closed_after = connecting.elapsed();
        assert_eq!(sent, "", "nothing is sent for headers that never finish");
        assert!(
            closed_after >= header_timeout,
            "closed after {closed_after:?}, before the header timeout of {header_timeout:?}"
        );

        // A served request, then an idle keep-alive connection.
        let mut idle = TcpStream::connect(&addr).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let sent = closed_within(&mut idle, Duration::from_secs(10)).await;
        assert!(
            sent.starts_with("HTTP/1.1 200 OK"),
            "the prompt request is served: {sent}"
        );

        // The server still serves.
        let health = s.send(reqwest::Method::GET, "/health", None, None).await;
        assert_eq!(health.status, reqwest::StatusCode::OK);
        s.stop().await;
    })
    .await;
}

/// A body that stops arriving part-way is the client's doing: 408 `request_timeout`, not the
/// budget's 503 that tells clients to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() {
    within(async {
        let s = TestServer::start_with(|c| c.request_timeout_ms = 2_000).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        let mut stalled = TcpStream::connect(&addr).await.unwrap();
        stalled
            .write_all(
                b"POST /auth/register HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
                  content-length: 100\r\n\r\n{\"email\":",
            )
            .await
            .unwrap();
        let mut answer = vec![0; 4096];
        let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        s.stop().await;
    })
    .await;
}

/// A body that keeps trickling in, each byte well within the wait allowed between two, is the
/// client's doing too: once half the budget has passed it gets 408 `request_timeout`, not the
/// budget's 503 `timeout` with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_gets_408() {
    within(async {
        let s = TestServer::start_with(|c| c.request_timeout_ms = 2_000).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        let stream = TcpStream::connect(&addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        writer
            .write_all(
                b"POST /auth/register HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
                  content-length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        // The client's part of the scenario: a byte every 600 ms, never finishing in time.
        let trickle = tokio::spawn(async move {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                if writer.write_all(b" ").await.is_err() {
                    break;
                }
            }
        });
        let mut answer = vec![0; 4096];
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        trickle.abort();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("retry-after"),
            "{answer}"
        );
        s.stop().await;
    })
    .await;
}

/// A client that sends requests and never reads the answers cannot hold its connection: once
/// the socket's buffers are full, a write that makes no progress for the header timeout ends
/// the connection (hyper waits to write with no timer of its own), counted in
/// `http_connections_stalled_total`. Reading afterwards gets what was sent before, then the
/// end, not every answer.
///
/// A server process of its own, so the counter is this connection's alone: the test waits for
/// it (the server's verdict) before reading, however long a loaded machine takes to fill the
/// buffers, rather than reading after a fixed wait that a slow server may not have used up.
#[test]
fn a_client_that_never_reads_its_answers_is_disconnected() {
    let (_child, _lines, addr) = serving(&["--header-timeout-ms", "300"], &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(within(async {
        // No kept-alive connections: the 300 ms header timeout closes idle ones.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        assert_eq!(
            stalled(&http, addr).await.unwrap(),
            None,
            "nothing stalled yet"
        );

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let mut greedy = socket.connect(addr).await.unwrap();
        const REQUESTS: usize = 2000;
        let request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
        greedy.write_all(&request.repeat(REQUESTS)).await.unwrap();
        // The client's part of the scenario: it reads nothing until the server gave up on it.
        let count = cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "the stalled connection counted",
            || async { stalled(&http, addr).await.ok().flatten() },
        )
        .await;
        assert_eq!(count, "1", "one connection stalled");

        let sent = closed_within(&mut greedy, Duration::from_secs(10)).await;
        let answers = sent.matches("HTTP/1.1 200 OK").count();
        assert!(
            answers < REQUESTS,
            "every answer was written: the stalled connection was kept"
        );
        assert_eq!(
            stalled(&http, addr).await.unwrap().as_deref(),
            Some("1"),
            "counted once, however often the closed connection was polled"
        );
        let health = http
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), reqwest::StatusCode::OK);
    }));
}

/// `http_connections_stalled_total` in the `/metrics` of the server at `addr`, if it has one.
async fn stalled(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
) -> reqwest::Result<Option<String>> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("http_connections_stalled_total "))
        .map(|count| count.trim().to_owned()))
}

/// Past `HELPDESK_MAX_CONNECTIONS` open connections, a new one waits in the backlog (it is
/// not served) until one of them closes: idle clients cannot take every file descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_until_one_closes() {
    within(async {
        let s = TestServer::start_with(|c| c.max_connections = Some(2)).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        // Two idle connections take both slots (the header timeout would close them in 30 s),
        // from two addresses: one address holds at most all but a tenth of the limit.
        let first = connect_from("127.0.0.2", &addr).await;
        let _second = connect_from("127.0.0.3", &addr).await;

        // One closes: the waiting connection is accepted and served.
        served_only_after(&addr, || drop(first), "a slot came free").await;
        s.stop().await;
    })
    .await;
}

/// A WebSocket holds its place under the connection limit for as long as it is open, not
/// only until its upgrade (when hyper's connection task ends and hands the socket on): with a
/// limit of 2, one WebSocket and one idle connection leave a third waiting until the
/// WebSocket closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_holds_its_connection_slot_until_it_closes() {
    within(async {
        let s = TestServer::start_with(|c| c.max_connections = Some(2)).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        // Over connections that close after their answer, so no pooled connection holds a
        // place (one address holds at most all but a tenth of the limit).
        let token = token_from("127.0.0.6", &addr, "ws-slot").await;

        let ws =
            crate::websocket_clients_get_the_ticket_events_they_may_see::connect(&s, &token).await;
        let _idle = connect_from("127.0.0.2", &addr).await;
        served_only_after(&addr, || drop(ws), "the WebSocket closed").await;
        s.stop().await;
    })
    .await;
}

/// A request on a connection of its own (from an address no other connection uses) to a
/// server at its connection limit: not answered within 500 ms, then answered 200 once `free`
/// (which closes a connection) has run.
async fn served_only_after(addr: &str, free: impl FnOnce(), freed: &str) {
    let mut third = connect_from("127.0.0.9", addr).await;
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut answer)).await;
    assert!(waited.is_err(), "served past the limit: {answer:?}");
    free();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("not served once {freed}"))
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

/// A new customer's token (its email made from `name`), registered and logged in from
/// `local` over connections closed after their answer; the login is tried again while that
/// address's closed connections may still be counted.
async fn token_from(local: &str, addr: &str, name: &str) -> String {
    let user = serde_json::json!({ "email": email(name), "password": PASSWORD });
    let registered = once_from(local, addr, "/auth/register", &user).await;
    assert!(registered.starts_with("HTTP/1.1 201"), "{registered}");
    let login = cqrs_core::testing::eventually(Duration::from_secs(10), "a login", || {
        let user = user.clone();
        async move {
            let answer = once_from(local, addr, "/auth/login", &user).await;
            answer.starts_with("HTTP/1.1 200").then_some(answer)
        }
    })
    .await;
    let body = login.split_once("\r\n\r\n").expect("a body").1;
    let token: serde_json::Value = serde_json::from_str(body).expect("JSON");
    token["token"].as_str().expect("a token").to_owned()
}

/// One POST of `body` on a connection of its own from `local` (a loopback address of its
/// own), closed after the answer: the whole answer.
async fn once_from(local: &str, addr: &str, path: &str, body: &serde_json::Value) -> String {
    post_on(connect_from(local, addr).await, path, body).await
}

/// POSTs `body` on `stream`, asking the server to close it after the answer: the whole answer,
/// or what came before the connection ended. A connection the server closed unanswered (past
/// its address's share) may end in a reset, with the request unread: that is an empty answer,
/// which callers wait past, not a failure.
async fn post_on(mut stream: TcpStream, path: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Connects from `local` (a loopback address of its own) to `addr`.
async fn connect_from(local: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Sends a `GET /health` on `stream` (the server may have closed it, unread) and returns what
/// came back before the server closed it (within 10 s): nothing, for a connection closed at
/// once.
async fn asked_for_health(stream: &mut TcpStream) -> String {
    let _ = stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    closed_within(stream, Duration::from_secs(10)).await
}

/// Sends a `GET /health` on `stream` and reads the answer's status line.
async fn health_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(stream, Duration::from_secs(10)).await;
    answer.lines().next().unwrap_or_default().to_owned()
}

/// One client address holds at most its share of connections: past it, a new connection is
/// closed at once, while other addresses are served; a closed one frees a place. A trusted
/// proxy, whose address every client behind it shares, is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.http_connections_per_address = 2;
            c.trusted_proxies = vec!["127.0.0.3".parse().unwrap()];
        })
        .await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        // Two idle connections: the address's share (a header timeout of 30 s holds them).
        let mut held = vec![
            connect_from("127.0.0.2", &addr).await,
            connect_from("127.0.0.2", &addr).await,
        ];
        // Each is served before the next is accepted, so the order is kept: the third is
        // accepted last and closed without a word.
        let mut third = connect_from("127.0.0.2", &addr).await;
        assert_eq!(
            asked_for_health(&mut third).await,
            "",
            "closed at once, unanswered"
        );
        // Another address is served meanwhile, and so is the proxy, past the share.
        let mut other = connect_from("127.0.0.4", &addr).await;
        assert_eq!(health_on(&mut other).await, "HTTP/1.1 200 OK");
        let mut behind_proxy = Vec::new();
        for _ in 0..3 {
            behind_proxy.push(connect_from("127.0.0.3", &addr).await);
        }
        for stream in &mut behind_proxy {
            assert_eq!(health_on(stream).await, "HTTP/1.1 200 OK");
        }
        // One of the two closed: the address gets a place again, once the server saw it go.
        let mut gone = held.pop().unwrap();
        gone.shutdown().await.unwrap();
        drop(gone);
        cqrs_core::testing::eventually(Duration::from_secs(10), "a place again", || async {
            let mut again = connect_from("127.0.0.2", &addr).await;
            (health_on(&mut again).await == "HTTP/1.1 200 OK").then_some(())
        })
        .await;
        drop(held);
        s.stop().await;
    })
    .await;
}

/// Under a low `--max-connections`, one client address holds at most all but a tenth of it,
/// whatever its share setting says (1000 by default, more than the limit): another client, a
/// health probe say, still finds a place, where it waited in the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection_under_a_low_limit() {
    within(async {
        let s = TestServer::start_with(|c| c.max_connections = Some(20)).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        // Eighteen idle connections: all but a tenth of 20.
        let mut held = Vec::new();
        for _ in 0..18 {
            held.push(connect_from("127.0.0.2", &addr).await);
        }
        let mut past = connect_from("127.0.0.2", &addr).await;
        assert_eq!(
            asked_for_health(&mut past).await,
            "",
            "closed at once, unanswered"
        );
        let mut probe = connect_from("127.0.0.4", &addr).await;
        assert_eq!(health_on(&mut probe).await, "HTTP/1.1 200 OK");
        drop(held);
        s.stop().await;
    })
    .await;
}

/// A WebSocket counts against its client address for as long as it is open, not only until
/// its upgrade (when the HTTP connection's own work ends): with a share of one, an open
/// WebSocket leaves its address no room for another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_counts_against_its_address_while_open() {
    within(async {
        let s = TestServer::start_with(|c| c.http_connections_per_address = 1).await;
        let addr = s.url("").trim_start_matches("http://").to_owned();
        // Registered and logged in from another address.
        let token = token_from("127.0.0.6", &addr, "ws-share").await;

        // From 127.0.0.1, the address the WebSocket client connects from.
        let ws =
            crate::websocket_clients_get_the_ticket_events_they_may_see::connect(&s, &token).await;
        let mut another = connect_from("127.0.0.1", &addr).await;
        assert_eq!(
            asked_for_health(&mut another).await,
            "",
            "closed at once while the WebSocket is open"
        );
        drop(ws);
        cqrs_core::testing::eventually(Duration::from_secs(10), "a place again", || async {
            let mut again = connect_from("127.0.0.1", &addr).await;
            (health_on(&mut again).await == "HTTP/1.1 200 OK").then_some(())
        })
        .await;
        s.stop().await;
    })
    .await;
}
