//! What the tests share: the server, isolated key prefixes, short intervals, cleanup.

use cqrs_core::EventRecord;
use cqrs_core::ports::{Consumer, ConsumerOptions, Delivery, EventTransport, TransportError};
use cqrs_core::testing::{require_services, test_id, with_timeout};
use cqrs_redis::{ConnectError, ConnectionOptions, RedisStreamOptions, RedisStreamTransport};
use fred::clients::Client;
use fred::interfaces::ClientLike;
use fred::prelude::{Builder, Config};
use fred::types::{ClusterHash, CustomCommand, Value};
use std::future::Future;
use std::time::Duration;

pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| cqrs_redis::DEFAULT_URL.to_owned())
}

/// Connection options with a short command timeout and quick reconnects.
pub(crate) fn connection() -> ConnectionOptions {
    ConnectionOptions::new(redis_url())
        .command_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
}

/// Stream options isolated under `cqrs-test:{id}`, with a short gate poll.
pub(crate) fn stream_options(id: &str) -> RedisStreamOptions {
    RedisStreamOptions::with_connection(connection())
        .key_prefix(key_prefix(id))
        .gate_poll(Duration::from_millis(10))
}

pub(crate) fn key_prefix(id: &str) -> String {
    format!("cqrs-test:{id}")
}

/// Consumer options with short intervals.
pub(crate) fn consumer_options(name: &str) -> ConsumerOptions {
    ConsumerOptions::default()
        .consumer_name(name)
        .block(Duration::from_millis(100))
        .redelivery_delay(Duration::from_millis(300))
}

/// Whether Redis answers; `None` means skip (prints why), and fails the test when
/// `CQRS_REQUIRE_SERVICES=1`.
pub(crate) async fn reachable() -> bool {
    let url = redis_url();
    let ok = match connect_admin().await {
        Ok(client) => {
            let _ = client.quit().await;
            true
        }
        Err(_) => false,
    };
    require_services("redis", &url, ok)
}

/// A plain fred client for checks and cleanup.
pub(crate) async fn connect_admin() -> Result<Client, fred::error::Error> {
    let mut builder = Builder::from_config(Config::from_url(&redis_url())?);
    builder.with_connection_config(|c| c.connection_timeout = Duration::from_secs(2));
    builder.with_performance_config(|c| c.default_command_timeout = Duration::from_secs(5));
    let client = builder.build()?;
    client.init().await?;
    Ok(client)
}

/// One test's world: its id, a transport under its own key prefix, an admin client.
pub(crate) struct Env {
    pub(crate) id: String,
    pub(crate) transport: RedisStreamTransport,
    pub(crate) admin: Client,
}

impl Env {
    /// `None` when Redis is unreachable and not required (the test skips).
    pub(crate) async fn new(name: &str) -> Option<Env> {
        Self::with(name, |o| o).await
    }

    pub(crate) async fn with(
        name: &str,
        options: impl FnOnce(RedisStreamOptions) -> RedisStreamOptions,
    ) -> Option<Env> {
        if !reachable().await {
            return None;
        }
        let id = test_id(name);
        let transport = options(stream_options(&id))
            .connect()
            .await
            .expect("connect the transport");
        let admin = connect_admin().await.expect("connect the admin client");
        Some(Env {
            id,
            transport,
            admin,
        })
    }

    /// Joins group `g` of `topic` as consumer `{id}-{name}`, with the test's consumer options
    /// changed by `configure`.
    pub(crate) async fn join(
        &self,
        topic: &str,
        name: &str,
        configure: impl FnOnce(ConsumerOptions) -> ConsumerOptions,
    ) -> Box<dyn Consumer> {
        let options = configure(consumer_options(&format!("{}-{name}", self.id)));
        self.transport
            .consumer(topic, "g", options)
            .await
            .expect("join the group")
    }

    /// Publishes event `n` with partition key `key`.
    pub(crate) async fn publish_one(&self, topic: &str, key: &str, n: u64) {
        self.transport
            .publish(topic, &[event(Some(key), n)])
            .await
            .expect("publish");
    }

