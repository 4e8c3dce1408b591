//! With the `tls` feature, `sslmode=verify-full` with `sslrootcert` connects over TLS and
//! checks the server: the adapters work through a TLS-terminating proxy in front of the real
//! Postgres whose certificate the test CA signed, and a server the trusted CA did not sign is
//! refused with a message that says what to check; a client certificate from `sslcert` and
//! `sslkey` is presented when the server asks for one.

use crate::support::{database_url, postgres_available};
use crate::tls_proxy::{Preamble, TlsProxy, tls_file};
use cqrs_core::ErrorKind;
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_postgres::{PgDatabase, PgError, PgEventStore, PgOptions};
use std::time::Duration;

/// A pool of one connection to `url`, connected (or the error of trying, within 5 s).
async fn connect_one(url: String) -> Result<PgDatabase, PgError> {
    PgOptions::new(url)
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Runs a query on `db`'s pool (over its connection's TLS).
async fn answers_over_tls(db: &PgDatabase) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(db.pool())
        .await
        .expect("a query over TLS");
    assert_eq!(one, 1);
}

/// `host:port` of `DATABASE_URL`'s server.
fn upstream() -> String {
    let url = url::Url::parse(&database_url()).expect("DATABASE_URL is a URL");
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    )
}

/// A TLS proxy in front of `DATABASE_URL`'s server, and that URL pointed at it with
/// `sslmode=verify-full` and `sslrootcert={ca}`; `None` to skip.
pub(crate) async fn tls_server(ca: &str) -> Option<(TlsProxy, String)> {
    tls_server_on("127.0.0.1", "verify-full", ca).await
}

/// The same with the proxy on `ip` and `sslmode={mode}`.
async fn tls_server_on(ip: &str, mode: &str, ca: &str) -> Option<(TlsProxy, String)> {
    if !postgres_available().await {
        return None;
    }
    let mut url = url::Url::parse(&database_url()).expect("DATABASE_URL is a URL");
    let proxy = TlsProxy::start_on(ip, upstream(), Preamble::Postgres).await;
    url.set_host(Some(ip)).expect("a host");
    url.set_port(Some(proxy.addr.port())).expect("a port");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| !key.starts_with("ssl"))
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("sslmode", mode)
        .append_pair("sslrootcert", &tls_file(ca).display().to_string());
    Some((proxy, url.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_private_ca_carries_the_adapters() {
    let Some((proxy, url)) = tls_server("ca.pem").await else {
        return;
    };
    let id = cqrs_core::testing::test_id("tls");
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let db = PgOptions::new(url)
            .schema(&id)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect with verify-full through the TLS proxy");
        db.migrate().await.expect("migrate over TLS");
        let store = PgEventStore::new(db.clone());
        let record = crate::support::record(1);
        store
            .append("s-1", ExpectedVersion::NO_STREAM, vec![record.clone()])
            .await
            .expect("append over TLS");
        let read = store
            .read_all(Position::START, 10)
            .await
            .expect("read over TLS");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].event_id, record.event_id);
        assert!(proxy.handshakes() >= 1, "the connections went through TLS");
        db.drop_schema().await.expect("drop the test schema");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_trusted_ca_did_not_sign_is_refused_saying_what_to_check() {
    let Some((proxy, url)) = tls_server("other-ca.pem").await else {
        return;
    };
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let error = connect_one(url)
            .await
            .expect_err("the server's certificate is not signed by other-ca");
        let message = error.to_string();
        for part in [
            "UnknownIssuer",
            "a CA this client trusts signed its certificate",
            "sslrootcert",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        assert_ne!(error.kind(), ErrorKind::Invalid, "{error}");
        assert_eq!(proxy.handshakes(), 0, "no handshake completed");
    })
    .await;
}

/// The certificate names `localhost` and 127.0.0.1: reached as 127.0.0.2, `verify-full`
/// refuses the server, while `verify-ca`, which checks only who signed it, connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_that_does_not_name_the_host_and_verify_ca_does_not() {
    let Some((full, full_url)) = tls_server_on("127.0.0.2", "verify-full", "ca.pem").await else {
        return;
    };
    let Some((ca, ca_url)) = tls_server_on("127.0.0.2", "verify-ca", "ca.pem").await else {
        return;
    };
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let error = connect_one(full_url)
            .await
            .expect_err("the certificate does not name 127.0.0.2");
        let message = error.to_string();
        assert!(message.contains("not valid for name"), "{message}");
        assert!(message.contains("names the URL's host"), "{message}");
        assert_eq!(full.handshakes(), 0, "no handshake completed");

        let db = connect_one(ca_url)
            .await
            .expect("verify-ca does not check the name");
        answers_over_tls(&db).await;
        assert!(ca.handshakes() >= 1);
    })
    .await;
}

/// A server that asks for a client certificate takes the one in the URL's `sslcert` and
/// `sslkey`; without them the connect fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_sslcert_and_sslkey_is_presented_when_asked() {
    let Some((_, url)) = tls_server("ca.pem").await else {
        return;
    };
    let mut url = url::Url::parse(&url).expect("a URL");
    let proxy = TlsProxy::start_requiring_client_certs(upstream(), Preamble::Postgres).await;
    url.set_port(Some(proxy.addr.port())).expect("a port");
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        let without = connect_one(url.to_string())
            .await
            .expect_err("the server wants a client certificate");
        let message = without.to_string();
        assert!(message.contains("CertificateRequired"), "{message}");
        assert!(message.contains("sslcert and sslkey"), "{message}");
        url.query_pairs_mut()
            .append_pair("sslcert", &tls_file("client.pem").display().to_string())
            .append_pair("sslkey", &tls_file("client.key").display().to_string());
        let db = connect_one(url.to_string())
            .await
            .expect("connect with a client certificate");
        answers_over_tls(&db).await;
        assert!(proxy.handshakes() >= 1);
    })
    .await;
}
