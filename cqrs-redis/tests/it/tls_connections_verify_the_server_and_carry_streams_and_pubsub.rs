//! With the `tls` feature, a `rediss://` URL connects over TLS: the stream transport, its
//! consumers and the pub/sub work through a TLS-terminating proxy in front of the real Redis,
//! trusting the test CA (`tls_ca_file`). A server whose certificate the trusted CA did not
//! sign is refused, and a CA file that cannot be used is a configuration error naming it.

use crate::support::{
    consumer_options, event, key_prefix, n_of, plain_redis_host, reachable, redis_userinfo, within,
};
use crate::tls_proxy::{Preamble, TlsProxy, tls_file};
use cqrs_core::ErrorKind;
use cqrs_core::ports::{EventTransport, PubSub};
use cqrs_core::testing::test_id;
use cqrs_redis::{ConnectError, ConnectionOptions, RedisPubSubOptions, RedisStreamOptions};
use std::sync::Arc;
use std::time::Duration;

/// A TLS proxy in front of `REDIS_URL`'s server and the `rediss://` URL (with its
/// credentials and database) that reaches the server through it; `None` to skip.
async fn tls_server() -> Option<(TlsProxy, String)> {
    tls_server_on("127.0.0.1").await
}

/// The same with the proxy on `ip`.
async fn tls_server_on(ip: &str) -> Option<(TlsProxy, String)> {
    if !reachable().await {
        return None;
    }
    let host = plain_redis_host()?;
    let (address, database) = host.split_once('/').unwrap_or((host.as_str(), ""));
    let proxy = TlsProxy::start_on(ip, address.to_owned(), Preamble::None).await;
    let url = format!(
        "rediss://{}{ip}:{}/{database}",
        redis_userinfo(),
        proxy.addr.port()
    );
    Some((proxy, url))
}

/// Connects a pub/sub with `connection` under test `id`'s prefix, and checks that `text`
/// published on a channel reaches a subscriber of it.
async fn publish_and_receive(connection: ConnectionOptions, id: &str, text: &str) {
    let pubsub = RedisPubSubOptions::with_connection(connection)
        .channel_prefix(key_prefix(id))
        .connect()
        .await
        .expect("connect the pub/sub over TLS");
    let mut subscription = pubsub.subscribe("news").await.expect("subscribe");
    pubsub
        .publish("news", Arc::from(text))
        .await
        .expect("publish on the channel");
    let message = tokio::time::timeout(Duration::from_secs(5), subscription.recv())
        .await
        .expect("the message arrives")
        .expect("the subscription is open");
    assert_eq!(&*message.payload, text);
}

