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

/// Written by hand, and registered by no `EventTypes`: named for the build by the macro.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct NamedByTheMacro {}
impl cqrs_core::Message for NamedByTheMacro {
    const NAME: &'static str = "test.named_by_the_macro";
}
impl cqrs_core::Event for NamedByTheMacro {}
cqrs_core::register_event_type!(NamedByTheMacro);

/// Written by hand and named nowhere: registered in an `EventTypes`, but not in the build's
/// list, which is decided at link time.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct RegisteredElsewhere {}
impl cqrs_core::Message for RegisteredElsewhere {
    const NAME: &'static str = "test.registered_elsewhere";
}
impl cqrs_core::Event for RegisteredElsewhere {}

/// Derived: in the build's list by the derive.
#[expect(dead_code, reason = "only the name its derive lists is used")]
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, cqrs_core::Event)]
#[cqrs(name = "test.derived_elsewhere")]
struct DerivedElsewhere {}

// A retired type, its events still stored: listed by name.
cqrs_core::register_event_type!(name = "test.retired_but_stored");

/// `AwaitNewerBuild` skips an event whose type another part of the build knows (derived, or
/// listed by `register_event_type!`, by type or by name), and fails on one no part of it
/// knows, as `Fail` does (registering a type in another `EventTypes` does not list it).
#[test]
fn await_newer_build_skips_what_the_build_knows_and_waits_on_the_rest() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    types.unknown_events(UnknownEventPolicy::AwaitNewerBuild);
    for known in [
        "test.derived_elsewhere",
        "test.named_by_the_macro",
        "test.retired_but_stored",
    ] {
        assert!(EventTypes::in_this_build(known), "{known}");
        assert!(
            types
                .decode(&stored(known, 1, json!({})))
                .unwrap()
                .is_none(),
            "{known} is skipped"
        );
    }
    let hand_written = stored("test.registered_elsewhere", 1, json!({}));
    EventTypes::new().register::<RegisteredElsewhere>();
    assert!(!EventTypes::in_this_build("test.registered_elsewhere"));
    assert!(matches!(
        types.decode(&hand_written),
        Err(DecodeError::NotInThisBuild { .. })
    ));

    let newer = stored("test.from_a_newer_build", 1, json!({}));
    let err = types.decode(&newer).unwrap_err();
    assert!(matches!(err, DecodeError::NotInThisBuild { .. }), "{err}");
    assert!(
        err.to_string().starts_with(
            "event type `test.from_a_newer_build` (schema version 1) is in no part of this build"
        ) && err
            .to_string()
            .contains(r#"register_event_type!(name = "test.from_a_newer_build")"#),
        "{err}"
    );
    assert!(
        types
            .decode(&stored("test.added", 1, json!({"sum": 1})))
            .unwrap()
            .is_some()
    );
}

/// `Skip` warns (once a minute per type at most); `Ignore` skips the same, saying so at
/// `debug` only (a topic
/// carrying other plugins' events would otherwise warn on each of theirs).
#[test]
fn ignore_skips_an_unknown_event_without_a_warning() {
    let (_, events) = crate::the_tracing_layer_opens_a_span_per_dispatch::recorder();
    // The level of each line said about `event_type`.
    let said = |event_type: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|(fields, _)| fields.get("event_type").map(String::as_str) == Some(event_type))
            .map(|(fields, _)| fields["@level"].clone())
            .collect::<Vec<_>>()
    };
    let mut types = EventTypes::new();
    types.register::<Added>();
    let skipped = stored("test.skipped_here", 1, json!({}));
    assert!(types.decode(&skipped).unwrap().is_none());
    assert_eq!(said("test.skipped_here"), ["WARN"]);

    types.unknown_events(UnknownEventPolicy::Ignore);
    let ignored = stored("test.ignored_here", 1, json!({}));
    assert!(types.decode(&ignored).unwrap().is_none(), "skipped");
    assert_eq!(
        said("test.ignored_here"),
        ["DEBUG"],
        "a debug line, no warning"
    );
    // Known types decode as before.
    assert!(
        types
            .decode(&stored("test.added", 1, json!({"sum": 1})))
            .unwrap()
            .is_some()
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

/// Another type under `Added`'s wire name.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Impostor {
    pub sum: String,
}

impl cqrs_core::Message for Impostor {
    const NAME: &'static str = "test.added";
}

impl cqrs_core::Event for Impostor {}

