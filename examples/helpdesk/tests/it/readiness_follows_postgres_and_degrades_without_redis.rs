//! In Postgres + Redis mode, `/ready` follows Postgres (503 while it is down) while Redis going
//! away only degrades the server: `/ready` stays 200 with `"status": "degraded"`, commands
//! commit into the outbox, and once Redis is back the relay ships them. Each test runs on a
//! server of its own, which it stops.

use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Skips the test (`return` after this) unless `CQRS_REQUIRE_SERVICES=1`, where a missing
/// dependency fails it instead.
fn skip_unless_required(why: &str) {
    assert!(
        std::env::var("CQRS_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{why}; CQRS_REQUIRE_SERVICES=1 makes that a failure, not a skip (scripts/test.sh \
         installs redis-server)"
    );
    eprintln!("skipping: {why}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throw-away Redis on a free port, killed on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    async fn start() -> Self {
        // A free port may be taken before redis-server binds it (it then exits): another.
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs (it is installed with Redis)");
            // Killed on drop from here on, also when the wait below fails.
            let mut redis = Self { child, port };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if redis.child.try_wait().unwrap().is_some() {
                    break;
                }
                if serves(port, redis.child.id()).await {
                    return redis;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "redis-server did not answer on port {port} within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("redis-server exited five times: are the ports taken?");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Whether the Redis answering on `port` runs as process `pid`: not whatever else took the port.
async fn serves(port: u16, pid: u32) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        tcp.write_all(b"INFO server\r\n").await.ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // A bulk reply: `$<length>\r\n`, then that many bytes and `\r\n`.
        let whole = |answer: &[u8]| -> Option<bool> {
            let text = std::str::from_utf8(answer).ok()?;
            let (length, rest) = text.strip_prefix('$')?.split_once("\r\n")?;
            Some(rest.len() >= length.parse::<usize>().ok()?)
        };
        while whole(&answer) != Some(true) {
            let n = tcp.read(&mut buf).await.ok()?;
            if n == 0 || answer.len() > 64 * 1024 {
                return None;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let wanted = format!("process_id:{pid}\r\n");
        String::from_utf8_lossy(&answer)
            .contains(&wanted)
            .then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Some(()))
    )
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_degraded_not_unavailable_and_nothing_committed_meanwhile_is_lost() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            skip_unless_required("redis-server is not installed");
            return;
        }
        // Behind a switch: the Redis that comes back has a port of its own.
        let redis = OwnRedis::start().await;
        let switch = Switch::start(redis.addr()).await;
        let s = TestServer::start_on(backend, |c| {
            c.redis_url = Some(format!("redis://{}", switch.addr));
        })
        .await;
        let (agent, _) = s.agent().await;
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");

        switch.cut();
        drop(redis);
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "/ready reports degraded",
            || async {
                let r = s.send(Method::GET, "/ready", None, None).await;
                assert_eq!(r.status, StatusCode::OK, "{r:?}");
                (r.body["status"] == "degraded"
                    && r.body["components"]["redis"]["status"] == "unhealthy"
                    && r.body["components"]["postgres"]["status"] == "healthy")
                    .then_some(())
            },
        )
        .await;
        // Commands still commit, into the outbox.
        let ticket = s.ticket(&agent, "while redis is away").await;
        assert_eq!(ticket["version"], 1);

        // Redis comes back (empty: it kept nothing): the relay ships from its checkpoint and the
        // stats count the ticket.
        let redis = OwnRedis::start().await;
        switch.forward(redis.addr());
        cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "the ticket reaches the stats after Redis returns",
            || async {
                let r = s.get("/tickets/stats", &agent).await;
                (r.body == json!({ "open": 1, "assigned": 0, "closed": 0 })).then_some(())
            },
        )
        .await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alone_runs_one_instance_with_in_process_events() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let s = TestServer::start_on(backend, |c| c.redis_url = None).await;
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
        assert_eq!(ready.body["status"], "ready", "{ready:?}");
        assert_eq!(ready.body["components"]["postgres"]["status"], "healthy");
        assert!(ready.body["components"].get("redis").is_none(), "{ready:?}");
        let (agent, _) = s.agent().await;
        s.ticket(&agent, "no redis").await;
        cqrs_core::testing::eventually(Duration::from_secs(15), "the stats count it", || async {
            let r = s.get("/tickets/stats", &agent).await;
            (r.body == json!({ "open": 1, "assigned": 0, "closed": 0 })).then_some(())
        })
        .await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_makes_the_server_unready_until_it_returns() {
    within(async {
        // Postgres goes down behind a switch of this test's own: every connection of this
        // server ends, and new ones are closed at once, until it forwards again.
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, _) = backend.database().expect("a Postgres backend");
        let upstream = host_port(&database_url, 5432).expect("DATABASE_URL names a host");
        let pg = Switch::start(upstream.clone()).await;
        let url = via(&database_url, pg.addr);
        let s = TestServer::start_on(backend, |c| c.database_url = Some(url)).await;
        let (agent, _) = s.agent().await;
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");

        pg.cut();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "/ready is 503 while Postgres is down",
            || async {
                let r = s.send(Method::GET, "/ready", None, None).await;
                (r.status == StatusCode::SERVICE_UNAVAILABLE
                    && r.body["components"]["postgres"]["status"] == "unhealthy")
                    .then_some(())
            },
        )
        .await;
        let refused = s
            .post("/tickets", &agent, json!({ "title": "no database" }))
            .await;
        refused.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");

        pg.forward(upstream);
        cqrs_core::testing::eventually(
            Duration::from_secs(15),
            "/ready is 200 once Postgres is back",
            || async {
                let r = s.send(Method::GET, "/ready", None, None).await;
                (r.status == StatusCode::OK).then_some(())
            },
        )
        .await;
        let ticket = cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "commands succeed again",
            || async {
                let r = s
                    .post("/tickets", &agent, json!({ "title": "database back" }))
                    .await;
                (r.status == StatusCode::CREATED).then_some(r.body)
            },
        )
        .await;
        assert_eq!(ticket["version"], 1);
        s.stop().await;
    })
    .await;
}

