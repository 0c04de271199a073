//! The pgoutput messages log capture reads beyond what `pgwire-replication` decodes
//! (Begin, Commit, logical messages): Relation (the outbox table's columns) and Insert (a
//! row as text values), turned into [`Message`]s.
//!
//! Values are in text format, rendered by the walsender's session, whose settings the
//! stream pins (`DateStyle = ISO`, `TimeZone = UTC`, `bytea_output = hex`) so that they
//! parse the same everywhere.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::{Headers, Message};

/// A message the stream cannot read: says what and where.
#[derive(Debug, thiserror::Error)]
#[error("pgoutput: {0}")]
pub(super) struct DecodeError(String);

fn error(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// The columns of the outbox table a row is read from, by position in the relation.
#[derive(Debug, Clone, Default)]
struct Columns {
    sequence: usize,
    id: usize,
    partition_no: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    version: usize,
    event_type: usize,
    payload: usize,
    headers: usize,
    partition_key: usize,
    created_at: usize,
}

/// What one pgoutput message was.
#[derive(Debug)]
pub(super) enum Decoded {
    /// A row of the outbox table.
    Insert(Box<Message>),
    /// Anything else (a relation, a type, an origin): nothing to publish.
    Other,
}

/// Decodes a stream's pgoutput messages, remembering the relations it was sent.
#[derive(Debug)]
pub(super) struct Decoder {
    /// The outbox table's name (no schema), the only relation the publication has.
    table: String,
    relations: HashMap<u32, Columns>,
}

impl Decoder {
    pub(super) fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            relations: HashMap::new(),
        }
    }

    pub(super) fn decode(&mut self, data: &[u8]) -> Result<Decoded, DecodeError> {
        let mut reader = Reader(data);
        match reader.u8()? {
            b'R' => {
                self.relation(&mut reader)?;
                Ok(Decoded::Other)
            }
            b'I' => Ok(Decoded::Insert(Box::new(self.insert(&mut reader)?))),
            _ => Ok(Decoded::Other),
        }
    }

    fn relation(&mut self, reader: &mut Reader<'_>) -> Result<(), DecodeError> {
        let id = reader.u32()?;
        let _namespace = reader.cstr()?;
        let name = reader.cstr()?;
        if name != self.table {
            return Err(error(format!(
                "the publication sends table {name}, not the outbox {}: it must hold the outbox table alone",
                self.table
            )));
        }
        let _replica_identity = reader.u8()?;
        let count = reader.i16()?;
        let mut names = HashMap::new();
        for position in 0..usize::try_from(count).map_err(|_| error("negative column count"))? {
            let _flags = reader.u8()?;
            names.insert(reader.cstr()?.to_owned(), position);
            let _type = reader.u32()?;
            let _modifier = reader.u32()?;
        }
        let at = |column: &str| {
            names
                .get(column)
                .copied()
                .ok_or_else(|| error(format!("the outbox table {name} has no column {column}")))
        };
        self.relations.insert(
            id,
            Columns {
                sequence: at("sequence")?,
                id: at("id")?,
                partition_no: at("partition_no")?,
                aggregate_type: at("aggregate_type")?,
                aggregate_id: at("aggregate_id")?,
                version: at("version")?,
                event_type: at("event_type")?,
                payload: at("payload")?,
                headers: at("headers")?,
                partition_key: at("partition_key")?,
                created_at: at("created_at")?,
            },
        );
        Ok(())
    }

    fn insert(&self, reader: &mut Reader<'_>) -> Result<Message, DecodeError> {
        let relation = reader.u32()?;
        let columns = self.relations.get(&relation).ok_or_else(|| {
            error(format!(
                "an insert into relation {relation}, never described"
            ))
        })?;
        if reader.u8()? != b'N' {
            return Err(error("an insert without its new tuple"));
        }
        let count = usize::try_from(reader.i16()?).map_err(|_| error("negative column count"))?;
        let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(count);
        for _ in 0..count {
            values.push(match reader.u8()? {
                b't' => {
                    let len = usize::try_from(reader.u32()?).map_err(|_| error("length"))?;
                    Some(reader.take(len)?)
                }
                b'n' | b'u' => None,
                kind => return Err(error(format!("column value of kind {kind}"))),
            });
        }
        let text = |position: usize, column: &str| -> Result<&str, DecodeError> {
            let value = values
                .get(position)
                .copied()
                .flatten()
                .ok_or_else(|| error(format!("outbox column {column} is missing or null")))?;
            std::str::from_utf8(value)
                .map_err(|_| error(format!("outbox column {column} is not UTF-8")))
        };
        let number = |position: usize, column: &str| -> Result<i64, DecodeError> {
            text(position, column)?
                .parse()
                .map_err(|_| error(format!("outbox column {column} is not a number")))
        };
        let id = text(columns.id, "id")?;
        let id = Uuid::parse_str(id).map_err(|_| error(format!("outbox id {id} is not a UUID")))?;
        let headers: Headers = serde_json::from_str(text(columns.headers, "headers")?)
            .map_err(|err| error(format!("headers of message {id}: {err}")))?;
        Ok(Message {
            id,
            aggregate_type: text(columns.aggregate_type, "aggregate_type")?.to_owned(),
            aggregate_id: text(columns.aggregate_id, "aggregate_id")?.to_owned(),
            version: u64::try_from(number(columns.version, "version")?)
                .map_err(|_| error(format!("negative version of message {id}")))?,
            event_type: text(columns.event_type, "event_type")?.to_owned(),
            payload: bytea(text(columns.payload, "payload")?)
                .ok_or_else(|| error(format!("payload of message {id} is not hex bytea")))?,
            headers,
            partition: u32::try_from(number(columns.partition_no, "partition_no")?)
                .map_err(|_| error(format!("partition of message {id} out of range")))?,
            partition_key: text(columns.partition_key, "partition_key")?.to_owned(),
            created_at: timestamp(text(columns.created_at, "created_at")?)
                .ok_or_else(|| error(format!("created_at of message {id} is not an ISO time")))?,
            sequence: number(columns.sequence, "sequence")?,
        })
    }
}

/// `\x` hex text (`bytea_output = hex`).
fn bytea(text: &str) -> Option<Bytes> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// `timestamptz` text with `DateStyle = ISO` (`2026-12-05 13:05:41.123456+00`).
fn timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Big-endian reads off a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < len {
            return Err(error("a message cut short"));
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| error("a string without its terminator"))?;
        let text = std::str::from_utf8(&self.0[..end]).map_err(|_| error("a name not in UTF-8"))?;
        self.0 = &self.0[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_walsenders_text_formats() {
        assert_eq!(bytea("\\x7b7d").as_deref(), Some(&b"{}"[..]));
        assert_eq!(bytea("\\x7"), None);
        assert_eq!(bytea("7b7d"), None);
        let time = timestamp("2026-12-05 13:05:41.123456+00").expect("ISO time");
        assert_eq!(time.timestamp_micros() % 1_000_000, 123_456);
        assert_eq!(
            timestamp("2026-12-05 14:05:41+01"),
            timestamp("2026-12-05 13:05:41+00")
        );
    }
}
