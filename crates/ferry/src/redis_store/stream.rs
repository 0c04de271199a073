//! Decoding stream replies: partition entries into messages, parked records into parked
//! messages, wake-up entries into partition numbers.

use ::redis::Value;
use bytes::Bytes;
use chrono::DateTime;
use uuid::Uuid;

use ferry_core::{Headers, Message, ParkedMessage, StoreError};

/// The entries of an `XRANGE` reply: `[[entry id, [field, value, …]], …]`.
fn entries(reply: Value) -> Result<Vec<(String, Vec<Value>)>, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt("an XRANGE reply that is not an array"));
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(mut pair) if pair.len() == 2 => {
                let fields = match pair.pop() {
                    Some(Value::Array(fields)) => fields,
                    _ => return Err(corrupt("a stream entry without fields")),
                };
                let id = match pair.pop() {
                    Some(Value::BulkString(id)) => String::from_utf8_lossy(&id).into_owned(),
                    _ => return Err(corrupt("a stream entry without an id")),
                };
                Ok((id, fields))
            }
            _ => Err(corrupt("a stream entry that is not an [id, fields] pair")),
        })
        .collect()
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Other(format!("unexpected reply from Redis: {what}").into())
}

/// Messages from an `XRANGE` of partition `partition`'s stream, in stream order.
pub(super) fn messages(reply: Value, partition: u32) -> Result<Vec<Message>, StoreError> {
    entries(reply)?
        .into_iter()
        .map(|(entry, fields)| message(&entry, fields, partition))
        .collect()
}

fn message(entry: &str, fields: Vec<Value>, partition: u32) -> Result<Message, StoreError> {
    let mut id = None;
    let mut sequence = None;
    let mut aggregate_type = None;
    let mut aggregate_id = None;
    let mut version = None;
    let mut event_type = None;
    let mut partition_key = None;
    let mut headers = None;
    let mut created_at = None;
    let mut payload = None;
    let mut fields = fields.into_iter();
    while let (Some(Value::BulkString(name)), Some(Value::BulkString(value))) =
        (fields.next(), fields.next())
    {
        match name.as_slice() {
            b"payload" => payload = Some(Bytes::from(value)),
            b"id" => id = Some(text(value)),
            b"sequence" => sequence = Some(text(value)),
            b"aggregate_type" => aggregate_type = Some(text(value)),
            b"aggregate_id" => aggregate_id = Some(text(value)),
            b"version" => version = Some(text(value)),
            b"event_type" => event_type = Some(text(value)),
            b"partition_key" => partition_key = Some(text(value)),
            b"headers" => headers = Some(text(value)),
            b"created_at" => created_at = Some(text(value)),
            _ => {}
        }
    }
    let bad = |field: &str| {
        StoreError::Other(
            format!(
                "outbox stream entry {entry} of partition {partition}: {field} missing or invalid"
            )
            .into(),
        )
    };
    let headers: Headers = headers
        .and_then(|h| serde_json::from_str(&h).ok())
        .ok_or_else(|| bad("headers"))?;
    let created_ms: i64 = created_at
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("created_at"))?;
    Ok(Message {
        id: id
            .and_then(|i| Uuid::parse_str(&i).ok())
            .ok_or_else(|| bad("id"))?,
        aggregate_type: aggregate_type.ok_or_else(|| bad("aggregate_type"))?,
        aggregate_id: aggregate_id.ok_or_else(|| bad("aggregate_id"))?,
        version: version
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("version"))?,
        event_type: event_type.ok_or_else(|| bad("event_type"))?,
        payload: payload.ok_or_else(|| bad("payload"))?,
        headers,
        partition_key: partition_key.ok_or_else(|| bad("partition_key"))?,
        partition,
        created_at: DateTime::from_timestamp_millis(created_ms).ok_or_else(|| bad("created_at"))?,
        sequence: sequence
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("sequence"))?,
    })
}

/// A parked record (a hash's fields, as `parked.lua` returns them): the message's fields
/// plus `partition`, `parked_at` (ms), `parked_by`, `reason` and `holds`.
pub(super) fn parked(fields: Vec<Value>) -> Result<ParkedMessage, StoreError> {
    let field = |wanted: &[u8]| {
        fields.chunks(2).find_map(|pair| match pair {
            [Value::BulkString(name), Value::BulkString(value)] if name == wanted => {
                Some(String::from_utf8_lossy(value).into_owned())
            }
            _ => None,
        })
    };
    let bad = |what: &str| corrupt(&format!("a parked message without a valid {what}"));
    let partition = field(b"partition")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("partition"))?;
    let parked_at = field(b"parked_at")
        .and_then(|at| at.parse().ok())
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| bad("parked_at"))?;
    let parked_by = field(b"parked_by").ok_or_else(|| bad("parked_by"))?;
    let reason = field(b"reason").ok_or_else(|| bad("reason"))?;
    let holds_aggregate = field(b"holds").as_deref() == Some("1");
    Ok(ParkedMessage {
        message: message("parked", fields, partition)?,
        parked_at,
        parked_by,
        reason,
        holds_aggregate,
    })
}

/// Messages from `retained.lua`'s page: `[[partition, fields], …]`.
pub(super) fn retained(page: Vec<(u32, Vec<Value>)>) -> Result<Vec<Message>, StoreError> {
    page.into_iter()
        .map(|(partition, fields)| message("kept", fields, partition))
        .collect()
}

/// Producers in other languages may send any bytes; ferry's fields are text.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What an `XREAD` of the wake-up stream returned: the last entry id and the partitions
/// named (field `p`, comma-separated), or `None` when the read timed out.
pub(super) fn wake_ups(reply: Value) -> Result<Option<(String, Vec<u32>, usize)>, StoreError> {
    let streams = match reply {
        Value::Nil => return Ok(None),
        Value::Array(streams) => streams,
        _ => return Err(corrupt("an XREAD reply that is not an array")),
    };
    let mut last = None;
    let mut partitions = Vec::new();
    let mut read = 0;
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            return Err(corrupt(
                "an XREAD stream that is not a [name, entries] pair",
            ));
        };
        let Some(entries_reply) = pair.pop() else {
            return Err(corrupt("an XREAD stream without entries"));
        };
        for (entry, fields) in entries(entries_reply)? {
            read += 1;
            for pair in fields.chunks(2) {
                if let [Value::BulkString(name), Value::BulkString(value)] = pair
                    && name == b"p"
                {
                    partitions.extend(
                        String::from_utf8_lossy(value)
                            .split(',')
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
            last = Some(entry);
        }
    }
    Ok(last.map(|last| (last, partitions, read)))
}
