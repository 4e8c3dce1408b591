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

/// A user store two servers share, so that a server restarted with another agent list sees
/// the same users (in memory as on Postgres).
fn sharing(users: &InMemoryUserStore) -> Hooks {
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
        let before =
            TestServer::start_with_hooks(Backend::from_env().await, sharing(&users), |_| {}).await;
        let (token, id) = before.agent_named("agent2@example.com").await;
        assert_eq!(
            before.get("/tickets/stats", &token).await.status,
            StatusCode::OK
        );
        let backend = before.backend.shared();
        let after = TestServer::start_with_hooks(backend, sharing(&users), |c| {
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
            err.contains("HELPDESK_AGENT_EMAILS is set without HELPDESK_AGENT_CODE")
                && err.contains("set HELPDESK_AGENT_CODE"),
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
                .any(|p| p.contains("HELPDESK_AGENT_CODE is 15 bytes")),
            "{problems:?}"
        );
    })
    .await;
}

/// In memory, agent emails without a code get a random one, logged once at start as a
/// warning; an agent registers with it.
#[test]
fn in_memory_a_missing_code_is_made_and_logged_once() {
    let mut child = Running(
        helpdesk_command(
            &["--bind", "127.0.0.1:0", "--log-format", "json"],
            &[("HELPDESK_AGENT_EMAILS", "grace@example.com")],
        )
        .spawn()
        .unwrap(),
    );
    let lines = stdout_lines(&mut child);
    let warning: serde_json::Value =
        serde_json::from_str(&line_with(&lines, "HELPDESK_AGENT_CODE")).unwrap();
    assert_eq!(warning["level"], "WARN", "{warning}");
    let code = warning["fields"]["agent_code"].as_str().unwrap().to_owned();
    assert!(code.len() >= 16, "{code}");
    let listening: serde_json::Value =
        serde_json::from_str(&line_with(&lines, "helpdesk listening")).unwrap();
    let addr = listening["fields"]["addr"].as_str().unwrap().to_owned();
    let register = |code: String| {
        let url = format!("http://{addr}/auth/register");
        async move {
            let body =
                json!({ "email": "grace@example.com", "password": PASSWORD, "agent_code": code });
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            Response::from(client.post(url).json(&body).send().await.unwrap()).await
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let wrong = runtime.block_on(register(format!("{code}x")));
    wrong.assert_error(StatusCode::FORBIDDEN, "agent_code_required");
    let registered = runtime.block_on(register(code));
    assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
    assert_eq!(registered.body["role"], "agent");
    while let Ok(line) = lines.try_recv() {
        assert!(
            !line.contains("HELPDESK_AGENT_CODE"),
            "logged again: {line}"
        );
    }
}
