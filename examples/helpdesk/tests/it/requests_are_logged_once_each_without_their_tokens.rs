//! With the server's own log set-up and default filter, each answered request is one `info`
//! line naming its method, path and status, and a `?token=` never reaches the log. Probes and
//! scrapes (`/health`, `/ready`, `/metrics`) are logged at `debug`, below the default filter.

use crate::support::*;
use helpdesk::{DEFAULT_FILTER, LogFormat, log_subscriber};
use reqwest::{Method, StatusCode};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tracing_subscriber::EnvFilter;

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The test binary's global subscriber, installed once, writing to memory. Global, not a
/// thread's default: `tracing` caches whether a callsite is wanted process-wide, so with a
/// thread-local subscriber and other tests logging at the same moment, this test's lines were
/// sometimes never made (none, or without their span's fields).
fn captured() -> &'static Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = log_subscriber(
            LogFormat::Text,
            EnvFilter::new(DEFAULT_FILTER),
            false,
            move || writer.clone(),
        );
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test installs a global subscriber");
        captured
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_logged_once_each_without_their_tokens() {
    let captured = captured();
    // Paths no other test requests, so this test's lines can be told from theirs.
    let probe = uuid::Uuid::now_v7().simple().to_string();
    within(async {
        let s = TestServer::start().await;
        let refused = s
            .send(
                Method::GET,
                &format!("/ws?token=s3cret-value&probe={probe}"),
                None,
                None,
            )
            .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let missing = s
            .send(Method::GET, &format!("/tickets/nope-{probe}"), None, None)
            .await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        // A client's method and URI are cut to what a log line should hold.
        let long_path = s
            .send(
                Method::GET,
                &format!("/long-{probe}/{}", "x".repeat(5000)),
                None,
                None,
            )
            .await;
        assert_eq!(long_path.status, StatusCode::NOT_FOUND);
        let long_method = Method::from_bytes(&[b'M'; 300]).unwrap();
        let odd = s
            .send(long_method, &format!("/method-{probe}"), None, None)
            .await;
        assert!(odd.status.is_client_error(), "{}", odd.status);
        // The client's request id is in the line; one made for a request without it, too.
        let traced = s
            .http
            .get(s.url(&format!("/traced-{probe}")))
            .header("x-request-id", format!("trace-{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(traced.status(), StatusCode::NOT_FOUND);
        // Probes and scrapes, which come every few seconds: their lines are at `debug`.
        for quiet in ["/health", "/ready", "/metrics"] {
            let probed = s
                .send(Method::GET, &format!("{quiet}?probe={probe}"), None, None)
                .await;
            assert!(probed.status.is_success(), "{quiet}: {}", probed.status);
        }
        s.stop().await;
    })
    .await;

    // Every test's log lines, from the moment this test installed the subscriber.
    let log = captured.text();
    assert!(
        !log.contains("s3cret-value"),
        "a token reached the log:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );
    let answered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("finished processing request") && l.contains(&probe))
        .collect();
    assert_eq!(
        answered.len(),
        5,
        "one line per request, none for a probe at the default level:\n{log}"
    );
    assert!(
        answered[4].contains(&format!("request_id=trace-{probe}")),
        "{}",
        answered[4]
    );
    let made_id = answered[0]
        .split("request_id=")
        .nth(1)
        .and_then(|rest| rest.split([' ', '}']).next())
        .unwrap_or_default();
    assert!(
        uuid::Uuid::parse_str(made_id).is_ok(),
        "a request id made for a request without one: {}",
        answered[0]
    );
    for line in &answered[2..4] {
        assert!(
            line.len() < 1600 && line.contains(" bytes in all]"),
            "a method or URI cut short: {line}"
        );
    }
    assert!(
        answered[0].contains(" INFO ")
            && answered[0].contains("method=GET")
            && answered[0].contains(&format!("uri=/ws?token=[redacted]&probe={probe}"))
            && answered[0].contains("status=401"),
        "{}",
        answered[0]
    );
    assert!(
        answered[1].contains(&format!("uri=/tickets/nope-{probe}"))
            && answered[1].contains("status=401"),
        "{}",
        answered[1]
    );
}

/// An instance that starts while another migrates the schema (a backfill may take minutes)
/// says it waits for the migration lock, instead of hanging without a word; it starts once
/// the lock is free, also when its sessions have a `statement_timeout` and a `lock_timeout`
/// (from the role, the database or the URL: here the URL's, 1 s) shorter than the wait.
/// Postgres only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_waiting_for_the_migration_lock_says_so() {
    let captured = captured();
    within(async {
        let backend = Backend::from_env().await;
        let Some((url, schema)) = backend.database() else {
            eprintln!("skipped: Postgres only (HELPDESK_TEST_BACKEND=postgres)");
            return;
        };
        // Another instance's migration, holding the lock.
        let other = cqrs_postgres::sqlx::PgPool::connect(&url)
            .await
            .expect("connect");
        let mut holding = other.begin().await.unwrap();
        let key = format!("helpdesk-migrations:{schema}");
        cqrs_postgres::sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&key)
            .execute(&mut *holding)
            .await
            .unwrap();
        let mut config = test_config(&backend);
        let url = config.database_url.take().expect("a database URL");
        let separator = if url.contains('?') { '&' } else { '?' };
        config.database_url = Some(format!(
            "{url}{separator}options=-c%20statement_timeout%3D1000%20-c%20lock_timeout%3D1000"
        ));
        let starting = helpdesk::Server::start(config, helpdesk::Hooks::default());
        tokio::pin!(starting);
        let logged = cqrs_core::testing::eventually(
            std::time::Duration::from_secs(20),
            "the waiting start's log line",
            || {
                let logged = captured.text().lines().any(|line| {
                    line.contains("waiting for the migration lock") && line.contains(&key)
                });
                async move { logged.then_some(()) }
            },
        );
        tokio::select! {
            started = &mut starting => {
                panic!("started while the lock was held: {:?}", started.map(|_| ()))
            }
            () = logged => {}
        }
        // Past both timeouts, still waiting.
        if let Ok(started) =
            tokio::time::timeout(std::time::Duration::from_millis(2_500), &mut starting).await
        {
            panic!(
                "returned while the lock was held: {:?}",
                started.map(|_| ())
            );
        }
        holding.rollback().await.unwrap();
        let server = starting.await.expect("starts once the lock is free");
        server.shutdown().await.unwrap();
        other.close().await;
        backend.clean_up().await;
    })
    .await;
}

