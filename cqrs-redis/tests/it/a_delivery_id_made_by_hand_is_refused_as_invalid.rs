//! `ack`, `nack` and `keep_alive` of an id that is no stream entry id (made by hand, or another
//! transport's) were sent to Redis, which refused the whole command with its own words
//! (`ERR Invalid stream ID ... @user_script`), reported as a backend failure: a caller's mistake
//! read as Redis's.

use crate::support::{Env, within};
use cqrs_core::ports::{ConsumerOptions, DeliveryId, EventTransport, TransportError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_id_made_by_hand_is_refused_as_invalid() {
    let Some(env) = Env::new("delivery_id_by_hand").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let mut consumer = env
                .transport
                .consumer("t", "g", ConsumerOptions::default())
                .await
                .unwrap();
            let garbage = DeliveryId("garbage".into());
            let good = DeliveryId("1-0".into());
            let refused = [
                consumer.ack(&[good.clone(), garbage.clone()]).await,
                consumer.nack(&garbage).await,
                consumer.keep_alive(std::slice::from_ref(&garbage)).await,
                consumer.defer(&[good.clone(), garbage.clone()]).await,
                consumer.dead_letter(&garbage, "given up").await,
                consumer.nack_with_reason(&garbage, "failed").await,
            ];
            for refused in refused {
                match refused {
                    Err(TransportError::Invalid(why)) => assert!(
                        why.starts_with("`garbage` is no delivery id of this transport"),
                        "{why}"
                    ),
                    other => panic!("refused as invalid, not {other:?}"),
                }
            }
            // A well-formed id this consumer was never handed is no mistake of that kind.
            consumer.ack(&[good]).await.unwrap();
            consumer.close().await.unwrap();
        }),
    )
    .await;
}
