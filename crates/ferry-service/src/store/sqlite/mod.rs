//! The service's statements and migrations for SQLite (times in unix milliseconds from
//! SQLite's clock, ids 16-byte blobs like the outbox's).

use ferry::sqlite::SqliteDialect;

use super::dialect::{ServiceDialect, ServiceQueries, service_queries};

impl ServiceDialect for SqliteDialect {
    const SERVICE_QUERIES: ServiceQueries = service_queries!();
    const SERVICE_MIGRATIONS: &'static [&'static str] =
        &[include_str!("migrations/0001_initial.sql")];
    const RECORD_COLUMNS: &'static str = "id, status, aggregate_type, aggregate_id, event_type, \
         payload, headers, partition_key, check_url, version, checks, deliveries, attempts, \
         reason, created_at, updated_at, next_check_at, confirmed_at, delivered_at, ack_deadline";
    const NULL_PAYLOAD: &'static str = "NULL";
}
