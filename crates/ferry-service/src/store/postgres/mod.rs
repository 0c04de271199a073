//! The service's statements and migrations for PostgreSQL.

use ferry::postgres::PgDialect;

use super::dialect::{ServiceDialect, ServiceQueries, service_queries};

impl ServiceDialect for PgDialect {
    const SERVICE_QUERIES: ServiceQueries = service_queries!();
    const SERVICE_MIGRATIONS: &'static [&'static str] =
        &[include_str!("migrations/0001_initial.sql")];
    const RECORD_COLUMNS: &'static str = "id, status, aggregate_type, aggregate_id, event_type, \
         payload, headers, partition_key, check_url, version, checks::int8 AS checks, \
         deliveries::int8 AS deliveries, attempts::int8 AS attempts, reason, \
         (extract(epoch FROM created_at) * 1000)::int8 AS created_at, \
         (extract(epoch FROM updated_at) * 1000)::int8 AS updated_at, \
         (extract(epoch FROM next_check_at) * 1000)::int8 AS next_check_at, \
         (extract(epoch FROM confirmed_at) * 1000)::int8 AS confirmed_at, \
         (extract(epoch FROM delivered_at) * 1000)::int8 AS delivered_at, \
         (extract(epoch FROM ack_deadline) * 1000)::int8 AS ack_deadline";
    const NULL_PAYLOAD: &'static str = "NULL::bytea";
}