    /// Publishes event 1 of key `k` and hands it to `consumer`, which leaves it pending; then
    /// publishes event 2 of `k`, which a fetch now holds back behind it. Returns event 1.
    pub(crate) async fn one_pending_and_its_successor(
        &self,
        topic: &str,
        consumer: &mut dyn Consumer,
    ) -> Delivery {
        self.publish_one(topic, "k", 1).await;
        let first = consumer.fetch(1).await.expect("fetch");
        assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
        self.publish_one(topic, "k", 2).await;
        first.into_iter().next().expect("one delivery")
    }

    pub(crate) fn topic(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// Sends a raw command on the admin client.
    pub(crate) async fn command(&self, name: &str, args: Vec<Value>) -> Value {
        raw(&self.admin, name, args).await
    }

    /// Reads up to `count` new entries of `stream` in group `g` as `consumer`, with a raw
    /// `XREADGROUP` (a process that then died, or a read whose reply a consumer never got):
    /// they are pending to `consumer`, delivered once.
    pub(crate) async fn read_as(&self, stream: &str, consumer: &str, count: usize) -> Value {
        self.command(
            "XREADGROUP",
            vec![
                "GROUP".into(),
                "g".into(),
                consumer.into(),
                "COUNT".into(),
                (count as i64).into(),
                "STREAMS".into(),
                stream.into(),
                ">".into(),
            ],
        )
        .await
    }

    /// The ids of `stream`'s entries, in order.
    pub(crate) async fn entry_ids(&self, stream: &str) -> Vec<String> {
        self.command("XRANGE", vec![stream.into(), "-".into(), "+".into()])
            .await
            .into_array()
            .into_iter()
            .filter_map(|entry| entry.into_array().into_iter().next()?.into_string())
            .collect()
    }

    /// The consumer entry `id` of `stream` is pending to in group `g`, its idle time (ms) and
    /// its delivery count.
    pub(crate) async fn pending_entry(&self, stream: &str, id: &str) -> (String, u64, u64) {
        let rows = self
            .command(
                "XPENDING",
                vec![
                    stream.into(),
                    "g".into(),
                    id.into(),
                    id.into(),
                    Value::from(1),
                ],
            )
            .await
            .into_array();
        let row = rows
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{id} is not pending"))
            .into_array();
        (
            row[1].clone().into_string().unwrap(),
            row[2].as_u64().unwrap(),
            row[3].as_u64().unwrap(),
        )
    }

    /// Deletes every key under this test's prefix.
    pub(crate) async fn cleanup(self) {
        delete_prefix(&self.admin, &key_prefix(&self.id)).await;
        let _ = self.admin.quit().await;
    }
}

/// The `host:port` (and `/db`) of `REDIS_URL` when it is a `redis://` URL, for a test that
/// connects through a proxy or logs in as an ACL user of its own; any credentials in the URL
/// are left out ([`redis_userinfo`] has them, for the proxy's URL). `None` (a skip, or a
/// failure under `CQRS_REQUIRE_SERVICES=1`) for another scheme (`rediss://`: a TLS proxy is
/// beyond these tests).
pub(crate) fn plain_redis_host() -> Option<String> {
    let base = redis_url();
    if let Some(rest) = base.strip_prefix("redis://") {
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        return Some(host.to_owned());
    }
    let required = std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1");
    assert!(
        !required,
        "REDIS_URL {base} is not redis://, and this test puts a plain TCP proxy in front of it \
         or logs in as a user of its own: give it a redis://host:port, or unset \
         CQRS_REQUIRE_SERVICES"
    );
    eprintln!("skipped: REDIS_URL {base} is not redis://");
    None
}

/// The credentials of `REDIS_URL` as they stand before its host (`user:password@`, or empty).
pub(crate) fn redis_userinfo() -> String {
    let base = redis_url();
    base.strip_prefix("redis://")
        .and_then(|rest| rest.rsplit_once('@'))
        .map(|(userinfo, _)| format!("{userinfo}@"))
        .unwrap_or_default()
}

/// How old an ACL user of a test must be before another run may delete it as left behind:
/// the longest time limit a test of this binary gives itself (`within(120, ..)`), plus a
/// margin for the set-up before it and the clean-up after. A younger user may belong to a run
/// still going on the same Redis (another checkout, another CI job): `ACL DELUSER` would drop
/// its connections.
const STALE_USER_AGE: Duration = Duration::from_secs(120 + 60);

/// Redis's clock (`TIME`), in milliseconds since the epoch: the one clock every run sharing
/// the server agrees on.
async fn server_millis(client: &Client) -> u64 {
    let time = raw(client, "TIME", vec![]).await.into_array();
    let part = |i: usize| {
        time.get(i)
            .and_then(|v| v.as_string())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("TIME answered {time:?}"))
    };
    part(0) * 1000 + part(1) / 1000
}

