//! Events to columns and rows to events.

use crate::error::{codec, store_error};
use cqrs_core::ports::StoreError;
use cqrs_core::{EventRecord, Position, RecordMetadata};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

/// A batch of events as one array per column, for `unnest` in `append_events`. Borrows the
/// payloads and metadata: sqlx encodes them when they are bound.
pub(crate) struct Columns<'a> {
    pub(crate) event_ids: Vec<Uuid>,
    pub(crate) event_types: Vec<&'a str>,
    pub(crate) schema_versions: Vec<i32>,
    pub(crate) payloads: Vec<Json<&'a serde_json::Value>>,
    pub(crate) metadata: Vec<Json<&'a RecordMetadata>>,
    pub(crate) partition_keys: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(records: &'a [EventRecord]) -> Result<Self, StoreError> {
        let mut columns = Columns {
            event_ids: Vec::with_capacity(records.len()),
            event_types: Vec::with_capacity(records.len()),
            schema_versions: Vec::with_capacity(records.len()),
            payloads: Vec::with_capacity(records.len()),
            metadata: Vec::with_capacity(records.len()),
            partition_keys: Vec::with_capacity(records.len()),
        };
        for r in records {
            columns.event_ids.push(r.event_id);
            columns.event_types.push(&r.event_type);
            columns.schema_versions.push(schema_version(r)?);
            columns.payloads.push(Json(&r.payload));
            columns.metadata.push(Json(&r.metadata));
            columns.partition_keys.push(r.partition_key.as_deref());
        }
        Ok(columns)
    }
}

/// The deepest nesting of arrays and objects a JSON value this crate alone reads back may
/// have (a snapshot's state, a stored response): what sqlx's decoding (`serde_json`, with its
/// recursion limit of 128) reads. `jsonb` takes deeper values; stored, they could never be
/// loaded again. The core's bound for a stored response, which every idempotency store keeps.
pub(crate) const MAX_JSON_DEPTH: usize = cqrs_core::ports::MAX_RESPONSE_DEPTH;

/// The deepest nesting an event payload may have: the core's bound for every store, less
/// than [`MAX_JSON_DEPTH`] for the envelopes other readers wrap around a payload and decode with
/// the same limit (the Redis transport's entry holds the whole record, one level more; a
/// pub/sub message or a realtime frame a level or two more).
pub(crate) const MAX_EVENT_PAYLOAD_DEPTH: usize = cqrs_core::ports::MAX_PAYLOAD_DEPTH;

/// Refuses a value nested deeper than `max_depth` as [`Rejected`](StoreError::Rejected),
/// saying what (`what`) and why. A value with client data inside (a form's JSON in an
/// event) could otherwise be appended, and then its stream would fail every load, and
/// `read_all` every page with it, for good.
pub(crate) fn readable_json(
    value: &serde_json::Value,
    max_depth: usize,
    what: impl FnOnce() -> String,
) -> Result<(), StoreError> {
    if !cqrs_core::ports::nests_deeper_than(value, max_depth) {
        return Ok(());
    }
    Err(StoreError::Rejected {
        backend: crate::error::BACKEND,
        source: format!(
            "{} nests arrays and objects more than {max_depth} deep: it could be stored but \
             never read back; flatten it or check the depth of client data",
            what()
        )
        .into(),
    })
}

/// An event's schema version as a Postgres integer.
pub(crate) fn schema_version(record: &EventRecord) -> Result<i32, StoreError> {
    i32::try_from(record.schema_version).map_err(|_| {
        codec(format!(
            "event {} has schema version {}, more than a Postgres integer holds",
            record.event_id, record.schema_version
        ))
    })
}

/// A stored event from a row of `EVENT_COLUMNS`.
pub(crate) fn event(row: &PgRow) -> Result<EventRecord, StoreError> {
    checked_event(row).map_err(RowError::into_store_error)
}

/// Why a row of `EVENT_COLUMNS` does not make an event.
#[derive(Debug)]
pub(crate) enum RowError {
    /// This row's content: a JSON column (`metadata`, `payload`) that serde cannot read as
    /// what an event needs, such as metadata without `correlation_id` written around the
    /// append functions. Other rows may well decode.
    Content(StoreError),
    /// The columns themselves: one missing, or of a type this build does not read (the schema
    /// migrated by another version of this crate). Every row fails alike.
    Columns(StoreError),
}

impl RowError {
    pub(crate) fn into_store_error(self) -> StoreError {
        match self {
            RowError::Content(e) | RowError::Columns(e) => e,
        }
    }
}

