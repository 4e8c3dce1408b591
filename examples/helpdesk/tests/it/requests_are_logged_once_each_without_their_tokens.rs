//! With the server's own log set-up and default filter, each answered request is one `info`
//! line naming its method, path and status, and a `?token=` never reaches the log.

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

// One thread: the subscriber is this thread's default, and the server's tasks run here too.
#[tokio::test(flavor = "current_thread")]
async fn requests_are_logged_once_each_without_their_tokens() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = log_subscriber(
        LogFormat::Text,
        EnvFilter::new(DEFAULT_FILTER),
        false,
        move || writer.clone(),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    within(async {
        let s = TestServer::start().await;
        let refused = s
            .send(Method::GET, "/ws?token=s3cret-value", None, None)
            .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let missing = s.send(Method::GET, "/tickets/nope", None, None).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        s.stop().await;
    })
    .await;

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
        .filter(|l| l.contains("finished processing request"))
        .collect();
    assert_eq!(answered.len(), 2, "one line per request:\n{log}");
    assert!(
        answered[0].contains(" INFO ")
            && answered[0].contains("method=GET")
            && answered[0].contains("uri=/ws?token=[redacted]")
            && answered[0].contains("status=401"),
        "{}",
        answered[0]
    );
    assert!(
        answered[1].contains("uri=/tickets/nope") && answered[1].contains("status=401"),
        "{}",
        answered[1]
    );
}
