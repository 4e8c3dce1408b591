//! A consumer name already in use is refused with the usual cause and the fix: one
//! `ConsumerOptions` (its default name drawn once) reused for two consumers.

use cqrs_core::ErrorKind;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, EventTransport};

#[tokio::test]
async fn a_reused_consumer_name_says_how_to_fix_it() {
    let transport = InMemoryTransport::new();
    let options = ConsumerOptions::default();
    let _first = transport
        .consumer("tickets", "g", options.clone())
        .await
        .expect("the first consumer");
    let Err(error) = transport.consumer("tickets", "g", options.clone()).await else {
        panic!("two live consumers with one name");
    };
    assert_eq!(error.kind(), ErrorKind::Invalid);
    let message = error.to_string();
    for part in [
        options.consumer_name.as_str(),
        "one `ConsumerOptions` reused for two consumers",
        "build a fresh `ConsumerOptions::default()` for each consumer",
        "distinct `.consumer_name(..)`",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    transport
        .consumer("tickets", "g", ConsumerOptions::default())
        .await
        .expect("fresh options draw a new name");
}
