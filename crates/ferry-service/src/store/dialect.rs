//! What the service's store needs from a SQL dialect beyond ferry's own: the statements on
//! its table, one `.sql` file each in the dialect's `queries/` folder, and its migrations.

use ferry::sql::Dialect;

/// The service's statements in one dialect, written with `$n` parameters, `{p}` for the
/// table prefix, `{now}` for the database's clock, `{cols}` for the record's columns and
/// `{list_cols}` for the same without the payload. Durations are bound in milliseconds;
/// status lists as a JSON array of names.
#[derive(Debug, Clone, Copy)]
pub struct ServiceQueries {
    /// `($1 id, $2 aggregate_type, $3 aggregate_id, $4 event_type, $5 payload, $6 headers,
    /// $7 partition_key, $8 check_url, $9 check_after_ms)` → `{cols}`, or no row when the
    /// id exists.
    pub prepare: &'static str,
    /// `($1 id)` → `{cols}`.
    pub get: &'static str,
    /// `($1 id, $2 allowed source statuses, $3 reason)` → `{cols}` when it moved; with
    /// `{target}` and `{assign}` from the transition.
    pub transition: &'static str,
    /// `($1 id, $2 version)`.
    pub set_version: &'static str,
    /// `($1 statuses (empty: all), $2 after id, $3 limit)` → `{list_cols}` in id order.
    pub list: &'static str,
    /// `($1 limit, $2 claim_ms)` → `id, check_url, checks` of the claimed messages.
    pub claim_checks: &'static str,
    /// `($1 id, $2 checks, $3 retry_ms, $4 reason)` while the claim still holds.
    pub check_retry: &'static str,
    /// `($1 id, $2 checks, $3 reason)` while the claim still holds.
    pub check_failed: &'static str,
    /// `($1 limit, $2 ack_timeout_ms, $3 ack_timeout_max_ms)` → `id` of messages moved to
    /// delivered.
    pub mark_delivered: &'static str,
    /// `($1 max_deliveries, $2 limit, $3 reason)` → `id` of messages dead-lettered.
    pub dead_letter: &'static str,
    /// `($1 max_deliveries, $2 limit)` → `{cols}` of messages due for redelivery, moved
    /// back to confirmed.
    pub redeliver: &'static str,
    /// `($1 older_than_ms, $2 limit)`: deletes finished messages.
    pub purge: &'static str,
    /// `()` → `status, count, oldest_age_secs` per status.
    pub stats: &'static str,
}

/// The [`ServiceQueries`] in the `queries/` folder next to the invoking file.
macro_rules! service_queries {
    () => {
        $crate::store::dialect::ServiceQueries {
            prepare: include_str!("queries/prepare.sql"),
            get: include_str!("queries/get.sql"),
            transition: include_str!("queries/transition.sql"),
            set_version: include_str!("queries/set_version.sql"),
            list: include_str!("queries/list.sql"),
            claim_checks: include_str!("queries/claim_checks.sql"),
            check_retry: include_str!("queries/check_retry.sql"),
            check_failed: include_str!("queries/check_failed.sql"),
            mark_delivered: include_str!("queries/mark_delivered.sql"),
            dead_letter: include_str!("queries/dead_letter.sql"),
            redeliver: include_str!("queries/redeliver.sql"),
            purge: include_str!("queries/purge.sql"),
            stats: include_str!("queries/stats.sql"),
        }
    };
}
pub(crate) use service_queries;

/// A SQL dialect the service keeps its messages in.
pub trait ServiceDialect: Dialect {
    /// The statements.
    #[doc(hidden)]
    const SERVICE_QUERIES: ServiceQueries;
    /// Versioned migrations of the service's table, oldest first.
    const SERVICE_MIGRATIONS: &'static [&'static str];
    /// The record's columns as [`read_record`](super::sql) reads them: times in unix
    /// milliseconds, counters as 64-bit integers.
    const RECORD_COLUMNS: &'static str;
    /// A NULL of the payload's type, for listings.
    const NULL_PAYLOAD: &'static str;
}
