//! PostgreSQL store and inbox against the real server (`FERRY_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test uses its own table prefix.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    Applied, InboxUnderTest, OutboxUnderTest,
    concurrent_writers_of_one_aggregate_get_versions_in_commit_order,
    inbox_rolls_back_with_the_handler, inbox_skips_duplicate_ids_and_stale_versions,
    mark_is_fenced_after_the_lease_is_taken_over, order_event, relay_into_file,
    retention_keeps_published_rows_until_purged, rolled_back_transaction_leaves_no_message,
    versions_per_aggregate,
};
use ferry::postgres::{PgInbox, PgOutbox};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{
    EnqueueError, Enqueued, InvalidMessage, NewMessage, OutboxStore, ReceivedMessage, StoreError,
    partition_for,
};
use sqlx::Row;

fn pg_url() -> String {
    std::env::var("FERRY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh outbox with a unique prefix, migrated with `partitions`.
async fn outbox_with(partitions: u32, retention: Duration) -> PgOutbox {
    let prefix = format!(
        "t{}_",
        uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
    );
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(prefix).unwrap(),
        max_payload_bytes: 1024,
        retention,
        ..StoreSettings::default()
    };
    let outbox = PgOutbox::connect(&pg_url(), 8, settings).await.unwrap();
    outbox.migrate(partitions).await.unwrap();
    outbox
}

async fn outbox() -> PgOutbox {
    outbox_with(4, Duration::ZERO).await
}

impl OutboxUnderTest for PgOutbox {
    async fn write(
        &self,
        messages: Vec<NewMessage>,
        hold: Duration,
        commit: bool,
    ) -> Vec<Enqueued> {
        let mut tx = self.pool().begin().await.unwrap();
        let mut enqueued = Vec::with_capacity(messages.len());
        for message in messages {
            enqueued.push(self.enqueue(&mut tx, message).await.unwrap());
        }
        tokio::time::sleep(hold).await;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        enqueued
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = self
            .table_prefix()
            .render(&format!("SELECT count(*) FROM {{p}}{table}"));
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(self.pool())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn migrate_is_idempotent_and_partitions_are_fixed() {
    let outbox = outbox().await;
    outbox.migrate(4).await.unwrap();
    assert_eq!(outbox.partitions().await.unwrap(), 4);
    let err = outbox.migrate(8).await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("4 partitions"), "{err}");
}

#[tokio::test]
async fn missing_tables_point_to_migrate() {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new("never_migrated_").unwrap(),
        ..StoreSettings::default()
    };
    let outbox = PgOutbox::connect(&pg_url(), 2, settings).await.unwrap();
    let err = outbox.partitions().await.unwrap_err();
    assert!(err.to_string().contains("ferry migrate"), "{err}");
}

#[tokio::test]
async fn unreachable_database_is_a_retryable_error_naming_the_cause() {
    let err = PgOutbox::connect(
        "postgres://postgres@127.0.0.1:1/test",
        2,
        StoreSettings::default(),
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn g1_rolled_back_transaction_leaves_no_message() {
    rolled_back_transaction_leaves_no_message(&outbox().await).await;
}

#[tokio::test]
async fn g3_concurrent_writers_of_one_aggregate_get_versions_in_commit_order() {
    concurrent_writers_of_one_aggregate_get_versions_in_commit_order(&outbox().await, 4).await;
}

#[tokio::test]
async fn sql_enqueue_function_matches_the_rust_api() {
    let outbox = outbox_with(16, Duration::ZERO).await;
    let function = outbox.table_prefix().render("{p}enqueue");
    let keys = [
        "order/1",
        "order/42",
        "customer/élodie",
        "tenant-7",
        "",
        "x/日本",
    ];
    for (n, key) in keys.iter().enumerate().filter(|(_, k)| !k.is_empty()) {
        let sql = format!(
            "SELECT * FROM {function}('invoice', $1, 'invoice.sent', '{{\"n\": 1}}'::jsonb, '{{}}'::jsonb, $2)"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(n.to_string())
            .bind(key)
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        let partition: i32 = row.get("message_partition");
        assert_eq!(
            partition as u32,
            partition_for(key, 16),
            "partition of {key:?}"
        );
        let id: uuid::Uuid = row.get("message_id");
        assert_eq!(id.get_version_num(), 7, "SQL ids are UUID v7");
    }
    // Default key and versions interleave with the Rust API on the same aggregate.
    let sql = format!(
        "SELECT message_version FROM {function}('order', '9', 'order.created', '{{}}'::jsonb)"
    );
    let v1: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    let v2 = outbox
        .enqueue(&mut tx, order_event("9", "order.paid"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((v1, v2.version), (1, 2));
    assert_eq!(v2.partition, partition_for("order/9", 16));
}

#[tokio::test]
async fn invalid_message_is_refused_and_the_transaction_stays_usable() {
    let outbox = outbox().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let err = outbox
        .enqueue(
            &mut tx,
            NewMessage::new("order", "1", "order.created", vec![b'x'; 2000]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EnqueueError::Invalid(InvalidMessage::PayloadTooLarge {
                size: 2000,
                limit: 1024
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_payload_bytes"), "{err}");
    outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.count("outbox").await, 1);
}

#[tokio::test]
async fn g5_mark_is_fenced_after_the_lease_is_taken_over() {
    mark_is_fenced_after_the_lease_is_taken_over(&outbox_with(1, Duration::ZERO).await).await;
}

#[tokio::test]
async fn heartbeat_counts_live_relays() {
    common::heartbeat_counts_live_relays(&outbox().await).await;
}

#[tokio::test]
async fn g6_retention_keeps_published_rows_until_purged() {
    retention_keeps_published_rows_until_purged(&outbox_with(1, Duration::from_secs(1)).await)
        .await;
}

#[tokio::test]
async fn status_shows_owner_backlog_and_blocked_reason() {
    common::status_shows_owner_backlog_and_blocked_reason(&outbox_with(2, Duration::ZERO).await)
        .await;
}

#[tokio::test]
async fn g2_a_late_commit_with_a_lower_sequence_is_still_published() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    // The early transaction takes the lower sequence and stays open.
    let mut early = outbox.pool().begin().await.unwrap();
    let held = outbox
        .enqueue(&mut early, order_event("early", "order.created"))
        .await
        .unwrap();
    let mut late = outbox.pool().begin().await.unwrap();
    let committed_first = outbox
        .enqueue(&mut late, order_event("late", "order.created"))
        .await
        .unwrap();
    late.commit().await.unwrap();
    assert!(held.sequence < committed_first.sequence);

    let publisher = {
        let outbox = outbox.clone();
        tokio::spawn(async move { relay_into_file(&outbox, 2).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    early.commit().await.unwrap();
    let events = publisher.await.unwrap();
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert!(
        ids.contains(&held.id),
        "the late-committed lower sequence was lost"
    );
    assert!(ids.contains(&committed_first.id));
    assert_eq!(events.len(), 2, "nothing published twice");
    assert_eq!(outbox.count("outbox").await, 0);
}

#[tokio::test]
async fn relay_publishes_every_aggregate_in_version_order() {
    let outbox = outbox_with(8, Duration::ZERO).await;
    for round in 0..5 {
        let mut tx = outbox.pool().begin().await.unwrap();
        for agg in 0..40 {
            outbox
                .enqueue(
                    &mut tx,
                    order_event(&agg.to_string(), &format!("step{round}")),
                )
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let events = relay_into_file(&outbox, 200).await;
    assert_eq!(events.len(), 200);
    for (agg, versions) in versions_per_aggregate(&events) {
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "aggregate {agg}");
    }
}

/// The PostgreSQL inbox of consumer "billing", with an effects table for its handler.
struct PgInboxTest {
    outbox: PgOutbox,
    inbox: PgInbox,
    insert_effect: String,
}

impl PgInboxTest {
    async fn new() -> Self {
        let outbox = outbox().await;
        let inbox = PgInbox::new("billing", outbox.table_prefix());
        let table = outbox.table_prefix().render("{p}effects");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (id uuid PRIMARY KEY, version bigint)"
        )))
        .execute(outbox.pool())
        .await
        .unwrap();
        Self {
            outbox,
            inbox,
            insert_effect: format!("INSERT INTO {table} (id, version) VALUES ($1, $2)"),
        }
    }
}

impl InboxUnderTest for PgInboxTest {
    async fn apply(&self, message: &ReceivedMessage, fail: bool) -> Applied {
        let mut tx = self.outbox.pool().begin().await.unwrap();
        let result = self
            .inbox
            .process(&mut tx, message, async |tx, m| {
                sqlx::query(sqlx::AssertSqlSafe(self.insert_effect.clone()))
                    .bind(m.id)
                    .bind(m.version as i64)
                    .execute(&mut **tx)
                    .await?;
                if fail {
                    return Err(sqlx::Error::Protocol("handler failed on purpose".into()));
                }
                Ok(())
            })
            .await;
        if result.is_ok() {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        result
    }

    async fn count(&self, table: &str) -> i64 {
        self.outbox.count(table).await
    }
}

#[tokio::test]
async fn g4_inbox_skips_duplicate_ids_and_stale_versions() {
    inbox_skips_duplicate_ids_and_stale_versions(&PgInboxTest::new().await).await;
}

#[tokio::test]
async fn g4_handler_effects_and_inbox_record_roll_back_together() {
    inbox_rolls_back_with_the_handler(&PgInboxTest::new().await).await;
}

/// Heap blocks PostgreSQL has counted as read or hit for `table`, from the shared
/// statistics (which backends flush when idle or when they exit).
async fn heap_blocks(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(heap_blks_read + heap_blks_hit, 0) FROM pg_statio_user_tables \
         WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Makes the backend of `connection` publish its statistics before this returns (it does
/// when it goes idle after the call, before answering).
async fn flush_statistics(connection: &mut sqlx::PgConnection) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(connection)
        .await
        .unwrap();
}

/// A freshly filled outbox has no statistics until autovacuum analyses it, and PostgreSQL's
/// first plans for the fetch then read the partition's whole backlog and sort it, for every
/// batch (seen with 400k rows in 16 partitions). The fetch must touch no more heap blocks
/// than the rows it returns.
#[tokio::test]
async fn fetch_reads_only_the_head_of_an_unanalysed_backlog() {
    const BACKLOG: i64 = 400_000;
    const BATCH: usize = 1000;
    const FETCHES: i64 = 8;
    // A partition's rows are spread over the whole table: reading all 25,000 of partition
    // 0 touches ~5,000 blocks per fetch (measured without the fix: 26,844 in all), its head
    // of 1000 rows ~100 (741 in all).
    const MAX_BLOCKS: i64 = FETCHES * BATCH as i64;
    let filled = outbox_with(16, Duration::ZERO).await;
    let table = filled.table_prefix().render("{p}outbox");
    let sql = format!(
        "INSERT INTO {table} (id, partition_no, aggregate_type, aggregate_id, version, \
         event_type, payload, partition_key) \
         SELECT gen_random_uuid(), g % 16, 'bench', g::text, 1, 'bench.event', '\\x7b7d', \
         'bench/' || g FROM generate_series(1, $1) g"
    );
    let mut filler = filled.pool().acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(BACKLOG)
        .execute(&mut *filler)
        .await
        .unwrap();
    flush_statistics(&mut filler).await;
    drop(filler);
    let settings = StoreSettings {
        table_prefix: filled.table_prefix().clone(),
        ..StoreSettings::default()
    };
    filled.pool().close().await;

    // One connection, the one whose statistics are flushed after the fetches.
    let relay = PgOutbox::connect(&pg_url(), 1, settings).await.unwrap();
    let observer = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let before = heap_blocks(&observer, &table).await;
    for _ in 0..FETCHES {
        let batch = relay.fetch(0, BATCH).await.unwrap();
        assert_eq!(batch.len(), BATCH);
    }
    flush_statistics(&mut relay.pool().acquire().await.unwrap()).await;
    let touched = heap_blocks(&observer, &table).await - before;
    assert!(
        touched <= MAX_BLOCKS,
        "{FETCHES} fetches of {BATCH} rows touched {touched} heap blocks, more than \
         {MAX_BLOCKS}: a plan read the backlog of {BACKLOG} rows instead of its head"
    );
}

/// A relay paused (SIGSTOP, a stopped VM) between the statements of a mark holds its lease
/// row locked; the server ends that transaction after 5 s idle, so another relay takes the
/// partition over once the lease has expired, instead of skipping it until the paused one
/// resumes, and the paused one's commit fails.
#[tokio::test]
async fn a_relay_paused_inside_a_write_transaction_does_not_keep_its_partition() {
    use ferry::LeaseStore;
    let outbox = outbox_with(1, Duration::ZERO).await;
    let granted = outbox
        .acquire("paused", 1, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let mut paused = outbox.begin_write().await.unwrap();
    let lock_lease_row = outbox
        .table_prefix()
        .render("UPDATE {p}leases SET checkpoint = checkpoint WHERE partition_no = 0");
    sqlx::query(sqlx::AssertSqlSafe(lock_lease_row))
        .execute(&mut *paused)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let waiting_since = std::time::Instant::now();
    loop {
        let taken = outbox
            .acquire("successor", 1, Duration::from_secs(10))
            .await
            .unwrap();
        if !taken.is_empty() {
            break;
        }
        assert!(
            waiting_since.elapsed() < Duration::from_secs(20),
            "the paused relay's transaction kept the partition from being taken over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        paused.commit().await.is_err(),
        "the server should have ended the paused transaction"
    );
}

#[tokio::test]
async fn blocked_partitions_are_listed_retried_and_skipped() {
    common::operations::blocked_partitions_are_listed_retried_and_skipped(
        &outbox_with(1, Duration::ZERO).await,
    )
    .await;
}

#[tokio::test]
async fn park_aggregate_holds_the_aggregate_until_requeued() {
    common::operations::park_aggregate_holds_the_aggregate_until_requeued(
        &outbox_with(1, Duration::ZERO).await,
    )
    .await;
}

#[tokio::test]
async fn cleanup_removes_what_is_past_its_bounds() {
    let outbox = outbox_with(1, Duration::from_secs(3600)).await;
    let inbox = PgInbox::new("cleanup", outbox.table_prefix());
    common::operations::cleanup_removes_what_is_past_its_bounds(&outbox, async || {
        let mut tx = outbox.pool().begin().await.unwrap();
        inbox
            .process(&mut tx, &common::received("1", 1), async |_, _| {
                Ok::<(), sqlx::Error>(())
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
}