/// Two types under one wire name would replace each other silently, and records of one would
/// decode as the other: registering the second is a programming error, caught at start-up.
#[test]
#[should_panic(
    expected = "two event types share the wire name `test.added`: `it::fixtures::Added` and `it::old_and_unknown_events_follow_the_stated_policy::Impostor`; give each a unique NAME"
)]
fn a_wire_name_taken_by_another_type_is_refused() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    types.register::<Impostor>();
}

#[test]
fn registering_a_type_twice_is_harmless() {
    let mut types = EventTypes::new();
    types.register::<Added>().register::<Added>();
    let envelope = types
        .decode(&stored("test.added", 1, json!({"sum": 1})))
        .unwrap()
        .unwrap();
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 1 }));
}

/// At version 3: version 1 had `text`, version 2 `body`, version 3 `body` and `edited`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Noted {
    pub body: String,
    pub edited: bool,
}

impl cqrs_core::Message for Noted {
    const NAME: &'static str = "test.noted";
}

impl cqrs_core::Event for Noted {
    const VERSION: u32 = 3;
}

/// A gap in an upcaster chain is found at start-up, not when an event of the missing version
/// comes.
#[test]
fn validate_finds_a_gap_in_an_upcaster_chain() {
    let mut types = EventTypes::new();
    types.register::<Added>().register::<Noted>();
    types.validate().expect("no upcasters, no gap");
    types.upcaster("test.noted", 1, |mut v| {
        Ok(json!({ "body": v["text"].take() }))
    });
    let err = types.validate().unwrap_err();
    assert!(
        matches!(&err, DecodeError::UpcasterGap { event_type, missing: 2, lowest: 1, current: 3 } if event_type == "test.noted"),
        "{err}"
    );
    assert!(
        err.to_string().starts_with(
            "the upcasters of event `test.noted` have a gap: none takes schema version 2"
        ),
        "a gap found at start-up is told as one, not as a stored event's: {err}"
    );
    types.upcaster("test.noted", 2, |mut v| {
        v["edited"] = json!(false);
        Ok(v)
    });
    types.validate().expect("complete from 1 to 3");
    // One from the current version never runs: VERSION did not go up with it.
    let mut ahead = types.clone();
    ahead.upcaster("test.noted", 3, Ok);
    let err = ahead.validate().unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnreachableUpcaster { event_type, from: 3, current: 3 } if event_type == "test.noted"),
        "{err}"
    );
    assert!(
        err.to_string().contains("raise the type's VERSION to 4"),
        "{err}"
    );
    // Told without overflowing, from the last version there is.
    let mut last = types.clone();
    last.upcaster("test.noted", u32::MAX, Ok);
    let err = last.validate().unwrap_err();
    assert!(
        err.to_string()
            .contains("raise the type's VERSION to 4294967296"),
        "{err}"
    );
    let envelope = types
        .decode(&stored("test.noted", 1, json!({"text": "hi"})))
        .unwrap()
        .unwrap();
    assert_eq!(
        envelope.downcast_ref::<Noted>(),
        Some(&Noted {
            body: "hi".into(),
            edited: false
        })
    );
}

/// An upcaster's error is kept as the source of `DecodeError::Upcast`: `?` works in it.
#[test]
fn a_failing_upcaster_keeps_its_error_as_the_source() {
    #[derive(serde::Deserialize)]
    struct V0 {
        total: u64,
    }
    let mut types = EventTypes::new();
    types.register::<Added>();
    types.upcaster("test.added", 0, |v| {
        let old: V0 = serde_json::from_value(v)?;
        Ok(json!({ "sum": old.total }))
    });
    let err = types
        .decode(&stored("test.added", 0, json!({"total": "three"})))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Upcast { from: 0, .. }), "{err}");
    let source = std::error::Error::source(&err).expect("a source");
    assert!(source.is::<serde_json::Error>(), "{source}");
}

/// An upcaster that panics fails its event as one that returns an error, naming the panic:
/// nothing unwinds into the aggregate's loader or a consumer, which would blame its handler.
#[test]
fn a_panicking_upcaster_is_a_decode_error() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    types.upcaster("test.added", 0, |v| {
        let total = v["total"].as_u64().expect("an old payload has a total");
        Ok(json!({ "sum": total }))
    });
    let err = types
        .decode(&stored("test.added", 0, json!({})))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Upcast { from: 0, .. }), "{err}");
    assert!(
        err.to_string()
            .contains("the upcaster panicked: an old payload has a total"),
        "{err}"
    );
    let ok = types
        .decode(&stored("test.added", 0, json!({"total": 2})))
        .unwrap()
        .unwrap();
    assert_eq!(ok.downcast_ref::<Added>(), Some(&Added { sum: 2 }));
}