/// The name of an ACL user for the test `id`: `cqrs-test-{id}-{created}`, `created` being
/// Redis's clock in milliseconds, so that [`delete_stale_users`] can tell a user left behind
/// by a failed run from one a concurrent run is using.
pub(crate) async fn acl_user(client: &Client, id: &str) -> String {
    format!("cqrs-test-{id}-{}", server_millis(client).await)
}

/// Deletes the ACL users named `{prefix}…-{created}` (see [`acl_user`]) that failed runs of a
/// test left behind (each run deletes its own at its end): those created more than
/// [`STALE_USER_AGE`] ago by Redis's clock. Younger users, and names without a creation time,
/// are left alone.
pub(crate) async fn delete_stale_users(client: &Client, prefix: &str) {
    let now = server_millis(client).await;
    let stale_before = now.saturating_sub(STALE_USER_AGE.as_millis() as u64);
    for user in raw(client, "ACL", vec!["USERS".into()]).await.into_array() {
        let Some(name) = user.as_string().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let created = name
            .rsplit_once('-')
            .and_then(|(_, created)| created.parse::<u64>().ok());
        if created.is_some_and(|created| created < stale_before) {
            raw(client, "ACL", vec!["DELUSER".into(), name.into()]).await;
        }
    }
}

/// `ACL` with `args` (`SETUSER ...`, `DELUSER ...`) on the admin client.
pub(crate) async fn acl(admin: &Client, args: &[&str]) -> Value {
    let args: Vec<Value> = args.iter().map(|a| Value::from(*a)).collect();
    raw(admin, "ACL", args).await
}

pub(crate) async fn raw(client: &Client, name: &str, args: Vec<Value>) -> Value {
    client
        .custom(
            CustomCommand::new(name.to_owned(), ClusterHash::FirstKey, false),
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

/// Deletes the keys `{prefix}:*` (SCAN, not KEYS: other tests share the server).
pub(crate) async fn delete_prefix(client: &Client, prefix: &str) {
    let pattern = format!("{prefix}:*");
    let mut cursor = "0".to_owned();
    loop {
        let reply = raw(
            client,
            "SCAN",
            vec![
                cursor.as_str().into(),
                "MATCH".into(),
                pattern.as_str().into(),
                "COUNT".into(),
                1000.into(),
            ],
        )
        .await;
        let mut parts = reply.into_array().into_iter();
        cursor = parts
            .next()
            .and_then(|v| v.into_string())
            .unwrap_or_else(|| "0".to_owned());
        let keys: Vec<Value> = parts.next().map(|v| v.into_array()).unwrap_or_default();
        if !keys.is_empty() {
            raw(client, "DEL", keys).await;
        }
        if cursor == "0" {
            break;
        }
    }
}

/// An event with a partition key and a number in its payload.
pub(crate) fn event(key: Option<&str>, n: u64) -> EventRecord {
    cqrs_core::testing::event_store::record(n).with_partition_key(key.map(str::to_owned))
}

/// Fetches up to `max` until a batch is not empty, for up to 10 s; fails saying `what` was
/// awaited.
pub(crate) async fn fetch_some(
    consumer: &mut dyn Consumer,
    max: usize,
    what: &str,
) -> Vec<Delivery> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = consumer.fetch(max).await.expect("fetch");
        if !got.is_empty() {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: nothing fetched in 10 s"
        );
    }
}

