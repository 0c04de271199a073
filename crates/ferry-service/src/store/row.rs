//! The service's rows as [`Record`]s: every dialect returns the record's columns with the
//! same names and types ([`ServiceDialect::RECORD_COLUMNS`]), times in unix milliseconds.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use ferry::sql::{Driver, RowExt, store_error};
use ferry::{Headers, StoreError};

use super::dialect::ServiceDialect;
use super::{Record, corrupt, parse_status, to_u32};

type Row<D> = <<D as ferry::sql::Dialect>::Db as sqlx::Database>::Row;

/// A row of [`ServiceDialect::RECORD_COLUMNS`].
pub(super) fn read_record<D: ServiceDialect>(row: &Row<D>) -> Result<Record, StoreError> {
    RecordRow::read::<D::Db>(row)
        .map_err(store_error::<D>)?
        .try_into()
}

/// The record's columns as stored: times in unix milliseconds.
struct RecordRow {
    id: Uuid,
    status: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Option<Vec<u8>>,
    headers: Json<Headers>,
    partition_key: Option<String>,
    check_url: String,
    version: Option<i64>,
    checks: i64,
    deliveries: i64,
    attempts: i64,
    reason: Option<String>,
    created_at: i64,
    updated_at: i64,
    next_check_at: Option<i64>,
    confirmed_at: Option<i64>,
    delivered_at: Option<i64>,
    ack_deadline: Option<i64>,
}

impl RecordRow {
    fn read<DB: Driver>(row: &DB::Row) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.col("id")?,
            status: row.col("status")?,
            aggregate_type: row.col("aggregate_type")?,
            aggregate_id: row.col("aggregate_id")?,
            event_type: row.col("event_type")?,
            payload: row.col("payload")?,
            headers: row.col("headers")?,
            partition_key: row.col("partition_key")?,
            check_url: row.col("check_url")?,
            version: row.col("version")?,
            checks: row.col("checks")?,
            deliveries: row.col("deliveries")?,
            attempts: row.col("attempts")?,
            reason: row.col("reason")?,
            created_at: row.col("created_at")?,
            updated_at: row.col("updated_at")?,
            next_check_at: row.col("next_check_at")?,
            confirmed_at: row.col("confirmed_at")?,
            delivered_at: row.col("delivered_at")?,
            ack_deadline: row.col("ack_deadline")?,
        })
    }
}

fn time(id: Uuid, millis: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(millis).ok_or_else(|| corrupt(id, "time out of range"))
}

fn optional_time(id: Uuid, millis: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    millis.map(|m| time(id, m)).transpose()
}

impl TryFrom<RecordRow> for Record {
    type Error = StoreError;

    fn try_from(row: RecordRow) -> Result<Self, StoreError> {
        let id = row.id;
        Ok(Record {
            id,
            status: parse_status(id, &row.status)?,
            aggregate_type: row.aggregate_type,
            aggregate_id: row.aggregate_id,
            event_type: row.event_type,
            payload: row.payload.map(Into::into),
            headers: row.headers.0,
            partition_key: row.partition_key,
            check_url: row.check_url,
            version: row
                .version
                .map(|v| u64::try_from(v).map_err(|_| corrupt(id, "negative version")))
                .transpose()?,
            checks: to_u32(id, "checks", row.checks)?,
            deliveries: to_u32(id, "deliveries", row.deliveries)?,
            attempts: to_u32(id, "attempts", row.attempts)?,
            reason: row.reason,
            created_at: time(id, row.created_at)?,
            updated_at: time(id, row.updated_at)?,
            next_check_at: optional_time(id, row.next_check_at)?,
            confirmed_at: optional_time(id, row.confirmed_at)?,
            delivered_at: optional_time(id, row.delivered_at)?,
            ack_deadline: optional_time(id, row.ack_deadline)?,
        })
    }
}