/// A pool whose every connection is busy (a load peak) is `degraded`, and `/ready` stays 200,
/// also with a request timeout under 4 s: the Postgres check waits for a connection less
/// than `/ready`'s own budget. (It once waited its fixed 2 s while `/ready` gave it half the
/// request timeout: with 3.5 s the check was cut off at 1.75 s and read as `unhealthy`, a 503
/// that takes every loaded instance out of a load balancer at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pool_is_degraded_not_unavailable_with_a_short_request_timeout() {
    use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
    within_for(Duration::from_secs(150), async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = backend.database().expect("a Postgres backend");
        // The customer registers on an instance with the default budget (a debug build's
        // password hashing alone may take seconds); the instance under test shares its schema.
        let (customer, _) = {
            let other = TestServer::start_on(backend.shared(), |_| {}).await;
            let customer = other.customer().await;
            other.ticket(&customer.0, "listed").await;
            other.stop().await;
            customer
        };
        let s = TestServer::start_on(backend, |c| {
            c.database_max_connections = 10;
            c.request_timeout_ms = 3_500;
            // The workers poll as in production (not every 10 ms as in the other tests), so
            // that the listings below get their connections soon.
            c.poll_ms = 100;
        })
        .await;
        // Healthy once the pool has a connection to spare (a loaded machine may still be
        // opening them).
        cqrs_core::testing::eventually(Duration::from_secs(20), "Postgres is healthy", || async {
            let r = s.send(Method::GET, "/ready", None, None).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            (r.body["components"]["postgres"]["status"] == "healthy").then_some(())
        })
        .await;

        // The ticket list locked, as by a long migration: the eight listings below wait on
        // the lock, each holding one of the pool's ten connections; the two relays hold the
        // other two for their LISTEN. Each listing ends at the request timeout (3.5 s), and
        // is replaced as it ends, so the pool stays full for as long as a loaded machine
        // takes to get there and to ask.
        let mut lock = PgConnection::connect(&database_url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN; LOCK TABLE {schema}.ticket_index IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut lock)
        .await
        .unwrap();
        let (stop_listing, mut stopped) = tokio::sync::watch::channel(false);
        let listings = {
            let (http, url, token) = (s.http.clone(), s.url("/tickets"), customer.clone());
            tokio::spawn(async move {
                let list = || {
                    let request = http.get(url.clone()).bearer_auth(token.clone());
                    async move { request.send().await }
                };
                let mut running: tokio::task::JoinSet<_> = (0..8).map(|_| list()).collect();
                loop {
                    tokio::select! {
                        _ = stopped.changed() => break,
                        Some(_) = running.join_next() => {
                            running.spawn(list());
                        }
                    }
                }
                running.join_all().await;
            })
        };
        cqrs_core::testing::eventually(
            Duration::from_secs(20),
            "eight helpdesk sessions wait for the lock on the ticket list",
            || {
                let (database_url, schema) = (database_url.clone(), schema.clone());
                async move {
                    let mut conn = PgConnection::connect(&database_url).await.ok()?;
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                         AND application_name = 'helpdesk' AND strpos(query, $1) > 0",
                    )
                    .bind(format!("{schema}.ticket_index"))
                    .fetch_one(&mut conn)
                    .await
                    .ok()?;
                    (waiting >= 8).then_some(())
                }
            },
        )
        .await;

        // Asked again while a listing just ended gave a connection back, the pool answers
        // `healthy`; never `unhealthy`, a 503.
        cqrs_core::testing::eventually(
            Duration::from_secs(20),
            "/ready reports the full pool as degraded",
            || async {
                let r = s.send(Method::GET, "/ready", None, None).await;
                assert_eq!(r.status, StatusCode::OK, "{r:?}");
                (r.body["components"]["postgres"]["status"] == "degraded").then_some(())
            },
        )
        .await;

        stop_listing.send(true).unwrap();
        sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
        listings.await.unwrap();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "Postgres is healthy once the pool's connection is free",
            || async {
                let r = s.send(Method::GET, "/ready", None, None).await;
                (r.body["components"]["postgres"]["status"] == "healthy").then_some(())
            },
        )
        .await;
        s.stop().await;
    })
    .await;
}
