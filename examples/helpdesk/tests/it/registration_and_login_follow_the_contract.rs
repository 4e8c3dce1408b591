use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_normalizes_the_email_and_assigns_the_role() {
    within(async {
        let s = TestServer::start().await;
        let address = email("Mixed.Case");
        let r = s.send(Method::POST, "/auth/register", None, Some(json!({ "email": format!("  {}  ", address.to_uppercase()), "password": PASSWORD, "display_name": "Ada <b>L</b>" }))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["email"], address.to_lowercase());
        assert_eq!(r.body["role"], "customer");
        // What the OpenAPI document promises of a 201, as `/auth/me` answers it.
        assert_eq!(r.body["display_name"], "Ada <b>L</b>", "{r:?}");
        assert!(uuid::Uuid::parse_str(r.body["user_id"].as_str().unwrap()).is_ok());

        let agent = s.register_agent("AGENT2@example.com").await;
        assert_eq!(agent.body["role"], "agent");

        let again = s.register(&address.to_uppercase()).await;
        again.assert_error(StatusCode::CONFLICT, "email_taken");

        let (token, id) = s.user(&email("me")).await;
        let me = s.get("/auth/me", &token).await;
        assert_eq!(me.status, StatusCode::OK);
        assert_eq!(me.body["user_id"], id);
        assert_eq!(me.body["role"], "customer");
        assert!(me.body["display_name"].is_null());

        // Text is stored exactly as sent: no HTML escaping.
        let login = s.send(Method::POST, "/auth/login", None, Some(json!({ "email": address, "password": PASSWORD }))).await;
        let me = s.get("/auth/me", login.body["token"].as_str().unwrap()).await;
        assert_eq!(me.body["display_name"], "Ada <b>L</b>");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_with_the_field_named() {
    within(async {
        let s = TestServer::start().await;
        let long_local = format!("{}@example.com", "a".repeat(250));
        for (body, field) in [
            (json!({ "email": "not-an-email", "password": PASSWORD }), "email"),
            (json!({ "email": "a@b", "password": PASSWORD }), "email"),
            (json!({ "email": "two@@example.com", "password": PASSWORD }), "email"),
            (json!({ "email": long_local, "password": PASSWORD }), "email"),
            (json!({ "email": "   ", "password": PASSWORD }), "email"),
            (json!({ "email": email("short"), "password": "1234567" }), "password"),
            (json!({ "email": email("long"), "password": "x".repeat(129) }), "password"),
            (json!({ "email": email("common"), "password": "Password123" }), "password"),
            (json!({ "email": email("digits"), "password": "12345678" }), "password"),
            (json!({ "email": email("repeat"), "password": "abababab" }), "password"),
            (json!({ "email": "ada.lovelace@example.com", "password": "ADA.LOVELACE" }), "password"),
            (json!({ "email": email("name"), "password": PASSWORD, "display_name": "n".repeat(101) }), "display_name"),
            (json!({ "email": email("line"), "password": PASSWORD, "display_name": "Ada\nAdmin" }), "display_name"),
            (json!({ "email": email("esc"), "password": PASSWORD, "display_name": "Ada \u{1b}[2J" }), "display_name"),
        ] {
            let r = s.send(Method::POST, "/auth/register", None, Some(body.clone())).await;
            r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
            assert_eq!(r.body["error"]["details"]["field"], field, "{body}");
        }
        // Wrong types and missing fields are 422 too; broken JSON is 400.
        s.send(Method::POST, "/auth/register", None, Some(json!({ "email": 1, "password": PASSWORD }))).await
            .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        s.send(Method::POST, "/auth/register", None, Some(json!({ "email": email("x") }))).await
            .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        // 8 and 128 characters (not bytes) are accepted.
        let ok = s.send(Method::POST, "/auth/register", None, Some(json!({ "email": email("edge"), "password": "ünïcødé!" }))).await;
        assert_eq!(ok.status, StatusCode::CREATED, "{ok:?}");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_and_an_unknown_email_get_the_same_answer() {
    within(async {
        let s = TestServer::start().await;
        let address = email("login");
        s.user(&address).await;
        let ok = s.send(Method::POST, "/auth/login", None, Some(json!({ "email": format!(" {} ", address.to_uppercase()), "password": PASSWORD }))).await;
        assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
        assert_eq!(ok.body["token_type"], "Bearer");
        assert_eq!(ok.body["expires_in"], 3600);
        assert_eq!(ok.body["role"], "customer");
        let wrong = s.send(Method::POST, "/auth/login", None, Some(json!({ "email": address, "password": "wrong password" }))).await;
        wrong.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        let unknown = s.send(Method::POST, "/auth/login", None, Some(json!({ "email": email("nobody"), "password": PASSWORD }))).await;
        unknown.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        assert_eq!(wrong.body, unknown.body, "the two failures are indistinguishable");
        s.stop().await;
    })
    .await;
}

/// No answer is for a cache to keep: a token, a profile, a ticket, an error, and the
/// body limit's 413 from outside every handler all say `Cache-Control: no-store`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_is_for_a_cache_to_keep() {
    within(async {
        let s = TestServer::start().await;
        let no_store = |what: &str, r: &Response| {
            assert_eq!(
                r.headers.get("cache-control").and_then(|v| v.to_str().ok()),
                Some("no-store"),
                "{what}: {r:?}"
            );
        };
        let address = email("cache");
        no_store("a registration", &s.register(&address).await);
        let login = s.login(&address).await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        no_store("a login's token", &login);
        let token = login.body["token"].as_str().unwrap().to_owned();
        no_store("the profile", &s.get("/auth/me", &token).await);
        let ticket = s.ticket(&token, "cached?").await;
        let id = ticket["id"].as_str().unwrap();
        no_store("a ticket", &s.get(&format!("/tickets/{id}"), &token).await);
        no_store("an error", &s.get("/no/such/route", &token).await);
        let oversize = s
            .oversize_answer(&Method::POST, "/auth/register", None)
            .await;
        let head = oversize
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 413"), "{oversize}");
        assert!(
            head.contains("\r\ncache-control: no-store\r\n"),
            "the body limit's 413: {oversize}"
        );
        s.stop().await;
    })
    .await;
}