/// The tests' connection settings, on `url`, trusting the test CA.
fn over(url: &str) -> ConnectionOptions {
    ConnectionOptions::new(url)
        .command_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
        .tls_ca_file(tls_file("ca.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_pubsub_work_over_tls_with_a_private_ca() {
    let Some((proxy, url)) = tls_server().await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let id = test_id("tls");
            let transport = RedisStreamOptions::with_connection(over(&url))
                .key_prefix(key_prefix(&id))
                .gate_poll(Duration::from_millis(10))
                .connect()
                .await
                .expect("connect over TLS");
            transport
                .publish("t", &[event(Some("k"), 1), event(Some("k"), 2)])
                .await
                .expect("publish over TLS");
            transport
                .publish("t", &[event(Some("k"), 3)])
                .await
                .expect("publish one event over TLS");
            let mut consumer = transport
                .consumer("t", "g", consumer_options(&format!("{id}-c")))
                .await
                .expect("join over TLS");
            let mut seen = Vec::new();
            while seen.len() < 3 {
                let batch = consumer.fetch(10).await.expect("fetch over TLS");
                seen.extend(batch.iter().map(n_of));
                let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                consumer.ack(&ids).await.expect("ack over TLS");
            }
            assert_eq!(seen, [1, 2, 3]);

            publish_and_receive(over(&url), &id, "over tls").await;

            // Every connection went through the proxy's TLS: the transport's, the consumer's
            // own, the pub/sub's publisher and subscriber.
            assert!(proxy.handshakes() >= 4, "{} handshakes", proxy.handshakes());
            drop(consumer);
            let admin = crate::support::connect_admin().await.expect("admin");
            crate::support::delete_prefix(&admin, &key_prefix(&id)).await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_trusted_ca_did_not_sign_is_refused() {
    let Some((proxy, url)) = tls_server().await else {
        return;
    };
    within(30, async {
        let error =
            RedisStreamOptions::with_connection(over(&url).tls_ca_file(tls_file("other-ca.pem")))
                .connect()
                .await
                .expect_err("the server's certificate is not signed by other-ca");
        let ConnectError::Tls { server, reason } = &error else {
            panic!("not a TLS error: {error:?}");
        };
        assert_eq!(server, &format!("127.0.0.1:{}", proxy.addr.port()));
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        // Not retryable: it says what to check instead.
        assert_eq!(error.kind(), ErrorKind::Invalid);
        let message = error.to_string();
        assert!(message.contains("tls_ca_file"), "{message}");
        assert!(!message.contains("set tls_client_cert"), "{message}");
        assert_eq!(proxy.handshakes(), 0, "no handshake completed");
    })
    .await;
}

/// The certificate names `localhost` and 127.0.0.1: reached as 127.0.0.2, the server is
/// refused although the trusted CA signed its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_name_the_host_is_refused() {
    let Some((proxy, url)) = tls_server_on("127.0.0.2").await else {
        return;
    };
    within(30, async {
        let error = RedisStreamOptions::with_connection(over(&url))
            .connect()
            .await
            .expect_err("the certificate does not name 127.0.0.2");
        let ConnectError::Tls { reason, .. } = &error else {
            panic!("not a TLS error: {error:?}");
        };
        assert!(reason.contains("NotValidForName"), "{reason}");
        assert_eq!(proxy.handshakes(), 0, "no handshake completed");
    })
    .await;
}

/// A server that asks clients for a certificate (Redis's `tls-auth-clients`) takes one the
/// test CA signed, given with `tls_client_cert`; without it the connect is a TLS error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_server_asks_for_one() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let (address, database) = host.split_once('/').unwrap_or((host.as_str(), ""));
    let proxy = TlsProxy::start_requiring_client_certs(address.to_owned(), Preamble::None).await;
    let url = format!(
        "rediss://{}127.0.0.1:{}/{database}",
        redis_userinfo(),
        proxy.addr.port()
    );
    within(30, async {
        let without = RedisPubSubOptions::with_connection(over(&url))
            .connect()
            .await
            .expect_err("the server wants a client certificate");
        let ConnectError::Tls { reason, .. } = &without else {
            panic!("not a TLS error: {without:?}");
        };
        assert!(reason.contains("CertificateRequired"), "{reason}");
        let message = without.to_string();
        assert!(message.contains("set tls_client_cert"), "{message}");
        assert_eq!(proxy.handshakes(), 0);

        let signed = over(&url).tls_client_cert(tls_file("client.pem"), tls_file("client.key"));
        publish_and_receive(signed, &test_id("tls-client-cert"), "signed").await;
        assert!(proxy.handshakes() >= 2, "{} handshakes", proxy.handshakes());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_that_cannot_be_used_is_invalid_options_naming_it() {
    let missing = tls_file("no-such-ca.pem");
    let not_pem = tls_file("generate.sh");
    for (path, says) in [
        (&missing, "cannot be read"),
        (&not_pem, "holds no certificate"),
    ] {
        let error = RedisStreamOptions::with_connection(
            ConnectionOptions::new("rediss://127.0.0.1:1").tls_ca_file(path),
        )
        .connect()
        .await
        .expect_err("the CA file is unusable");
        assert!(matches!(error, ConnectError::Invalid { .. }), "{error:?}");
        assert_eq!(error.kind(), ErrorKind::Invalid);
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(says), "{says:?} in {message}");
    }
    // The same for a client certificate or key.
    let missing_key = tls_file("no-such-client.key");
    for (cert, key, names) in [
        (&missing, &tls_file("client.key"), &missing),
        (&tls_file("client.pem"), &missing_key, &missing_key),
    ] {
        let error = RedisStreamOptions::with_connection(
            ConnectionOptions::new("rediss://127.0.0.1:1")
                .tls_ca_file(tls_file("ca.pem"))
                .tls_client_cert(cert, key),
        )
        .connect()
        .await
        .expect_err("the client certificate is unusable");
        assert!(matches!(error, ConnectError::Invalid { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&names.display().to_string()), "{message}");
        assert!(message.contains("tls_client_cert"), "{message}");
    }
}

/// A `rediss://` URL to a plain-text Redis: the server reads the TLS hello as the start of a
/// command and waits for its end, so the connect gets no answer; the error says the server
/// may not speak TLS there, not only that it may be away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_url_to_a_plain_text_redis_says_to_check_for_tls() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    within(30, async {
        let url = format!("rediss://{}{host}", redis_userinfo());
        let error = RedisStreamOptions::with_connection(
            over(&url)
                .connect_timeout(Duration::from_millis(500))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(20)),
        )
        .connect()
        .await
        .expect_err("no TLS there");
        let message = error.to_string();
        assert!(
            message.contains("speaks TLS there (a plain-text Redis needs `redis://`)"),
            "{message}"
        );
    })
    .await;
}
