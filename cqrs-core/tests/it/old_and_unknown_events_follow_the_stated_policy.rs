use crate::fixtures::*;
use cqrs_core::{
    DecodeError, EventRecord, EventTypes, Metadata, RecordMetadata, UnknownEventPolicy,
};
use serde_json::json;

fn stored(event_type: &str, version: u32, payload: serde_json::Value) -> EventRecord {
    let m = Metadata::new();
    EventRecord::new(
        m.message_id,
        event_type,
        version,
        payload,
        RecordMetadata::from_metadata(&m),
    )
}

/// `Added` is at version 1 in the fixtures; pretend an old version 0 called the field `total`.
#[test]
fn an_upcaster_chain_turns_an_old_payload_into_the_current_type() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    let err = types
        .decode(&stored("test.added", 0, json!({"total": 3})))
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::MissingUpcaster { found: 0, .. }),
        "{err}"
    );
    types.upcaster("test.added", 0, |mut v| {
        Ok(json!({ "sum": v["total"].take() }))
    });
    let envelope = types
        .decode(&stored("test.added", 0, json!({"total": 3})))
        .unwrap()
        .unwrap();
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 3 }));
}

#[test]
fn a_failing_upcaster_and_a_future_version_are_typed_errors() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    types.upcaster("test.added", 0, |_| Err("no total field".into()));
    let err = types
        .decode(&stored("test.added", 0, json!({})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "upcasting event `test.added` from schema version 0 failed: no total field"
    );
    let err = types
        .decode(&stored("test.added", 2, json!({"sum": 1})))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FutureVersion {
                found: 2,
                current: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = types
        .decode(&stored("test.added", 1, json!({"sum": "three"})))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Payload { .. }), "{err}");
}

#[test]
fn an_unknown_event_type_is_skipped_or_fails_by_policy() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    let from_the_future = stored("test.multiplied", 1, json!({"product": 6}));
    assert_eq!(types.policy(), UnknownEventPolicy::Skip);
    assert!(types.decode(&from_the_future).unwrap().is_none(), "skipped");
    types.unknown_events(UnknownEventPolicy::Fail);
    let err = types.decode(&from_the_future).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("unknown event type `test.multiplied`"),
        "{err}"
    );
}

#[test]
fn a_decoded_event_keeps_its_ids_and_where_it_is_stored() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    let record = stored("test.added", 1, json!({"sum": 1}))
        .with_partition_key(Some("k".into()))
        .with_stream("sums-1", 4)
        .with_position(cqrs_core::Position::new(17));
    let envelope = types.decode(&record).unwrap().unwrap();
    assert_eq!(envelope.metadata.message_id, record.event_id);
    assert_eq!(
        envelope.metadata.correlation_id,
        record.metadata.correlation_id
    );
    assert_eq!(envelope.partition_key(), Some("k"));
    assert_eq!(envelope.stream_id(), Some("sums-1"));
    assert_eq!(envelope.stream_version(), Some(4));
    assert_eq!(envelope.position(), Some(cqrs_core::Position::new(17)));
    assert_eq!(
        EventRecord::from_envelope(&envelope).unwrap(),
        record,
        "round trip"
    );
}
