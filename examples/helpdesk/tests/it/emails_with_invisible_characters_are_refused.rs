//! An email holding a character drawn as nothing (a zero-width space, a soft hyphen, a
//! variation selector, a tag character...) looks like the email without it: it is refused, so
//! two accounts cannot look alike.

use crate::support::*;
use helpdesk_auth::normalize_email;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// One of each range of default-ignorable and format code points.
const INVISIBLE: &[char] = &[
    '\u{00AD}',
    '\u{034F}',
    '\u{0600}',
    '\u{061C}',
    '\u{06DD}',
    '\u{070F}',
    '\u{115F}',
    '\u{1160}',
    '\u{17B4}',
    '\u{17B5}',
    '\u{180B}',
    '\u{180E}',
    '\u{180F}',
    '\u{200B}',
    '\u{200C}',
    '\u{200D}',
    '\u{200E}',
    '\u{200F}',
    '\u{202A}',
    '\u{202E}',
    '\u{2060}',
    '\u{2064}',
    '\u{206F}',
    '\u{3164}',
    '\u{FE00}',
    '\u{FE0F}',
    '\u{FEFF}',
    '\u{FFA0}',
    '\u{FFF9}',
    '\u{1D173}',
    '\u{E0001}',
    '\u{E0041}',
    '\u{E01EF}',
    '\u{E0FFF}',
];

#[test]
fn every_invisible_character_makes_an_email_invalid() {
    for &c in INVISIBLE {
        for email in [
            format!("ad{c}a@example.com"),
            format!("ada@exam{c}ple.com"),
            format!("{c}ada@example.com"),
        ] {
            assert_eq!(
                normalize_email(&email),
                Err("the email does not look like an address"),
                "U+{:04X} in {email:?}",
                c as u32
            );
        }
    }
    // Drawn as blank, or as nothing: a part that looks empty.
    for email in [
        "\u{2800}@example.com",
        "\u{2800}\u{2800}@example.com",
        "ada\u{2800}@example.com",
        "\u{301}@example.com",
        "ada@\u{301}.com",
        "ada@example.\u{2800}",
    ] {
        assert_eq!(
            normalize_email(email),
            Err("the email does not look like an address"),
            "{email:?}"
        );
    }
    // Visible non-ASCII letters are still fine.
    assert_eq!(
        normalize_email("Zoë@Exämple.com").as_deref(),
        Ok("zoë@exämple.com")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookalike_of_a_registered_email_is_refused() {
    within(async {
        let s = TestServer::start().await;
        let address = email("ada");
        s.user(&address).await;
        let (local, domain) = address.split_once('@').unwrap();
        for c in ['\u{200B}', '\u{00AD}', '\u{FEFF}', '\u{E0020}'] {
            let lookalike = format!("{local}{c}@{domain}");
            let r = s
                .send(
                    Method::POST,
                    "/auth/register",
                    None,
                    Some(json!({ "email": lookalike, "password": PASSWORD })),
                )
                .await;
            r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
            assert_eq!(r.body["error"]["details"]["field"], "email", "{r:?}");
        }
        s.stop().await;
    })
    .await;
}
