//! A group deleted while its consumer runs (`XGROUP DESTROY`, as an operator retires a group)
//! is created again by the consumer at the start of the stream, which hands out every entry
//! still there again: the consumer says so at warn level, naming the group, since an operator
//! who deleted it on purpose left a consumer running. Joining a group, which creates it too,
//! says nothing.

use crate::support::{Captured, Env, fetch_some, n_of, within};

// On the test's thread (a current-thread runtime), so the subscriber set for it sees the
// consumer's warning.
#[tokio::test]
async fn a_group_deleted_under_its_consumer_is_created_again_with_a_warning() {
    let Some(env) = Env::new("group-deleted").await else {
        return;
    };
    let (captured, _logs) = Captured::warnings();
    within(30, async {
        let topic = env.topic("events");
        let mut consumer = env.join(&topic, "c", |o| o).await;
        env.publish_one(&topic, "k", 1).await;
        let first = fetch_some(consumer.as_mut(), 10, "the first delivery").await;
        assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
        consumer
            .ack(&first.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(
            captured.text(),
            "",
            "joining creates the group without a word"
        );

        let stream = env.transport.stream_key(&topic).unwrap();
        env.command(
            "XGROUP",
            vec!["DESTROY".into(), stream.as_str().into(), "g".into()],
        )
        .await;
        let again = fetch_some(consumer.as_mut(), 10, "the entry delivered again").await;
        assert_eq!(
            again.iter().map(n_of).collect::<Vec<_>>(),
            [1],
            "the group made again starts at the start of the stream"
        );
        let warned = captured.text();
        assert!(
            warned.contains("created it again") && warned.contains("group=g"),
            "the consumer says what it did: {warned:?}"
        );
        assert_eq!(
            warned.matches("created it again").count(),
            1,
            "once: {warned:?}"
        );
    })
    .await;
    env.cleanup().await;
}
