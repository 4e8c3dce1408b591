//! Stream entries: their fields, how an [`EventRecord`] is written into them and read back.
//!
//! An entry's fields: `id` (the event id), `type` (its wire name), `v` (its schema version),
//! `key` (its partition key, when it has one), `lane` and `prev` (its order lane and the
//! previous entry of that lane, when ordered), `group` (a replay meant for one group only),
//! `replayed` (the dead letter it was replayed from), `origin` (on a replay: the entry the
//! event was first published as, kept through later replays), and `record`: the whole serialized
//! [`EventRecord`] as JSON (payload, metadata with correlation id, causation id and trace
//! context, stream id, version and position). `record` is what consumers decode; the other
//! fields let scripts route and gate entries, and let people read a stream with `redis-cli`.

use cqrs_core::EventRecord;
use fred::bytes::Bytes;
use fred::types::Value;

/// An entry's fields in stream order, names and values as the reply's bytes (shared, not
/// copied).
pub(crate) type Fields = Vec<(Bytes, Bytes)>;

/// A bulk string's bytes without copying them.
fn into_bytes(value: Value) -> Bytes {
    match value {
        Value::Bytes(b) => b,
        Value::String(s) => s.into_inner(),
        other => other
            .as_bytes()
            .map(Bytes::copy_from_slice)
            .unwrap_or_default(),
    }
}

/// The items of an array reply; none for `nil` (fred's `into_array` makes `[nil]` of it).
pub(crate) fn array(value: Value) -> Vec<Value> {
    if value.is_null() {
        Vec::new()
    } else {
        value.into_array()
    }
}

/// The fields of an entry from a flat `[name, value, ...]` reply.
pub(crate) fn fields(value: Value) -> Fields {
    let mut out = Vec::new();
    let mut items = array(value).into_iter();
    while let (Some(name), Some(value)) = (items.next(), items.next()) {
        out.push((into_bytes(name), into_bytes(value)));
    }
    out
}

/// The value of field `name`, as its bytes.
pub(crate) fn raw_field<'a>(fields: &'a Fields, name: &str) -> Option<&'a Bytes> {
    fields
        .iter()
        .find(|(n, _)| n.as_ref() == name.as_bytes())
        .map(|(_, v)| v)
}

/// The value of field `name`, as text: `None` when it is missing or not UTF-8 (see
/// [`raw_field`] where the difference matters).
pub(crate) fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    raw_field(fields, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Reads the record back, or says why it cannot.
pub(crate) fn decode(fields: &Fields) -> Result<EventRecord, String> {
    let Some((_, record)) = fields.iter().find(|(n, _)| n.as_ref() == b"record") else {
        return Err("undecodable entry: it has no `record` field".to_owned());
    };
    serde_json::from_slice(record).map_err(|e| format!("undecodable entry: {e}"))
}

/// `(id, fields)` pairs from a `[[id, [name, value, ...]], ...]` reply (XRANGE, XREADGROUP).
pub(crate) fn entries(value: Value) -> Vec<(String, Fields)> {
    array(value)
        .into_iter()
        .filter_map(|entry| {
            let mut parts = array(entry).into_iter();
            let id = parts.next()?.into_string()?;
            Some((id, fields(parts.next().unwrap_or(Value::Null))))
        })
        .collect()
}

/// Looks up a field of a flat `[name, value, ...]` reply (XINFO in RESP2).
pub(crate) fn info_field<'a>(items: &'a [Value], name: &str) -> Option<&'a Value> {
    items
        .chunks(2)
        .find(|pair| pair[0].as_str().is_some_and(|n| n == name))
        .and_then(|pair| pair.get(1))
}

/// A whole stream entry id's `(milliseconds, sequence)` (`<ms>-<seq>`, digits only, as Redis
/// writes them: `parse` alone would also take a sign), if it is one.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let part = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse::<u64>().ok())
            .flatten()
    };
    Some((part(ms)?, part(seq)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_broken_record_is_undecodable() {
        let broken: Fields = vec![(
            Bytes::from_static(b"record"),
            Bytes::from_static(b"{not json"),
        )];
        assert!(
            decode(&broken)
                .unwrap_err()
                .starts_with("undecodable entry")
        );
        assert!(decode(&Vec::new()).is_err());
    }
}
