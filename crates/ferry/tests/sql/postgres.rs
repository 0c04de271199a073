//! PostgreSQL: the scenarios, and what only PostgreSQL has: the SQL `enqueue` function,
//! a fetch that reads only a partition's head, and write transactions the server ends.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::postgres::{PgDialect, PgOutbox};
use ferry::sql::{StoreSettings, Wake};
use ferry::{LeaseStore, OutboxStore, Wakers};
use ferry_core::testing::services;
use tokio::time::timeout;

use crate::harness::{TestDialect, TestOutbox, order_event};
use crate::scenarios::servers::{
    enqueue_routine_matches_the_rust_api, enqueue_routine_takes_the_trace_context,
};

impl TestDialect for PgDialect {
    fn database_url(_dir: &Path) -> String {
        services::postgres_url()
    }

    const CREATE_EFFECTS: &'static str = "CREATE TABLE {p}effects \
        (n bigserial PRIMARY KEY, id uuid NOT NULL UNIQUE, version bigint NOT NULL)";
}

every_dialect_passes!(PgDialect);
every_server_passes!(PgDialect);

#[tokio::test]
async fn sql_enqueue_function_matches_the_rust_api() {
    let outbox = TestOutbox::<PgDialect>::new(16).await;
    enqueue_routine_matches_the_rust_api(
        &outbox,
        "SELECT * FROM {p}enqueue('invoice', $1, 'invoice.sent', '{\"n\": 1}'::jsonb, \
         '{}'::jsonb, $2)",
        "SELECT * FROM {p}enqueue('order', '9', 'order.created', '{}'::jsonb)",
    )
    .await;
}

/// Old calls (without the trace context) keep working: `sql_enqueue_function_matches_the_rust_api`.
#[tokio::test]
async fn sql_enqueue_function_takes_the_trace_context() {
    let outbox = TestOutbox::<PgDialect>::new(2).await;
    enqueue_routine_takes_the_trace_context(
        &outbox,
        "SELECT * FROM {p}enqueue('order', $1, 'order.paid', '{}'::jsonb, \
         p_traceparent => $2, p_tracestate => $3)",
    )
    .await;
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
    let filled = TestOutbox::<PgDialect>::new(16).await;
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
    let relay = PgOutbox::connect(filled.url(), 1, settings).await.unwrap();
    let observer = sqlx::PgPool::connect(filled.url()).await.unwrap();
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
    let outbox = TestOutbox::<PgDialect>::new(1).await;
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

/// The notify trigger's oid, if the outbox table has it.
async fn notify_trigger(outbox: &PgOutbox) -> Option<u32> {
    let oid: Option<sqlx::postgres::types::Oid> = sqlx::query_scalar(
        "SELECT oid FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
    )
    .bind(outbox.table_prefix().render("{p}outbox"))
    .bind(outbox.table_prefix().render("{p}outbox_notify"))
    .fetch_optional(outbox.pool())
    .await
    .unwrap();
    oid.map(|oid| oid.0)
}

/// Commits one message of aggregate `id`; returns its partition.
async fn commit_one(outbox: &PgOutbox, id: &str) -> u32 {
    let mut tx = outbox.pool().begin().await.unwrap();
    let enqueued = outbox
        .enqueue(&mut tx, order_event(id, "order.created"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    enqueued.partition
}

/// `outbox.wake`: every `migrate` makes the notify trigger follow the setting, leaving the
/// table alone when it already does; commits wake a listening relay only while the trigger
/// is there, and a store set to poll never listens (its relay's polls find the rows).
#[tokio::test]
async fn the_notify_trigger_follows_wake_at_every_migrate() {
    const SILENCE: Duration = Duration::from_millis(700);
    const PATIENCE: Duration = Duration::from_secs(10);
    let notified = TestOutbox::<PgDialect>::new(4).await;
    let created = notify_trigger(&notified)
        .await
        .expect("migrated with notify");
    notified.migrate(4).await.unwrap();
    assert_eq!(
        notify_trigger(&notified).await,
        Some(created),
        "an unchanged setting leaves the trigger as it was"
    );
    let polled = notified
        .open(StoreSettings {
            table_prefix: notified.table_prefix().clone(),
            wake: Wake::Poll,
            ..StoreSettings::default()
        })
        .await;

    let listening = Arc::new(Wakers::new(4));
    let listener = {
        let (store, wakers) = (notified.clone(), Arc::clone(&listening));
        tokio::spawn(async move { store.watch(&wakers).await })
    };
    for partition in 0..4 {
        timeout(PATIENCE, listening.wait(partition))
            .await
            .expect("the listener wakes every partition once it listens");
    }
    let partition = commit_one(&notified, "1").await;
    timeout(PATIENCE, listening.wait(partition))
        .await
        .expect("a commit notifies while the trigger is there");

    polled.migrate(4).await.unwrap();
    assert_eq!(notify_trigger(&polled).await, None, "wake = poll drops it");
    polled.migrate(4).await.unwrap();
    assert_eq!(notify_trigger(&polled).await, None);
    let polling = Arc::new(Wakers::new(4));
    let poller = {
        let (store, wakers) = (polled.clone(), Arc::clone(&polling));
        tokio::spawn(async move { store.watch(&wakers).await })
    };
    let partition = commit_one(&polled, "2").await;
    assert!(
        timeout(SILENCE, listening.wait(partition)).await.is_err(),
        "no notification without the trigger"
    );
    assert!(
        timeout(SILENCE, polling.wait(partition)).await.is_err(),
        "a store set to poll does not listen"
    );
    assert!(
        !poller.is_finished(),
        "a polled store's watch waits forever"
    );

    notified.migrate(4).await.unwrap();
    assert!(
        notify_trigger(&notified).await.is_some(),
        "wake = notify creates it again"
    );
    let partition = commit_one(&notified, "3").await;
    timeout(PATIENCE, listening.wait(partition))
        .await
        .expect("commits notify again");
    listener.abort();
    poller.abort();
}
