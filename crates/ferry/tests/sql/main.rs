//! The SQL stores against real databases: every behaviour the family promises is written
//! once in `scenarios`, generic over the dialect, and runs as a test of each dialect
//! (`postgres::…`, `mysql::…`, `sqlite::…`, named after the scenario); each dialect's module
//! adds what only that database has.
//!
//! PostgreSQL and MySQL run on the servers at `FERRY_TEST_PG_URL` and
//! `FERRY_TEST_MYSQL_URL` (defaults in `ferry_core::testing::services`), every test on
//! tables of its own prefix; SQLite on a new database file per test.
#![cfg(all(
    feature = "file",
    any(feature = "postgres", feature = "mysql", feature = "sqlite")
))]
#![allow(clippy::unwrap_used)]

/// A test of `$dialect` per scenario, named after it.
macro_rules! scenario_tests {
    ($dialect:ty: $($module:ident::$scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                crate::scenarios::$module::$scenario::<$dialect>().await;
            }
        )*
    };
}

/// The scenarios every SQL dialect must pass.
macro_rules! every_dialect_passes {
    ($dialect:ty) => {
        scenario_tests!($dialect:
            schema::migrate_is_idempotent_and_partitions_are_fixed,
            schema::concurrent_migrations_queue_on_the_lock_and_all_succeed,
            schema::unmigrated_store_points_at_migrate,
            schema::invalid_prefix_is_refused_and_prefixes_keep_outboxes_apart,
            enqueue::g1_enqueue_is_atomic_with_the_business_transaction,
            enqueue::invalid_message_is_refused_and_the_transaction_stays_usable,
            enqueue::payloads_are_arbitrary_bytes_and_headers_round_trip,
            enqueue::fetch_returns_unpublished_rows_in_sequence_order,
            enqueue::g3_concurrent_writers_of_one_aggregate_get_versions_in_commit_order,
            enqueue::trace_context_is_stored_and_reaches_the_consumer,
            leases::g5_mark_is_fenced_after_the_lease_is_taken_over,
            leases::renew_release_and_takeover_kinds,
            leases::heartbeat_counts_live_relays,
            leases::two_relays_acquiring_at_once_never_share_a_partition,
            marks::marks_any_number_of_ids_in_one_fenced_transaction,
            marks::status_reports_owner_backlog_and_blocked_reason,
            marks::g6_retention_keeps_published_rows_until_purged,
            operations::blocked_partitions_are_listed_retried_and_skipped,
            operations::park_aggregate_holds_the_aggregate_until_requeued,
            operations::cleanup_removes_what_is_past_its_bounds,
            operations::retained_messages_are_selected_for_replay,
            inbox::g4_inbox_skips_duplicate_ids_and_stale_versions,
            inbox::g4_handler_effects_and_inbox_record_roll_back_together,
            inbox::g4_inbox_applies_each_message_once_and_never_a_stale_version,
            inbox::g4_inbox_keys_are_exact_and_consumers_separate,
            inbox::g4_concurrent_consumer_instances_apply_in_version_order,
            relay::relay_publishes_every_aggregate_in_version_order,
            relay::relay_publishes_every_aggregate_in_version_order_with_concurrent_writers,
            relay::two_relays_deliver_everything_in_order,
        );
    };
}

/// The scenarios of database servers: they are reached over the network, and their
/// writers commit concurrently (SQLite has one writer at a time, so no transaction can
/// commit after another that took a higher sequence).
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! every_server_passes {
    ($dialect:ty) => {
        scenario_tests!($dialect:
            servers::unreachable_server_is_a_retryable_error_naming_the_address,
            servers::g2_a_late_commit_with_a_lower_sequence_is_still_published,
            servers::connections_send_without_waiting_for_acks,
        );
    };
}

mod harness;
#[path = "../support/nodelay.rs"]
mod nodelay;
mod scenarios;
#[path = "../shared/operations.rs"]
mod shared_operations;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
