//! `StreamMaintenance`'s gauges show what is known, never a stale value: a group's lag that
//! Redis cannot tell (Redis 7.0, after an entry in the middle of the stream was deleted)
//! becomes NaN, and the gauges of a group deleted since the last round 0 (nothing pending,
//! nothing to read: a NaN kept for good set off every `x != x` alert); and a trim that fails (a
//! user not allowed to run scripts) neither skips the topic's gauges nor hides the failure,
//! nor does a failed trim of the dead letters alone.

use crate::support::{
    Env, acl_user, delete_stale_users, plain_redis_host, raw, stream_options, within,
};
use cqrs_redis::{ConnectionOptions, StreamMaintenance};
use fred::types::Value;
use metrics::{
    Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps each gauge's last value, by `name{k=v,...}`.
#[derive(Debug, Default)]
struct Gauges(Mutex<BTreeMap<String, Arc<Slot>>>);

#[derive(Debug, Default)]
struct Slot(AtomicU64);

impl GaugeFn for Slot {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::SeqCst)) + value);
    }
    fn decrement(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::SeqCst)) - value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

impl Gauges {
    /// The gauge's last value; `None` when never set.
    fn get(&self, name: &str) -> Option<f64> {
        let map = self.0.lock().unwrap();
        map.get(name)
            .map(|slot| f64::from_bits(slot.0.load(Ordering::SeqCst)))
    }
}

impl Recorder for Gauges {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut map = self.0.lock().unwrap();
        // Unset until set: NaN bits would be taken for "unknown".
        let slot = map
            .entry(name)
            .or_insert_with(|| Arc::new(Slot(AtomicU64::new(f64::INFINITY.to_bits()))));
        Gauge::from_arc(slot.clone())
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn maintenance_gauges_never_keep_a_stale_value() {
    let gauges = Gauges::default();
    // The recorder is this thread's only: a current-thread runtime runs the rounds here.
    metrics::with_local_recorder(&gauges, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario(&gauges));
    });
}

async fn scenario(gauges: &Gauges) {
    let Some(env) = Env::new("gauges").await else {
        return;
    };
    let Some(host) = plain_redis_host() else {
        env.cleanup().await;
        return;
    };
    let user = acl_user(&env.admin, &env.id).await;
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut ids = Vec::new();
            for n in 0..3 {
                let id = env
                    .command(
                        "XADD",
                        vec![stream.as_str().into(), "*".into(), "n".into(), n.into()],
                    )
                    .await;
                ids.push(id.into_string().unwrap());
            }
            for group in ["g", "h"] {
                env.command(
                    "XGROUP",
                    vec![
                        "CREATE".into(),
                        stream.as_str().into(),
                        group.into(),
                        "0".into(),
                    ],
                )
                .await;
            }
            let maintenance = StreamMaintenance::new(env.transport.clone(), [topic.clone()]);
            let gauge = |name: &str, group: &str| {
                gauges.get(&format!("{name}{{topic={topic},group={group}}}"))
            };
            let length = || gauges.get(&format!("cqrs_redis_stream_length{{topic={topic}}}"));

            maintenance.run_once().await.unwrap();
            assert_eq!(gauge("cqrs_redis_group_lag", "g"), Some(3.0));
            assert_eq!(gauge("cqrs_redis_group_lag", "h"), Some(3.0));
            assert_eq!(gauge("cqrs_redis_group_pending", "h"), Some(0.0));
            assert_eq!(length(), Some(3.0));

            // An entry deleted in the middle: Redis 7.0 can no longer tell the lag.
            env.command("XDEL", vec![stream.as_str().into(), ids[1].as_str().into()])
                .await;
            let stats = env.transport.topic_stats(&topic).await.unwrap();
            let lag_of_g = stats.groups.iter().find(|g| g.name == "g").unwrap().lag;
            // A group deleted since the last round.
            env.command(
                "XGROUP",
                vec!["DESTROY".into(), stream.as_str().into(), "h".into()],
            )
            .await;
            maintenance.run_once().await.unwrap();
            match lag_of_g {
                None => assert!(
                    gauge("cqrs_redis_group_lag", "g").unwrap().is_nan(),
                    "an unknown lag is NaN, not the last value: {:?}",
                    gauge("cqrs_redis_group_lag", "g")
                ),
                // A server that still tells the lag (not Redis 7.0).
                Some(lag) => assert_eq!(gauge("cqrs_redis_group_lag", "g"), Some(lag as f64)),
            }
            for name in ["cqrs_redis_group_lag", "cqrs_redis_group_pending"] {
                let value = gauge(name, "h").unwrap();
                assert_eq!(value, 0.0, "{name} of a deleted group");
            }
            assert_eq!(length(), Some(2.0));

            // A user who may not run scripts: the trim (and the pruning) fail, the gauges are
            // still recorded, and the round reports the failure.
            delete_stale_users(&env.admin, "cqrs-test-gauges_").await;
            let acl: Vec<Value> = [
                "SETUSER", &user, "on", "nopass", "+@all", "-evalsha", "-eval",
            ]
            .into_iter()
            .chain(["~*", "&*"])
            .map(Value::from)
            .collect();
            raw(&env.admin, "ACL", acl).await;
            // Logged in as the limited user (no credentials of `REDIS_URL`).
            let url = format!("redis://{user}:x@{host}");
            let limited = stream_options(&env.id)
                .connection(
                    ConnectionOptions::new(url)
                        .command_timeout(Duration::from_secs(2))
                        .connect_timeout(Duration::from_secs(2)),
                )
                .connect()
                .await
                .expect("connect as the limited user");
            let limited = StreamMaintenance::new(limited, [topic.clone()]);
            env.command(
                "XADD",
                vec![stream.as_str().into(), "*".into(), "n".into(), 3.into()],
            )
            .await;
            let failure = limited.run_once().await;
            assert!(failure.is_err(), "a failed trim is reported");
            assert_eq!(
                length(),
                Some(3.0),
                "the gauges are recorded despite the failed trim"
            );

            // A user who may trim the stream but only read its dead letters: every step
            // but the dead letters' trim succeeds, and the round still reports the failure.
            let base = stream
                .strip_suffix(":stream")
                .expect("{prefix}:{topic}:stream");
            let acl: Vec<Value> = ["SETUSER", &user, "reset", "on", "nopass", "+@all", "&*"]
                .into_iter()
                .map(str::to_owned)
                .chain(
                    ["stream", "lanes", "ordering", "errors:*"].map(|key| format!("~{base}:{key}")),
                )
                .chain([format!("%R~{base}:dead")])
                .map(Value::from)
                .collect();
            raw(&env.admin, "ACL", acl).await;
            let read_only_dead_letters = stream_options(&env.id)
                .connection(
                    ConnectionOptions::new(format!("redis://{user}:x@{host}"))
                        .command_timeout(Duration::from_secs(2))
                        .connect_timeout(Duration::from_secs(2)),
                )
                .connect()
                .await
                .expect("connect as the user who may only read dead letters");
            let ok = read_only_dead_letters.trim(&topic).await;
            assert!(ok.is_ok(), "this user may trim the stream: {ok:?}");
            let maintenance = StreamMaintenance::new(read_only_dead_letters, [topic.clone()]);
            let failure = maintenance.run_once().await;
            assert!(failure.is_err(), "a failed dead-letter trim is reported");
        }),
    )
    .await;
    raw(
        &env.admin,
        "ACL",
        vec!["DELUSER".into(), user.as_str().into()],
    )
    .await;
    env.cleanup().await;
}
