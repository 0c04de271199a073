//! PostgreSQL store and inbox against the real server (`FERRY_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test uses its own table prefix.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferry::file::{FileSink, FileSinkConfig};
use ferry::postgres::{PgInbox, PgOutbox};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{
    EnqueueError, InvalidMessage, LeaseStore, NewMessage, OutboxStore, Processed, ReceivedMessage,
    Relay, RelayConfig, StoreError, Takeover, partition_for,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

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

fn order_event(id: &str, event: &str) -> NewMessage {
    NewMessage::new("order", id, event, format!(r#"{{"order":"{id}"}}"#))
}

/// Enqueues `message` in its own committed transaction.
async fn enqueue_committed(outbox: &PgOutbox, message: NewMessage) -> ferry::Enqueued {
    let mut tx = outbox.pool().begin().await.unwrap();
    let enqueued = outbox.enqueue(&mut tx, message).await.unwrap();
    tx.commit().await.unwrap();
    enqueued
}

async fn count(outbox: &PgOutbox, table: &str) -> i64 {
    let sql = outbox
        .table_prefix()
        .render(&format!("SELECT count(*) FROM {{p}}{table}"));
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(outbox.pool())
        .await
        .unwrap()
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
    let outbox = outbox().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&outbox, "outbox").await, 0);

    let enqueued = enqueue_committed(&outbox, order_event("1", "order.created")).await;
    assert_eq!(count(&outbox, "outbox").await, 1);
    // The rolled-back write did not consume a version either.
    assert_eq!(enqueued.version, 1);
    let fetched = outbox.fetch(enqueued.partition, 10).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].id, enqueued.id);
    assert_eq!(fetched[0].partition_key, "order/1");
    assert_eq!(fetched[0].id.get_version_num(), 7);
}

