//! Text people write is stored in Unicode's composed form (NFC): `é` sent as `e` plus a
//! combining accent is drawn like the precomposed `é`, so it is stored as that, and counted as
//! one character against the limits; passwords are composed before they are hashed and
//! checked. Noncharacters (U+FDD0 to U+FDEF, U+FFFE, U+FFFF, ...),
//! which Unicode keeps for a program's internal use, are refused; private-use characters are
//! not.

use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[track_caller]
fn assert_refused(r: &Response, field: &str) {
    r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(r.body["error"]["details"]["field"], field, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("noncharacter")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_text_and_names_are_stored_composed_and_counted_so() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        // 200 characters as drawn, 400 code points as sent.
        let decomposed = "e\u{0301}".repeat(200);
        let composed = "\u{00E9}".repeat(200);
        let r = s
            .post(
                "/tickets",
                &customer,
                json!({ "title": format!(" {decomposed} "), "description": "Cafe\u{0301}" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["title"], composed);
        assert_eq!(r.body["description"], "Caf\u{00E9}");
        let id = r.body["id"].as_str().unwrap().to_owned();
        // One more character is one too many, however it is encoded.
        let r = s
            .post(
                "/tickets",
                &customer,
                json!({ "title": format!("{decomposed}e\u{0301}") }),
            )
            .await;
        r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(r.body["error"]["details"]["field"], "title", "{r:?}");

        let r = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "n\u{0303}o\u{0308}" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["comment"]["body"], "\u{00F1}\u{00F6}");
        let r = s
            .post(
                &format!("/tickets/{id}/close"),
                &customer,
                json!({ "resolution": "A\u{030A}" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let stored = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(stored.body["title"], composed, "{stored:?}");
        let history = s.get(&format!("/tickets/{id}/history"), &customer).await;
        let closed = &history.body["items"][2];
        assert_eq!(closed["type"], "TicketClosed", "{history:?}");
        assert_eq!(closed["data"]["resolution"], "\u{00C5}", "{history:?}");

        let address = email("composed");
        let r = s
            .send(
                Method::POST,
                "/auth/register",
                None,
                Some(json!({ "email": address, "password": PASSWORD, "display_name": "Zoe\u{0308}" })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let login = s.login(&address).await;
        let me = s
            .get("/auth/me", login.body["token"].as_str().unwrap())
            .await;
        assert_eq!(me.body["display_name"], "Zo\u{00EB}", "{me:?}");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noncharacters_are_refused_and_private_use_characters_are_not() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        for c in ['\u{FDD0}', '\u{FDEF}', '\u{FFFE}', '\u{FFFF}', '\u{1FFFF}', '\u{10FFFE}'] {
            let r = s
                .post("/tickets", &customer, json!({ "title": format!("printer {c}") }))
                .await;
            assert_refused(&r, "title");
        }
        let r = s
            .post(
                "/tickets",
                &customer,
                json!({ "title": "fine", "description": "see \u{FFFF}" }),
            )
            .await;
        assert_refused(&r, "description");
        let list = s.get("/tickets", &customer).await;
        assert_eq!(list.body["items"], json!([]), "nothing was stored");

        let ticket = s.ticket(&customer, "logo \u{E000} \u{F8FF}").await;
        assert_eq!(ticket["title"], "logo \u{E000} \u{F8FF}");
        let id = ticket["id"].as_str().unwrap();
        for (action, field, text) in [("comments", "body", "x\u{FDD5}"), ("close", "resolution", "\u{2FFFE}")] {
            let r = s
                .post(&format!("/tickets/{id}/{action}"), &customer, json!({ field: text }))
                .await;
            assert_refused(&r, field);
        }

        let register = |body: serde_json::Value| s.send(Method::POST, "/auth/register", None, Some(body));
        let r = register(json!({ "email": email("nonchar"), "password": PASSWORD, "display_name": "Ada\u{FFFE}" })).await;
        assert_refused(&r, "display_name");
        let r = register(json!({ "email": format!("a\u{FFFF}{}", email("nonchar")), "password": PASSWORD })).await;
        r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(r.body["error"]["details"]["field"], "email", "{r:?}");
        s.stop().await;
    })
    .await;
}

/// A password is one password however its accents are encoded: registered with a
/// precomposed `é`, it logs in typed with `e` and a combining accent, and the other way round
/// (each keyboard and platform sends its own form). Its length counts characters as drawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_is_one_however_its_accents_are_encoded() {
    within(async {
        let s = TestServer::start().await;
        let auth = |path: &'static str, address: &str, password: &str| {
            let body = json!({ "email": address, "password": password });
            s.send(Method::POST, path, None, Some(body))
        };
        let (precomposed, decomposed) = ("caf\u{00E9} au lait", "cafe\u{0301} au lait");
        // 128 characters as drawn, 256 code points as sent: within the limit (four letters
        // over and over: one repeated alone is refused as too easy to guess).
        let long_decomposed = "e\u{0301}u\u{0308}n\u{0303}a\u{030A}".repeat(32);
        let long_precomposed = "\u{00E9}\u{00FC}\u{00F1}\u{00E5}".repeat(32);
        for (registered, typed) in [
            (precomposed, decomposed),
            (decomposed, precomposed),
            (&long_decomposed, &long_precomposed),
        ] {
            let address = email("accents");
            let r = auth("/auth/register", &address, registered).await;
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
            let login = auth("/auth/login", &address, typed).await;
            assert_eq!(login.status, StatusCode::OK, "{login:?}");
        }
        s.stop().await;
    })
    .await;
}
