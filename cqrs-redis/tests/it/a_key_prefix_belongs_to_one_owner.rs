//! Two deployments that share a key prefix by mistake would read each other's events: the
//! first to claim the prefix owns it, and another owner's claim is refused, saying what to do.

use crate::support::{Env, key_prefix, stream_options, within};
use cqrs_core::ports::TransportError;
use fred::interfaces::KeysInterface;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_owner_of_a_key_prefix_is_refused() {
    let Some(env) = Env::new("prefix_owner").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            env.transport
                .claim_prefix("db one, schema a")
                .await
                .expect("the first claim takes the prefix");
            env.transport
                .claim_prefix("db one, schema a")
                .await
                .expect("its owner claims it again (a restart, another instance)");
            let other = stream_options(&env.id).connect().await.unwrap();
            let key = format!("{}:owner", key_prefix(&env.id));
            assert_eq!(
                other.prefix_owner().await.unwrap().as_deref(),
                Some("db one, schema a")
            );
            match other.claim_prefix("db one, schema b").await {
                Err(TransportError::Invalid(why)) => assert!(
                    why.contains("belongs to `db one, schema a`, not to `db one, schema b`")
                        && why.contains(&format!("delete the key `{key}`")),
                    "{why}"
                ),
                other => panic!("refused, not {other:?}"),
            }
            assert!(matches!(
                other.claim_prefix("").await,
                Err(TransportError::Invalid(_))
            ));
            // Released by deleting the key, as the error says.
            let _: i64 = env.admin.del(&key).await.unwrap();
            assert_eq!(other.prefix_owner().await.unwrap(), None);
            other
                .claim_prefix("db one, schema b")
                .await
                .expect("the prefix is free again");
            let _: i64 = env.admin.del(&key).await.unwrap();
        }),
    )
    .await;
}