/// A component's outage shows in the log at both ends: why it is not healthy, once, and that
/// it is healthy again, once (as `/ready` finds them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_recovers_is_logged_healthy_again() {
    use cqrs_core::runtime::{Health, Worker, WorkerContext};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Unhealthy while `down` is set, then healthy; named after the test's probe.
    struct Flaky {
        name: String,
        down: Arc<AtomicBool>,
    }

    #[async_trait::async_trait]
    impl Worker for Flaky {
        fn name(&self) -> &str {
            &self.name
        }
        async fn run(&mut self, ctx: WorkerContext) -> Result<(), cqrs_core::BoxError> {
            while !ctx.shutdown.is_requested() {
                ctx.health.set(if self.down.load(Ordering::SeqCst) {
                    Health::Unhealthy("the flaky backend is away".into())
                } else {
                    Health::Healthy
                });
                tokio::select! {
                    _ = ctx.shutdown.requested() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                }
            }
            Ok(())
        }
    }

    let captured = captured();
    let probe = format!("flaky-{}", uuid::Uuid::now_v7().simple());
    let down = Arc::new(AtomicBool::new(true));
    within(async {
        let (name, flag) = (probe.clone(), down.clone());
        let hooks = helpdesk::Hooks {
            workers: vec![Arc::new(move || {
                Box::new(Flaky {
                    name: name.clone(),
                    down: flag.clone(),
                }) as Box<dyn Worker>
            })],
            ..helpdesk::Hooks::default()
        };
        let s = TestServer::start_with_hooks(Backend::from_env().await, hooks, |_| {}).await;
        let lines = |what: &'static str| {
            let probe = probe.clone();
            move || {
                let n = captured
                    .text()
                    .lines()
                    .filter(|l| l.contains(what) && l.contains(&probe))
                    .count();
                async move { (n > 0).then_some(n) }
            }
        };
        // Each poll of /ready looks; the first that sees the worker down logs it.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "logged down",
            || async {
                s.send(Method::GET, "/ready", None, None).await;
                lines("not healthy")().await
            },
        )
        .await;
        down.store(false, Ordering::SeqCst);
        cqrs_core::testing::eventually(std::time::Duration::from_secs(10), "logged up", || async {
            s.send(Method::GET, "/ready", None, None).await;
            lines("healthy again")().await
        })
        .await;
        s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(lines("not healthy")().await, Some(1), "once");
        assert_eq!(lines("healthy again")().await, Some(1), "once");
        s.stop().await;
    })
    .await;
}

/// The relay to the plugins' event handlers holds two pooled connections: a pool that leaves
/// requests none with it is warned about at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_too_small_for_the_event_handlers_relay_is_warned_about() {
    use crate::events_a_plugin_records_reach_the_store_on_either_backend::Remembered;
    use cqrs_core::{EventContext, EventHandler, HandlerError, async_trait};

    struct Noted;

    #[async_trait]
    impl EventHandler<Remembered> for Noted {
        async fn handle(&self, _: &Remembered, _: EventContext<'_>) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    let captured = captured();
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let (_, schema) = backend.database().expect("a Postgres backend");
    within(async {
        let hooks = helpdesk::Hooks {
            provide: vec![Arc::new(|registrar| {
                registrar.events().add::<Remembered, _>(Noted);
            })],
            ..helpdesk::Hooks::default()
        };
        let s = TestServer::start_with_hooks(backend.clone(), hooks, |c| {
            c.database_max_connections = 10;
        })
        .await;
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
    let text = captured.text();
    let warned = text.lines().any(|line| {
        line.contains("WARN")
            && line.contains("HELPDESK_DATABASE_MAX_CONNECTIONS below 12")
            && line.contains("database_max_connections=10")
    });
    assert!(warned, "no warning for schema {schema} in:\n{text}");
}
