use crate::support::{TEST_LIMIT, TestHub, record};
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, EventTransport};
use cqrs_core::runtime::Runtime;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, PublishWorker};
use std::sync::Arc;
use std::time::Duration;

/// Events put on the durable transport reach subscribed clients through the worker, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_the_transport_reach_subscribers() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let transport = Arc::new(InMemoryTransport::new());
        let runtime = Runtime::builder()
            .worker(PublishWorker::new(
                t.hub.publisher(),
                transport.clone(),
                "events",
                "realtime",
                ConsumerOptions::default().block(Duration::from_millis(50)),
            ))
            .start();
        let mut client = t.connect("agent-a1").await;
        client.subscribe("ticket:t1").await;
        let records: Vec<_> = (1..=5).map(|seq| record("t1", "u1", seq)).collect();
        transport.publish("events", &records).await.unwrap();
        for seq in 1..=5 {
            assert_eq!(client.event().await.seq, seq);
        }
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}
