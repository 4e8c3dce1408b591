//! An email on the agent list registers, as an agent, only with the agent code; a stored agent
//! whose email left the list is a customer from the next request on.

use crate::support::*;
use helpdesk::{Config, Hooks, Server};
use helpdesk_auth::{InMemoryUserStore, UserStore};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

async fn register_with(s: &TestServer, email: &str, code: Option<&str>) -> Response {
    let mut body = json!({ "email": email, "password": PASSWORD });
    if let Some(code) = code {
        body["agent_code"] = json!(code);
    }
    s.send(Method::POST, "/auth/register", None, Some(body))
        .await
}

/// Without the code, or with a wrong one, a listed email is refused (403, saying what to do)
/// and no account is made, as an agent or as a customer: its owner can still register it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_email_without_the_right_code_is_refused_and_no_account_is_made() {
    within(async {
        let s = TestServer::start().await;
        for code in [
            None,
            Some(""),
            Some("a-wrong-agent-code"),
            Some("the-test-agent-codE"),
        ] {
            let r = register_with(&s, "Agent@Example.com", code).await;
            r.assert_error(StatusCode::FORBIDDEN, "agent_code_required");
            let message = r.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("agent_code"), "{message}");
            s.login("agent@example.com")
                .await
                .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
        let r = s.register_agent("agent@example.com").await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["role"], "agent");
        let login = s.login("agent@example.com").await;
        assert_eq!(login.body["role"], "agent", "{login:?}");
        // Once taken, the email is still refused without the code, rather than reported taken.
        register_with(&s, "agent@example.com", None)
            .await
            .assert_error(StatusCode::FORBIDDEN, "agent_code_required");
        s.stop().await;
    })
    .await;
}

/// A code sent with an email not on the list is refused, naming the field: a mistyped agent
/// email would otherwise become a customer without anyone noticing. An empty code is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_for_an_email_not_on_the_list_is_refused() {
    within(async {
        let s = TestServer::start().await;
        let r = register_with(&s, "agnet@example.com", Some(AGENT_CODE)).await;
        r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(r.body["error"]["details"]["field"], "agent_code", "{r:?}");
        let r = register_with(&s, "agnet@example.com", Some("")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["role"], "customer");
        s.stop().await;
    })
    .await;
}

/// Wrong agent codes are counted per client address, before the code is compared: once an
/// address has sent `--login-attempts` of them within the window, its registrations of listed
/// emails get 429 `too_many_attempts` with `Retry-After`, the right code too; another address
/// is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_agent_codes_from_one_address_get_429_but_not_another_address() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.login_attempts = 3;
            c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        })
        .await;
        let from = |forwarded_for: &'static str, code: &str| {
            let body =
                json!({ "email": "agent@example.com", "password": PASSWORD, "agent_code": code });
            let request = s
                .http
                .post(s.url("/auth/register"))
                .header("x-forwarded-for", forwarded_for)
                .json(&body);
            async move { Response::from(request.send().await.unwrap()).await }
        };
        for _ in 0..3 {
            from("192.0.2.91", "a-wrong-agent-code")
                .await
                .assert_error(StatusCode::FORBIDDEN, "agent_code_required");
        }
        let blocked = from("192.0.2.91", AGENT_CODE).await;
        blocked.assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
        let retry_after: u64 = blocked.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=900).contains(&retry_after), "{retry_after}");
        let other = from("192.0.2.92", AGENT_CODE).await;
        assert_eq!(
            other.status,
            StatusCode::CREATED,
            "another address: {other:?}"
        );
        assert_eq!(other.body["role"], "agent");
        s.stop().await;
    })
    .await;
}

/// A user store two servers share, so that a server restarted with another agent list sees
/// the same users: in memory, `users`; on Postgres, the shared schema's own (`PgUserStore`),
/// so nothing is provided.
fn sharing(users: &InMemoryUserStore, backend: &Backend) -> Hooks {
    if *backend != Backend::Memory {
        return Hooks::default();
    }
    let users: Arc<dyn UserStore> = Arc::new(users.clone());
    Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.provide(users.clone());
        })],
        ..Hooks::default()
    }
}

/// Taking an email off the agent list demotes its user at their next request: the token they
/// hold, a new login, `/auth/me` and the agents-only routes all see a customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_taken_off_the_list_is_a_customer_at_the_next_request() {
    within(async {
        let users = InMemoryUserStore::default();
        let backend = Backend::from_env().await;
        let hooks = sharing(&users, &backend);
        let before = TestServer::start_with_hooks(backend, hooks, |_| {}).await;
        let (token, id) = before.agent_named("agent2@example.com").await;
        assert_eq!(
            before.get("/tickets/stats", &token).await.status,
            StatusCode::OK
        );
        let backend = before.backend.shared();
        let hooks = sharing(&users, &backend);
        let after = TestServer::start_with_hooks(backend, hooks, |c| {
            c.agent_emails = vec!["agent@example.com".into()];
        })
        .await;
        let me = after.get("/auth/me", &token).await;
        assert_eq!(me.status, StatusCode::OK, "{me:?}");
        assert_eq!(me.body["user_id"], id);
        assert_eq!(
            me.body["role"], "customer",
            "the token's role is not believed"
        );
        after
            .get("/tickets/stats", &token)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        let login = after.login("agent2@example.com").await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        assert_eq!(login.body["role"], "customer");
        after.stop().await;
        before.stop().await;
    })
    .await;
}

