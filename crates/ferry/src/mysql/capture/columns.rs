//! A binlog image of an outbox row read as the `fetch` columns, so that the poll path's
//! decoding ([`crate::sql::row::message`]) turns it into a message: the table's columns
//! come in the order `fetch` selects them.

use chrono::{DateTime, NaiveDate, Utc};
use mysql_async::Value;
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use uuid::Uuid;

use ferry_core::Headers;

use crate::sql::row::FetchColumns;

/// One outbox row as the binlog carries it.
pub(crate) struct BinlogColumns<'a>(pub(crate) &'a BinlogRow);

impl BinlogColumns<'_> {
    fn value(&self, index: usize) -> Result<&Value, sqlx::Error> {
        match self.0.as_ref(index) {
            Some(BinlogValue::Value(Value::NULL)) | None => Err(decode(index, "is NULL")),
            Some(BinlogValue::Value(value)) => Ok(value),
            Some(_) => Err(decode(
                index,
                "is binary JSON (MySQL), which log capture does not read",
            )),
        }
    }

    fn raw(&self, index: usize) -> Result<&[u8], sqlx::Error> {
        match self.value(index)? {
            Value::Bytes(bytes) => Ok(bytes),
            other => Err(decode(index, &format!("is {other:?}, not bytes"))),
        }
    }

    fn integer(&self, index: usize) -> Result<i64, sqlx::Error> {
        match *self.value(index)? {
            Value::Int(value) => Ok(value),
            Value::UInt(value) => {
                i64::try_from(value).map_err(|_| decode(index, "is out of range"))
            }
            ref other => Err(decode(index, &format!("is {other:?}, not an integer"))),
        }
    }
}

fn decode(index: usize, what: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("binlog outbox row: column {index} {what}").into())
}

impl FetchColumns for BinlogColumns<'_> {
    fn int32(&self, index: usize) -> Result<i32, sqlx::Error> {
        i32::try_from(self.integer(index)?).map_err(|_| decode(index, "is out of range"))
    }

    fn int64(&self, index: usize) -> Result<i64, sqlx::Error> {
        self.integer(index)
    }

    /// `BINARY(16)`: the binlog drops a fixed-length binary value's trailing zero bytes.
    fn uuid(&self, index: usize) -> Result<Uuid, sqlx::Error> {
        let raw = self.raw(index)?;
        let mut bytes = [0u8; 16];
        bytes
            .get_mut(..raw.len())
            .ok_or_else(|| decode(index, "is longer than a UUID"))?
            .copy_from_slice(raw);
        Ok(Uuid::from_bytes(bytes))
    }

    fn text(&self, index: usize) -> Result<String, sqlx::Error> {
        String::from_utf8(self.raw(index)?.to_vec()).map_err(|_| decode(index, "is not UTF-8"))
    }

    fn bytes(&self, index: usize) -> Result<Vec<u8>, sqlx::Error> {
        self.raw(index).map(<[u8]>::to_vec)
    }

    /// MariaDB's `JSON` is text.
    fn headers(&self, index: usize) -> Result<Headers, sqlx::Error> {
        serde_json::from_slice(self.raw(index)?)
            .map_err(|err| decode(index, &format!("is not a JSON object of strings: {err}")))
    }

    /// `DATETIME(6)` in UTC.
    fn time(&self, index: usize) -> Result<DateTime<Utc>, sqlx::Error> {
        let Value::Date(year, month, day, hour, minute, second, micros) = *self.value(index)?
        else {
            return Err(decode(index, "is not a DATETIME"));
        };
        NaiveDate::from_ymd_opt(year.into(), month.into(), day.into())
            .and_then(|date| {
                date.and_hms_micro_opt(hour.into(), minute.into(), second.into(), micros)
            })
            .map(|time| time.and_utc())
            .ok_or_else(|| decode(index, "is not a valid time"))
    }
}