/// Reads one column; a serde failure inside a JSON value is the row's content, anything else
/// (a missing column, a type this build does not read) the columns'.
fn column<'r, T>(row: &'r PgRow, name: &str) -> Result<T, RowError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name).map_err(|error| {
        let content = matches!(
            &error,
            sqlx::Error::ColumnDecode { source, .. } if source.is::<serde_json::Error>()
        );
        if content {
            RowError::Content(store_error(error))
        } else {
            RowError::Columns(store_error(error))
        }
    })
}

/// A stored event from a row of `EVENT_COLUMNS`, telling a row whose content cannot be
/// decoded from columns that cannot be read at all.
pub(crate) fn checked_event(row: &PgRow) -> Result<EventRecord, RowError> {
    let position: i64 = column(row, "position")?;
    let stream_id: String = column(row, "stream_id")?;
    let stream_version: i64 = column(row, "stream_version")?;
    let event_id: Uuid = column(row, "event_id")?;
    let event_type: String = column(row, "event_type")?;
    let schema_version: i32 = column(row, "schema_version")?;
    let payload: serde_json::Value = column(row, "payload")?;
    let Json(metadata): Json<RecordMetadata> = column(row, "metadata")?;
    let partition_key: Option<String> = column(row, "partition_key")?;
    // Only a row written around the append functions holds a negative one: read as 0, it
    // would be upcast from the wrong version.
    let schema_version = u32::try_from(schema_version).map_err(|_| {
        RowError::Content(StoreError::Codec(
            format!(
                "event {event_id} has the schema version {schema_version}, below zero: the row \
                 was written around this crate's append functions"
            )
            .into(),
        ))
    })?;
    Ok(
        EventRecord::new(event_id, event_type, schema_version, payload, metadata)
            .with_partition_key(partition_key)
            .with_stream(stream_id, to_u64(stream_version))
            .with_position(Position::new(to_u64(position))),
    )
}

/// Positions, versions and counts are never negative in the tables; a negative one reads as 0.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A position or version as a bigint parameter: past `i64::MAX` nothing is stored anyway.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `levels` arrays, one inside the other, around a number.
    fn nested(levels: usize) -> serde_json::Value {
        // Built by hand: past its limit, `serde_json` reads no such text.
        let mut value = serde_json::json!(1);
        for _ in 0..levels {
            value = serde_json::Value::Array(vec![value]);
        }
        value
    }

    /// The limit is exactly what decoding reads back: one level more fails both.
    #[test]
    fn the_depth_limit_is_what_serde_json_reads_back() {
        for levels in [1, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH] {
            let value = nested(levels);
            assert!(
                readable_json(&value, MAX_JSON_DEPTH, || "v".into()).is_ok(),
                "{levels}"
            );
            let text = value.to_string();
            assert_eq!(
                text,
                format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
            );
            assert!(
                serde_json::from_str::<serde_json::Value>(&text).is_ok(),
                "{levels}"
            );
        }
        let too_deep = nested(MAX_JSON_DEPTH + 1);
        let refused =
            readable_json(&too_deep, MAX_JSON_DEPTH, || "event e's payload".into()).unwrap_err();
        assert_eq!(refused.kind(), cqrs_core::ErrorKind::Invalid);
        let why = std::error::Error::source(&refused).unwrap().to_string();
        assert!(
            why.contains("event e's payload nests arrays and objects more than 127"),
            "{why}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(&too_deep.to_string()).is_err());
        // An event payload at its limit still reads back inside a few envelopes.
        let payload = nested(MAX_EVENT_PAYLOAD_DEPTH);
        assert!(readable_json(&payload, MAX_EVENT_PAYLOAD_DEPTH, || "v".into()).is_ok());
        assert!(readable_json(&nested(101), MAX_EVENT_PAYLOAD_DEPTH, || "v".into()).is_err());
        let mut wrapped = payload;
        for _ in 0..MAX_JSON_DEPTH - MAX_EVENT_PAYLOAD_DEPTH {
            wrapped = serde_json::json!({ "event": wrapped });
        }
        assert!(serde_json::from_str::<serde_json::Value>(&wrapped.to_string()).is_ok());
        // Objects count as arrays do, and a value far deeper than a recursive walk would take
        // is refused without overflowing the stack.
        let object = serde_json::json!({ "a": nested(MAX_JSON_DEPTH) });
        assert!(readable_json(&object, MAX_JSON_DEPTH, || "v".into()).is_err());
        let abyss = nested(200_000);
        assert!(readable_json(&abyss, MAX_JSON_DEPTH, || "v".into()).is_err());
        // Taken apart level by level: dropping it whole recurses past the thread's stack.
        let mut value = abyss;
        while let serde_json::Value::Array(mut items) = value {
            value = items.pop().unwrap_or_default();
        }
    }
}
