use crate::support::*;
use reqwest::{Method, StatusCode};
use std::time::Duration;

fn b64(bytes: &[u8]) -> String {
    // base64url without padding, enough for forging test tokens.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_forged_and_expired_tokens_are_401() {
    within(async {
        let s = TestServer::start().await;
        let (token, id) = s.customer().await;
        assert_eq!(s.get("/auth/me", &token).await.status, StatusCode::OK);

        let payload =
            b64(format!(r#"{{"sub":"{id}","role":"agent","exp":9999999999}}"#).as_bytes());
        let none_alg = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        let hs512 = format!(
            "{}.{payload}.{}",
            b64(br#"{"alg":"HS512","typ":"JWT"}"#),
            b64(&[7; 64])
        );
        let parts: Vec<&str> = token.split('.').collect();
        let elevated = format!("{}.{payload}.{}", parts[0], parts[2]);
        let bad_signature = format!("{}.{}.{}", parts[0], parts[1], b64(&[0; 32]));

        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing", None),
            ("empty bearer", Some("Bearer ".into())),
            ("no scheme", Some(token.clone())),
            ("basic scheme", Some(format!("Basic {token}"))),
            ("garbage", Some("Bearer garbage".into())),
            ("alg none", Some(format!("Bearer {none_alg}"))),
            ("another algorithm", Some(format!("Bearer {hs512}"))),
            ("a forged payload", Some(format!("Bearer {elevated}"))),
            ("a bad signature", Some(format!("Bearer {bad_signature}"))),
            ("non-ascii", Some("Bearer tøken".into())),
        ];
        for (what, header) in cases {
            let mut request = s.http.request(Method::GET, s.url("/auth/me"));
            if let Some(h) = header {
                request = request.header("authorization", h.into_bytes());
            }
            let r = Response::from(request.send().await.unwrap()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {r:?}");
            r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        }

        s.clock.advance(Duration::from_secs(3601));
        s.get("/auth/me", &token)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        s.get("/tickets", &token)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        s.stop().await;
    })
    .await;
}
