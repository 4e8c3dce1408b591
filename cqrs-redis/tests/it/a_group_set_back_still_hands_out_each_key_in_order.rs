//! A consumer hands out an entry whose predecessor it acknowledged itself without asking
//! Redis; that must not outlive a group set back (`XGROUP SETID`) or created again
//! (`XGROUP DESTROY`, or a server restarted without persistence): the acknowledged entry is
//! then delivered again, pending elsewhere, and its successor waits for it.

use crate::support::{Env, n_of, within};
use cqrs_core::ports::{Consumer, ConsumerOptions};
use std::time::Duration;

/// Long enough that no fetch of the test reclaims (which would run the gate script anyway):
/// the consumers look for redeliveries only every second.
fn options(o: ConsumerOptions) -> ConsumerOptions {
    o.redelivery_delay(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_waits_for_its_predecessor_delivered_again_after_setid() {
    let Some(env) = Env::new("setid-order").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            set_back_then_check(&env, &topic, || async {
                env.command(
                    "XGROUP",
                    vec![
                        "SETID".into(),
                        stream.as_str().into(),
                        "g".into(),
                        "0".into(),
                    ],
                )
                .await;
            })
            .await;
        }),
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_waits_for_its_predecessor_delivered_again_by_a_new_group() {
    let Some(env) = Env::new("recreate-order").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // The next fetch finds the group gone and creates it again at `0`.
            set_back_then_check(&env, &topic, || async {
                env.command(
                    "XGROUP",
                    vec!["DESTROY".into(), stream.as_str().into(), "g".into()],
                )
                .await;
            })
            .await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// `a` handles and acknowledges event 1 of key `k`; event 2 follows; `set_back` makes the
/// group deliver event 1 again, which `b` takes. `a` must hold event 2 back until `b`
/// acknowledged event 1, then hand it out.
async fn set_back_then_check<F, Fut>(env: &Env, topic: &str, set_back: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut a = env.join(topic, "a", options).await;
    let mut b = env.join(topic, "b", options).await;
    env.publish_one(topic, "k", 1).await;
    let first = a.fetch(10).await.unwrap();
    assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
    a.ack(std::slice::from_ref(&first[0].id)).await.unwrap();
    env.publish_one(topic, "k", 2).await;
    set_back().await;
    let again = b.fetch(1).await.unwrap();
    assert_eq!(again.iter().map(n_of).collect::<Vec<_>>(), [1]);

    let early = a.fetch(10).await.unwrap();
    assert!(
        early.is_empty(),
        "event 2 handed out while event 1 is pending again: {:?}",
        early.iter().map(n_of).collect::<Vec<_>>()
    );
    b.ack(std::slice::from_ref(&again[0].id)).await.unwrap();
    assert_eq!(fetch_some(a.as_mut()).await, [2]);
}

/// Fetches until a batch is not empty, for up to 10 s; its event numbers.
async fn fetch_some(consumer: &mut dyn Consumer) -> Vec<u64> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = consumer.fetch(10).await.unwrap();
        if !got.is_empty() {
            return got.iter().map(n_of).collect();
        }
        assert!(tokio::time::Instant::now() < until, "nothing fetched");
    }
}