#[tokio::test]
async fn g3_concurrent_writers_of_one_aggregate_get_versions_in_commit_order() {
    let outbox = outbox().await;
    let mut writers = Vec::new();
    for w in 0..6 {
        let outbox = outbox.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..15 {
                let mut tx = outbox.pool().begin().await.unwrap();
                outbox
                    .enqueue(&mut tx, order_event("hot", &format!("w{w}.{i}")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let partition = partition_for("order/hot", 4);
    let rows = outbox.fetch(partition, 1000).await.unwrap();
    let versions: Vec<u64> = rows.iter().map(|m| m.version).collect();
    assert_eq!(
        versions,
        (1..=90).collect::<Vec<_>>(),
        "sequence order must equal version order"
    );
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
    assert_eq!(count(&outbox, "outbox").await, 1);
}

#[tokio::test]
async fn g5_mark_is_fenced_after_the_lease_is_taken_over() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    let enqueued = enqueue_committed(&outbox, order_event("1", "order.created")).await;

    let first = outbox
        .acquire("relay-a", 1, Duration::from_secs(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((first.epoch, &first.takeover), (1, &Takeover::Clean));
    assert!(
        outbox
            .acquire("relay-b", 1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = outbox
        .acquire("relay-b", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.epoch, 2);
    assert!(
        matches!(second.takeover, Takeover::Unclean { .. }),
        "{:?}",
        second.takeover
    );

    let err = outbox
        .mark_published(&first, &[enqueued.id], Some(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                partition: 0,
                epoch: 1
            }
        ),
        "{err}"
    );
    assert_eq!(
        count(&outbox, "outbox").await,
        1,
        "a fenced mark changes nothing"
    );
    assert!(
        outbox
            .renew(std::slice::from_ref(&first), Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        outbox
            .mark_published(&second, &[enqueued.id], Some(5))
            .await
            .unwrap(),
        1
    );
    assert_eq!(count(&outbox, "outbox").await, 0);
    outbox.release(&second, true).await.unwrap();
    let third = outbox
        .acquire("relay-c", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((third.epoch, &third.takeover), (3, &Takeover::Clean));
    outbox.release(&third, false).await.unwrap();
    let fourth = outbox
        .acquire("relay-c", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert!(
        matches!(
            fourth.takeover,
            Takeover::Unclean {
                checkpoint: Some(5),
                ..
            }
        ),
        "an unclean release hands the checkpoint on: {:?}",
        fourth.takeover
    );
}

#[tokio::test]
async fn heartbeat_counts_live_relays() {
    let outbox = outbox().await;
    assert_eq!(
        outbox
            .heartbeat("a", Duration::from_secs(10))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        outbox
            .heartbeat("b", Duration::from_secs(10))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        outbox
            .heartbeat("a", Duration::from_secs(10))
            .await
            .unwrap(),
        2
    );
    outbox.leave("b").await.unwrap();
    assert_eq!(
        outbox
            .heartbeat("a", Duration::from_secs(10))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn g6_retention_keeps_published_rows_until_purged() {
    let outbox = outbox_with(1, Duration::from_secs(1)).await;
    let enqueued = enqueue_committed(&outbox, order_event("1", "order.created")).await;
    let lease = outbox
        .acquire("r", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        outbox
            .mark_published(&lease, &[enqueued.id], None)
            .await
            .unwrap(),
        1
    );
    assert!(
        outbox.fetch(0, 10).await.unwrap().is_empty(),
        "published rows are not fetched again"
    );
    assert_eq!(count(&outbox, "outbox").await, 1, "kept for replay");
    assert_eq!(
        outbox.purge_published().await.unwrap(),
        0,
        "not yet past retention"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(outbox.purge_published().await.unwrap(), 1);
    assert_eq!(count(&outbox, "outbox").await, 0);
}

#[tokio::test]
async fn status_shows_owner_backlog_and_blocked_reason() {
    let outbox = outbox_with(2, Duration::ZERO).await;
    let e = enqueue_committed(&outbox, order_event("1", "order.created")).await;
    let leases = outbox
        .acquire("relay-x", 2, Duration::from_secs(10))
        .await
        .unwrap();
    let lease = leases.iter().find(|l| l.partition == e.partition).unwrap();
    outbox
        .set_blocked(lease, Some("message too large"))
        .await
        .unwrap();
    let status = outbox.status().await.unwrap();
    let p = &status[e.partition as usize];
    assert_eq!(p.owner.as_deref(), Some("relay-x"));
    assert_eq!(p.backlog, 1);
    assert!(p.oldest_unpublished_age_secs.is_some());
    assert_eq!(p.blocked_reason.as_deref(), Some("message too large"));
    let other = &status[1 - e.partition as usize];
    assert_eq!((other.backlog, other.blocked_reason.as_deref()), (0, None));
}

/// Runs a relay into a JSON-lines file until `expected` events are there; returns them.
async fn relay_into_file(outbox: &PgOutbox, expected: usize) -> Vec<ReceivedMessage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = FileSink::open(&FileSinkConfig {
        path: path.clone(),
        source: None,
    })
    .await
    .unwrap();
    let store = Arc::new(outbox.clone());
    let mut config = RelayConfig::new("file-relay");
    config.poll_interval = Duration::from_millis(50);
    config.lease_ttl = Duration::from_secs(3);
    let stop = CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(store.clone(), store, Arc::new(sink), config).run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let events: Vec<ReceivedMessage> = text
            .lines()
            .map(|l| ReceivedMessage::from_structured_json(l).unwrap())
            .collect();
        if events.len() >= expected || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    relay.await.unwrap().unwrap();
    events
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
    assert_eq!(count(&outbox, "outbox").await, 0);
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
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &events {
        per_aggregate
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.version);
    }
    for (agg, versions) in per_aggregate {
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "aggregate {agg}");
    }
}

async fn inbox_fixture() -> (PgOutbox, PgInbox, String) {
    let outbox = outbox().await;
    let inbox = PgInbox::new("billing", outbox.table_prefix());
    let table = outbox.table_prefix().render("{p}effects");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id uuid PRIMARY KEY, version bigint)"
    )))
    .execute(outbox.pool())
    .await
    .unwrap();
    (outbox, inbox, table)
}

fn received(aggregate: &str, version: u64) -> ReceivedMessage {
    ReceivedMessage {
        id: uuid::Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate.into(),
        version,
        event_type: "order.paid".into(),
        partition_key: format!("order/{aggregate}"),
        payload: bytes::Bytes::from_static(b"{}"),
        headers: Default::default(),
        time: None,
    }
}

async fn apply(
    outbox: &PgOutbox,
    inbox: &PgInbox,
    table: &str,
    message: &ReceivedMessage,
    fail: bool,
) -> Result<Processed<()>, ferry::ProcessError<sqlx::Error>> {
    let mut tx = outbox.pool().begin().await.unwrap();
    let insert = format!("INSERT INTO {table} (id, version) VALUES ($1, $2)");
    let result = inbox
        .process(&mut tx, message, async |tx, m| {
            sqlx::query(sqlx::AssertSqlSafe(insert))
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

#[tokio::test]
async fn g4_inbox_skips_duplicate_ids_and_stale_versions() {
    let (outbox, inbox, table) = inbox_fixture().await;
    let v1 = received("1", 1);
    let v2 = received("1", 2);
    assert_eq!(
        apply(&outbox, &inbox, &table, &v1, false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 0
        }
    );
    assert_eq!(
        apply(&outbox, &inbox, &table, &v2, false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 1
        }
    );
    assert_eq!(
        apply(&outbox, &inbox, &table, &v2, false).await.unwrap(),
        Processed::Duplicate
    );
    let replayed_old = received("1", 1);
    assert_eq!(
        apply(&outbox, &inbox, &table, &replayed_old, false)
            .await
            .unwrap(),
        Processed::Stale {
            last_applied_version: 2
        }
    );
    // Another aggregate is independent; a gap is reported through previous_version.
    assert_eq!(
        apply(&outbox, &inbox, &table, &received("2", 3), false)
            .await
            .unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 0
        }
    );
    assert_eq!(
        count(&outbox, "effects").await,
        3,
        "the handler ran once per applied message"
    );
}

#[tokio::test]
async fn g4_handler_effects_and_inbox_record_roll_back_together() {
    let (outbox, inbox, table) = inbox_fixture().await;
    let message = received("1", 1);
    let err = apply(&outbox, &inbox, &table, &message, true)
        .await
        .unwrap_err();
    assert!(matches!(err, ferry::ProcessError::Handler(_)));
    assert_eq!(count(&outbox, "effects").await, 0);
    assert_eq!(
        count(&outbox, "inbox").await,
        0,
        "the inbox record rolled back with the handler"
    );
    assert!(
        apply(&outbox, &inbox, &table, &message, false)
            .await
            .unwrap()
            .is_applied(),
        "a redelivery applies it"
    );
    assert_eq!(count(&outbox, "effects").await, 1);
}