pub(crate) fn n_of(d: &Delivery) -> u64 {
    d.record.payload["n"].as_u64().unwrap_or(u64::MAX)
}

/// Retries `publish` until it succeeds (it fails fast while Redis reconnects), for up to 20 s.
pub(crate) async fn publish_until_ok<F, Fut>(mut publish: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), TransportError>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match publish().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < until => {
                assert!(
                    matches!(
                        e,
                        TransportError::Unavailable { .. } | TransportError::Timeout { .. }
                    ),
                    "only retryable errors while reconnecting, got {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publish kept failing for 20 s: {e}"),
        }
    }
}

/// Runs a test body with a deadline, so a hang fails instead of stalling CI.
pub(crate) async fn within<F: Future>(seconds: u64, body: F) -> F::Output {
    with_timeout(Duration::from_secs(seconds), body).await
}

/// Whether an error from `connect` means the server is unreachable.
#[allow(dead_code)]
pub(crate) fn unreachable(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::Redis(TransportError::Unavailable { .. } | TransportError::Timeout { .. })
    )
}

/// Asserts that each key's events took effect once each, in publish order: `applied` holds,
/// per partition key, the numbers of the events as they took effect.
pub(crate) fn assert_each_key_in_order(
    events: &[EventRecord],
    applied: &std::collections::BTreeMap<String, Vec<u64>>,
) {
    let mut expected: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for e in events {
        let key = e.partition_key.clone().unwrap_or_default();
        expected
            .entry(key)
            .or_default()
            .push(e.payload["n"].as_u64().unwrap_or(u64::MAX));
    }
    for (key, expected) in &expected {
        assert_eq!(
            applied.get(key).cloned().unwrap_or_default(),
            *expected,
            "key {key}: each event once, in publish order"
        );
    }
}

/// Waits (up to 10 s, else panics) until some of the connections `ids` wait in a blocking
/// read, and returns those.
pub(crate) async fn blocked_connections(admin: &Client, ids: &[i64]) -> Vec<i64> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let blocked = blocked_now(admin, ids).await;
        if !blocked.is_empty() {
            return blocked;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "none of the connections {ids:?} blocked within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Those of the connections `ids` that wait in a blocking read now (`CLIENT LIST`: `flags` has
/// `b` and `cmd` is `xreadgroup`; a client paused by `CLIENT PAUSE` also has `b`).
pub(crate) async fn blocked_now(admin: &Client, ids: &[i64]) -> Vec<i64> {
    let mut args: Vec<Value> = vec!["LIST".into(), "ID".into()];
    args.extend(ids.iter().map(|id| Value::from(*id)));
    let list = raw(admin, "CLIENT", args).await;
    list.as_str()
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            let mut parts = line.split(' ');
            let blocked = parts
                .clone()
                .any(|part| part.strip_prefix("flags=").is_some_and(|f| f.contains('b')));
            blocked && parts.any(|part| part == "cmd=xreadgroup")
        })
        .filter_map(|line| {
            line.split(' ')
                .find_map(|part| part.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
        })
        .collect()
}

/// What the warnings logged on this thread while its guard lives said: for a test on a
/// current-thread runtime, whose consumers log on the test's thread.
#[derive(Clone, Default)]
pub(crate) struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Captures the warnings (and errors) logged on this thread until the guard is dropped.
    pub(crate) fn warnings() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // Else a warning another test reached first on its own thread could be lost here.
        cqrs_core::testing::scoped_subscribers_see_every_callsite();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub(crate) fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