/// On Postgres every instance must accept the same code, so agent emails without one refuse
/// to start, saying which variable to set; a code shorter than 16 bytes is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_agent_emails_without_a_code_refuse_to_start() {
    within(async {
        let config = Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            // Never reached: the configuration is refused first.
            database_url: Some("postgres://postgres@127.0.0.1:1/nowhere".into()),
            jwt_secret: Some("a-test-secret-that-is-at-least-32-bytes-long".into()),
            agent_emails: vec!["agent@example.com".into()],
            ..Config::default()
        };
        let err = Server::start(config.clone(), Hooks::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "HELPDESK_AGENT_EMAILS (--agent-emails) is set without HELPDESK_AGENT_CODE"
            ) && err.contains("set HELPDESK_AGENT_CODE"),
            "{err}"
        );
        let short = Config {
            agent_code: Some("fifteen-bytes!!".into()),
            ..config
        };
        let problems = short.validate().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("HELPDESK_AGENT_CODE (--agent-code) is 15 bytes")),
            "{problems:?}"
        );
    })
    .await;
}

/// In memory, agent emails without a code get a random one, logged once at start as a
/// warning; an agent registers with it. Nothing else the process writes, at `debug`, holds the
/// code: not the requests that send it (right, wrong, for an unlisted email), not the logins.
#[cfg(unix)]
#[test]
fn in_memory_a_missing_code_is_made_and_logged_once() {
    let mut child = Running(
        helpdesk_command(
            &[
                "--bind",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--shutdown-grace-ms",
                "2000",
            ],
            &[
                ("HELPDESK_AGENT_EMAILS", "grace@example.com"),
                ("RUST_LOG", "debug"),
            ],
        )
        .spawn()
        .unwrap(),
    );
    let lines = stdout_lines(&mut child);
    let mut logged = Vec::new();
    let warning_line = kept_line_with(&lines, &mut logged, "HELPDESK_AGENT_CODE");
    let warning: serde_json::Value = serde_json::from_str(&warning_line).unwrap();
    assert_eq!(warning["level"], "WARN", "{warning}");
    let code = warning["fields"]["agent_code"].as_str().unwrap().to_owned();
    assert!(code.len() >= 16, "{code}");
    let listening: serde_json::Value =
        serde_json::from_str(&kept_line_with(&lines, &mut logged, "helpdesk listening")).unwrap();
    let addr = listening["fields"]["addr"].as_str().unwrap().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let post = |path: &str, body: serde_json::Value| {
        let request = client.post(format!("http://{addr}{path}")).json(&body);
        runtime.block_on(async { Response::from(request.send().await.unwrap()).await })
    };
    let register = |email: &str, code: Option<String>| {
        let mut body = json!({ "email": email, "password": PASSWORD });
        if let Some(code) = code {
            body["agent_code"] = json!(code);
        }
        post("/auth/register", body)
    };
    register("grace@example.com", Some(format!("{code}x")))
        .assert_error(StatusCode::FORBIDDEN, "agent_code_required");
    register("grace@example.com", None).assert_error(StatusCode::FORBIDDEN, "agent_code_required");
    register("grase@example.com", Some(code.clone()))
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let registered = register("grace@example.com", Some(code.clone()));
    assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
    assert_eq!(registered.body["role"], "agent");
    let customer = register("ada@example.com", None);
    assert_eq!(customer.status, StatusCode::CREATED, "{customer:?}");
    let login = post(
        "/auth/login",
        json!({ "email": "grace@example.com", "password": PASSWORD }),
    );
    assert_eq!(login.body["role"], "agent", "{login:?}");
    drop(client);
    drop(runtime);
    // Every line, up to the process's exit: not only those that arrived by now.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status:?} {stderr}");
    logged.extend(lines);
    logged.extend(stderr.lines().map(str::to_owned));
    assert!(
        logged.iter().any(|l| l.contains("\"DEBUG\"")),
        "RUST_LOG=debug is in effect"
    );
    assert!(
        logged.iter().any(|l| l.contains("/auth/register")),
        "the registrations are logged"
    );
    let leaks: Vec<&String> = logged
        .iter()
        .filter(|l| l.contains(&code) && **l != warning_line)
        .collect();
    assert!(leaks.is_empty(), "the code logged again: {leaks:#?}");
}

/// [`line_with`], keeping in `logged` every line read, the one returned included.
fn kept_line_with(
    lines: &std::sync::mpsc::Receiver<String>,
    logged: &mut Vec<String>,
    needle: &str,
) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no log line with {needle:?}: {e}"));
        logged.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    }
}