/// An event whose `Deserialize` panics on a stored payload (a `deserialize_with` that unwraps)
/// is a decode error naming the panic, like one that does not match its type: no reader
/// unwinds, so a relay feeding the event bus skips it instead of stopping at it for good.
#[test]
fn a_panicking_deserialize_is_a_decode_error() {
    fn strict<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let n = <u64 as serde::Deserialize>::deserialize(d)?;
        assert!(n != 0, "zero is not a count");
        Ok(n)
    }
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Counted {
        #[serde(deserialize_with = "strict")]
        count: u64,
    }
    impl cqrs_core::Message for Counted {
        const NAME: &'static str = "test.counted";
    }
    impl cqrs_core::Event for Counted {}

    let mut types = EventTypes::new();
    types.register::<Counted>();
    let err = types
        .decode(&stored("test.counted", 1, json!({"count": 0})))
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::Payload { event_type, .. } if event_type == "test.counted"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("its Deserialize panicked: zero is not a count"),
        "{err}"
    );
    let ok = types
        .decode(&stored("test.counted", 1, json!({"count": 2})))
        .unwrap()
        .unwrap();
    assert_eq!(ok.downcast_ref::<Counted>(), Some(&Counted { count: 2 }));
}

/// A projection's types come from the event sets it reads, not from a hand list.
#[test]
fn the_types_of_an_event_set_are_registered_together() {
    cqrs_core::event_set! {
        pub enum Notes {
            Added(Added),
            Noted(Noted),
        }
    }
    let types = EventTypes::of::<Notes>();
    assert!(types.knows("test.added") && types.knows("test.noted"));
    let mut more = EventTypes::new();
    more.register_set::<Notes>().merge(&types);
    assert!(more.knows("test.noted"));
}

/// A producer that writes ever new type names (`E1`, `E2`, ...) does not make ever new metric
/// series: the first few distinct unknown names are labels of their own, the rest share one.
#[test]
fn ever_new_unknown_event_types_make_a_bounded_number_of_metric_labels() {
    let types = EventTypes::new();
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        for n in 0..10_000 {
            let record = stored(&format!("E{n}"), 1, json!({}));
            assert!(types.decode(&record).unwrap().is_none(), "skipped");
        }
    });
    // The `event_type` label values of `cqrs_events_unknown_total`.
    let labels: std::collections::HashSet<String> = counts
        .series()
        .iter()
        .filter_map(|series| series.strip_prefix("cqrs_events_unknown_total{event_type="))
        .map(|rest| rest.trim_end_matches('}').to_owned())
        .collect();
    // 64 names and "other" (other tests of this binary count their unknown names too).
    assert!(
        labels.len() <= 65,
        "{} distinct labels for 10,000 unknown type names",
        labels.len()
    );
    assert!(labels.contains("other"), "{labels:?}");
}

struct ImpostorHandler;

#[async_trait::async_trait]
impl cqrs_core::EventHandler<Impostor> for ImpostorHandler {
    async fn handle(
        &self,
        _event: &Impostor,
        _ctx: cqrs_core::EventContext<'_>,
    ) -> Result<(), cqrs_core::HandlerError> {
        Ok(())
    }
}

/// An event bus with handlers of two types under one wire name refuses to build, telling the
/// collision once however many handlers each type has.
#[test]
fn an_event_bus_tells_a_shared_wire_name_once() {
    let err = cqrs_core::EventBus::builder()
        .handler::<Added, _>(Counter::named("first"))
        .handler::<Impostor, _>(ImpostorHandler)
        .handler::<Added, _>(Counter::named("second"))
        .build()
        .unwrap_err()
        .to_string();
    assert_eq!(
        err.matches("share the wire name `test.added`").count(),
        1,
        "{err}"
    );
}

/// An unknown type, read from a peer's entry or a stored row, is logged escaped: a line break
/// in it cannot start a forged line of a plain-text log.
#[test]
fn an_unknown_event_type_is_logged_escaped() {
    let (_, events) = crate::the_tracing_layer_opens_a_span_per_dispatch::recorder();
    let mut types = EventTypes::new();
    types.register::<Added>();
    let forged = stored("test.forged\nERROR a line of its own", 1, json!({}));
    assert!(types.decode(&forged).unwrap().is_none());
    let logged: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(fields, _)| fields.get("event_type").cloned())
        .filter(|t| t.starts_with("test.forged"))
        .collect();
    assert_eq!(logged, [r"test.forged\nERROR a line of its own"]);
}

