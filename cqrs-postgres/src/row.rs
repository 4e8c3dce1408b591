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
    let position: i64 = row.try_get("position").map_err(store_error)?;
    let stream_id: String = row.try_get("stream_id").map_err(store_error)?;
    let stream_version: i64 = row.try_get("stream_version").map_err(store_error)?;
    let event_id: Uuid = row.try_get("event_id").map_err(store_error)?;
    let event_type: String = row.try_get("event_type").map_err(store_error)?;
    let schema_version: i32 = row.try_get("schema_version").map_err(store_error)?;
    let payload: serde_json::Value = row.try_get("payload").map_err(store_error)?;
    let Json(metadata): Json<RecordMetadata> = row.try_get("metadata").map_err(store_error)?;
    let partition_key: Option<String> = row.try_get("partition_key").map_err(store_error)?;
    Ok(EventRecord::new(
        event_id,
        event_type,
        u32::try_from(schema_version).unwrap_or(0),
        payload,
        metadata,
    )
    .with_partition_key(partition_key)
    .with_stream(stream_id, to_u64(stream_version))
    .with_position(Position::new(to_u64(position))))
}

/// Positions, versions and counts are never negative in the tables; a negative one reads as 0.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A position or version as a bigint parameter: past `i64::MAX` nothing is stored anyway.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