/// Events stored under a type's old wire name decode as the renamed type, through the new
/// name's upcasters from the version they were written at; a record under the new name is
/// read as before, and `knows` answers for the old name.
#[test]
fn a_renamed_type_reads_its_events_stored_under_the_old_name() {
    let mut types = EventTypes::new();
    types.register::<Added>();
    assert!(!types.knows("test.summed"));
    types.rename("test.summed", "test.added");
    types.validate().unwrap();
    assert!(types.knows("test.summed"));
    let envelope = types
        .decode(&stored("test.summed", 1, json!({"sum": 2})))
        .unwrap()
        .expect("read as Added");
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 2 }));
    let envelope = types
        .decode(&stored("test.added", 1, json!({"sum": 5})))
        .unwrap()
        .unwrap();
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 5 }));

    // An older version under the old name runs the new name's chain, and its errors name
    // the new name, under which the upcaster is registered.
    let err = types
        .decode(&stored("test.summed", 0, json!({"total": 3})))
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::MissingUpcaster { event_type, found: 0 } if event_type == "test.added"),
        "{err}"
    );
    types.upcaster("test.added", 0, |mut v| {
        Ok(json!({ "sum": v["total"].take() }))
    });
    let envelope = types
        .decode(&stored("test.summed", 0, json!({"total": 3})))
        .unwrap()
        .unwrap();
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 3 }));

    // Renames chain, and travel with `merge`.
    let mut older = EventTypes::new();
    older.rename("test.counted", "test.summed");
    let mut merged = EventTypes::new();
    merged.merge(&types).merge(&older);
    merged.validate().unwrap();
    let envelope = merged
        .decode(&stored("test.counted", 1, json!({"sum": 4})))
        .unwrap()
        .unwrap();
    assert_eq!(envelope.downcast_ref::<Added>(), Some(&Added { sum: 4 }));
}

/// A rename that never applies (its old name registered too) or leads back to itself fails
/// `validate` at start-up; a rename to a type not registered here is left to the unknown
/// policy, as its events would be.
#[test]
fn validate_refuses_a_rename_that_never_applies_or_never_ends() {
    let mut shadowed = EventTypes::new();
    shadowed
        .register::<Added>()
        .rename("test.added", "test.other");
    let err = shadowed.validate().unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidRename { from, .. } if from == "test.added"),
        "{err}"
    );
    assert!(err.to_string().contains("never applies"), "{err}");

    let mut cycle = EventTypes::new();
    cycle.rename("a", "b").rename("b", "c").rename("c", "a");
    let err = cycle.validate().unwrap_err();
    assert!(err.to_string().contains("lead back"), "{err}");
    // Decoding through the cycle ends, as an unknown type.
    assert!(cycle.decode(&stored("a", 1, json!({}))).unwrap().is_none());

    let mut elsewhere = EventTypes::new();
    elsewhere.rename("test.summed", "test.not_here");
    elsewhere.validate().unwrap();
    assert!(!elsewhere.knows("test.summed"));
    elsewhere.unknown_events(UnknownEventPolicy::Fail);
    let err = elsewhere
        .decode(&stored("test.summed", 1, json!({})))
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownType { event_type, .. } if event_type == "test.summed"),
        "{err}"
    );
}

/// A reader under `AwaitNewerBuild` that does not take a renamed type passes its events stored
/// under the old name over when its renames lead to a type of this build, as it passes the new
/// name's; without the rename, or the old name listed for the build, it waits on them.
#[test]
fn await_newer_build_passes_over_old_names_its_renames_lead_into_the_build() {
    let old = stored("test.derived_before_its_rename", 1, json!({}));
    let mut without = EventTypes::new();
    without.unknown_events(UnknownEventPolicy::AwaitNewerBuild);
    assert!(matches!(
        without.decode(&old),
        Err(DecodeError::NotInThisBuild { .. })
    ));
    let mut renamed = without.clone();
    renamed.rename("test.derived_before_its_rename", "test.derived_elsewhere");
    renamed.validate().unwrap();
    assert!(
        !renamed.knows("test.derived_before_its_rename"),
        "not registered here"
    );
    assert!(renamed.decode(&old).unwrap().is_none(), "passed over");
}

/// One old name renamed to two names is refused where the second comes, merges included.
#[test]
#[should_panic(expected = "event type `test.summed` is renamed twice")]
fn one_old_name_renamed_two_ways_is_refused() {
    let mut a = EventTypes::new();
    a.rename("test.summed", "test.added");
    let mut b = EventTypes::new();
    b.rename("test.summed", "test.other");
    a.merge(&b);
}
