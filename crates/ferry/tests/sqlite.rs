//! SQLite store, leases and inbox, each test on its own database file in a temporary
//! directory (no server needed).
#![cfg(feature = "sqlite")]

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::sqlite::{SqliteInbox, SqliteOutbox};
use ferry::{
    Delivery, EnqueueError, InvalidMessage, Lease, LeaseStore, Message, NewMessage, OutboxStore,
    Processed, ReceivedMessage, ReconcileRequest, Relay, RelayConfig, RelayStats, Sink, SinkError,
    StoreError, Takeover, partition_for,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PARTITIONS: u32 = 4;

/// An outbox on a fresh database file; the directory lives as long as the value.
struct TestDb {
    dir: TempDir,
    outbox: SqliteOutbox,
}

impl TestDb {
    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("ferry.db").display())
    }

    /// A second store on the same file, as another process would open it.
    async fn open_again(&self, settings: StoreSettings) -> SqliteOutbox {
        SqliteOutbox::connect(&self.url(), 4, settings)
            .await
            .expect("reopen the database")
    }

    async fn count(&self, sql: &str) -> i64 {
        let sql = self.outbox.table_prefix().render(sql);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(self.outbox.pool())
            .await
            .expect("count query")
    }
}

fn settings(retention: Duration) -> StoreSettings {
    StoreSettings {
        max_payload_bytes: 1024,
        retention,
        ..StoreSettings::default()
    }
}

async fn unmigrated(settings: StoreSettings) -> TestDb {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
    let outbox = SqliteOutbox::connect(&url, 4, settings)
        .await
        .expect("connect");
    TestDb { dir, outbox }
}

async fn db_with(retention: Duration) -> TestDb {
    let db = unmigrated(settings(retention)).await;
    db.outbox.migrate(PARTITIONS).await.expect("migrate");
    db
}

async fn db() -> TestDb {
    db_with(Duration::ZERO).await
}

fn order_event(id: &str, event: &str) -> NewMessage {
    NewMessage::new("order", id, event, format!(r#"{{"order":"{id}"}}"#))
}

/// Enqueues `messages` in one committed transaction.
async fn enqueue_committed(
    outbox: &SqliteOutbox,
    messages: Vec<NewMessage>,
) -> Vec<ferry::Enqueued> {
    let mut tx = outbox.pool().begin().await.expect("begin");
    let mut enqueued = Vec::new();
    for message in messages {
        enqueued.push(outbox.enqueue(&mut tx, message).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");
    enqueued
}

/// The lease of `partition` among `leases`.
fn lease_of(leases: &[Lease], partition: u32) -> &Lease {
    leases
        .iter()
        .find(|lease| lease.partition == partition)
        .expect("partition granted")
}

#[tokio::test]
async fn migrate_is_idempotent_and_partitions_are_fixed() {
    let db = db().await;
    db.outbox
        .migrate(PARTITIONS)
        .await
        .expect("second migrate is a no-op");
    assert_eq!(
        db.outbox.partitions().await.expect("partitions"),
        PARTITIONS
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}leases").await, 4);
    assert_eq!(
        db.count("SELECT CAST(value AS INTEGER) FROM {p}meta WHERE key = 'schema_version'")
            .await,
        2,
        "the latest schema version"
    );

    let err = db
        .outbox
        .migrate(8)
        .await
        .expect_err("another partition count");
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("has 4 partitions"), "{text}");
    assert!(text.contains("fixed at set-up"), "{text}");
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}leases").await, 4);

    // A store opened later reads P from the database.
    let other = db.open_again(settings(Duration::ZERO)).await;
    assert_eq!(other.partitions().await.expect("partitions"), PARTITIONS);

    for bad in [0, 4097] {
        let err = db.outbox.migrate(bad).await.expect_err("out of range");
        assert!(err.to_string().contains("between 1 and 4096"), "{err}");
    }
}

#[tokio::test]
async fn unmigrated_store_points_at_migrate() {
    let db = unmigrated(settings(Duration::ZERO)).await;
    let err = db.outbox.partitions().await.expect_err("no tables yet");
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("ferry migrate"), "{err}");
}

#[tokio::test]
async fn invalid_prefix_is_refused_and_prefixes_keep_outboxes_apart() {
    for bad in ["ferry-", "Ferry_", "x; DROP TABLE y", ""] {
        let err = TablePrefix::new(bad).expect_err("invalid prefix");
        assert!(err.to_string().contains("not a valid identifier"), "{err}");
    }
    let db = db().await;
    let other = db
        .open_again(StoreSettings {
            table_prefix: TablePrefix::new("other_").expect("valid prefix"),
            ..settings(Duration::ZERO)
        })
        .await;
    other
        .migrate(2)
        .await
        .expect("a second outbox in the same file");
    enqueue_committed(&other, vec![order_event("1", "order.created")]).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM other_outbox").await, 1);
}

/// G1: a message exists if and only if its transaction committed; versions count 1..n per
/// aggregate.
#[tokio::test]
async fn enqueue_is_atomic_with_the_business_transaction() {
    let db = db().await;
    let outbox = &db.outbox;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
        .execute(outbox.pool())
        .await
        .expect("business table");

    let mut tx = outbox.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES ('1')")
        .execute(&mut *tx)
        .await
        .expect("business write");
    outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM orders").await, 0);
    // The rolled-back version was not used up either.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM {p}aggregate_versions").await,
        0
    );

    let mut tx = outbox.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES ('1')")
        .execute(&mut *tx)
        .await
        .expect("business write");
    let mut enqueued = Vec::new();
    for (aggregate, event) in [
        ("1", "created"),
        ("2", "created"),
        ("1", "paid"),
        ("1", "shipped"),
    ] {
        enqueued.push(
            outbox
                .enqueue(&mut tx, order_event(aggregate, event))
                .await
                .expect("enqueue"),
        );
    }
    tx.commit().await.expect("commit");

    let versions: Vec<u64> = enqueued.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 1, 2, 3]);
    assert!(enqueued.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(enqueued[0].partition, partition_for("order/1", PARTITIONS));
    assert_eq!(enqueued[1].partition, partition_for("order/2", PARTITIONS));
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 4);

    let stored = outbox
        .fetch(enqueued[0].partition, 10)
        .await
        .expect("fetch");
    let ids: Vec<Uuid> = stored.iter().map(|m| m.id).collect();
    assert!(ids.contains(&enqueued[0].id));
    assert_eq!(ids[0].get_version_num(), 7, "ids are UUID v7");
}

#[tokio::test]
async fn invalid_message_leaves_the_transaction_usable() {
    let db = db().await;
    let outbox = &db.outbox;
    let mut tx = outbox.pool().begin().await.expect("begin");
    let oversize = NewMessage::new("order", "1", "order.created", vec![b'x'; 1025]);
    let err = outbox
        .enqueue(&mut tx, oversize)
        .await
        .expect_err("payload over the limit");
    assert!(
        matches!(
            err,
            EnqueueError::Invalid(InvalidMessage::PayloadTooLarge {
                size: 1025,
                limit: 1024
            })
        ),
        "{err}"
    );
    let enqueued = outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .expect("the same transaction goes on");
    tx.commit().await.expect("commit");
    assert_eq!(enqueued.version, 1, "the refused message took no version");
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 1);
}

#[tokio::test]
async fn fetch_returns_unpublished_rows_in_sequence_order() {
    let db = db().await;
    let outbox = &db.outbox;
    let key = "tenant-7";
    let partition = partition_for(key, PARTITIONS);
    let messages = (0..5)
        .map(|i| {
            NewMessage::new("order", i.to_string(), "order.created", vec![i as u8])
                .with_partition_key(key)
                .with_header("traceparent", format!("00-{i}"))
        })
        .collect();
    let enqueued = enqueue_committed(outbox, messages).await;
    let forced_id = Uuid::now_v7();
    let mut replay = order_event("99", "order.replayed").with_partition_key(key);
    replay.id = Some(forced_id);
    enqueue_committed(outbox, vec![replay]).await;

    let first = outbox.fetch(partition, 3).await.expect("fetch");
    assert_eq!(first.len(), 3, "limit is respected");
    let all = outbox.fetch(partition, 100).await.expect("fetch");
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(first[..], all[..3]);

    let message = &all[2];
    assert_eq!(message.id, enqueued[2].id);
    assert_eq!(message.sequence, enqueued[2].sequence);
    assert_eq!(message.partition, partition);
    assert_eq!(message.partition_key, key);
    assert_eq!(message.aggregate_id, "2");
    assert_eq!(message.payload.as_ref(), [2]);
    assert_eq!(
        message.headers,
        BTreeMap::from([("traceparent".to_owned(), "00-2".to_owned())])
    );
    let age = chrono::Utc::now() - message.created_at;
    assert!(
        age < chrono::TimeDelta::seconds(60),
        "created_at from the clock: {age}"
    );
    assert_eq!(all[5].id, forced_id, "a given id is kept");

    // No cursor: a marked row disappears, every other one is still returned.
    let leases = outbox
        .acquire("relay-a", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire");
    let lease = lease_of(&leases, partition);
    let marked = outbox
        .mark_published(lease, &[all[1].id], None)
        .await
        .expect("mark");
    assert_eq!(marked, 1);
    let rest: Vec<Uuid> = outbox
        .fetch(partition, 100)
        .await
        .expect("fetch")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(rest.len(), 5);
    assert!(!rest.contains(&all[1].id));
    assert_eq!(rest[0], all[0].id);
}

/// G5: after another relay is granted the expired lease, the old lease marks nothing.
#[tokio::test]
async fn expired_lease_is_fenced() {
    let db = db().await;
    let outbox = &db.outbox;
    let enqueued = enqueue_committed(outbox, vec![order_event("1", "order.created")]).await;
    let partition = enqueued[0].partition;

    let short = Duration::from_millis(200);
    let old_leases = outbox
        .acquire("relay-a", PARTITIONS as usize, short)
        .await
        .expect("acquire");
    let old = lease_of(&old_leases, partition).clone();
    assert_eq!(old.epoch, 1);
    assert_eq!(old.takeover, Takeover::Clean);
    let other = db.open_again(settings(Duration::ZERO)).await;
    assert!(
        other
            .acquire("relay-b", PARTITIONS as usize, short)
            .await
            .expect("acquire")
            .is_empty(),
        "held leases are not granted"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_leases = other
        .acquire("relay-b", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire after expiry");
    let new = lease_of(&new_leases, partition);
    assert_eq!(new.epoch, 2);
    assert!(
        matches!(new.takeover, Takeover::Unclean { since_expiry, checkpoint: None } if since_expiry >= Duration::from_millis(50)),
        "{:?}",
        new.takeover
    );

    let err = outbox
        .mark_published(&old, &[enqueued[0].id], Some(7))
        .await
        .expect_err("fenced");
    assert!(
        matches!(err, StoreError::Fenced { partition: p, epoch: 1 } if p == partition),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 1);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM {p}leases WHERE checkpoint IS NOT NULL")
            .await,
        0,
        "a fenced mark records no checkpoint"
    );
    let err = outbox
        .set_blocked(&old, Some("rejected"))
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(
        outbox
            .renew(std::slice::from_ref(&old), short)
            .await
            .expect("renew")
            .is_empty()
    );

    // The new owner marks; the old owner's release changes nothing.
    outbox
        .release(&old, true)
        .await
        .expect("release is harmless");
    assert_eq!(
        other
            .mark_published(new, &[enqueued[0].id], None)
            .await
            .expect("mark"),
        1
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 0);
}

#[tokio::test]
async fn renew_release_and_takeover_kinds() {
    let db = db().await;
    let outbox = &db.outbox;
    let ttl = Duration::from_secs(10);

    assert_eq!(
        outbox.heartbeat("relay-a", ttl).await.expect("heartbeat"),
        1
    );
    assert_eq!(
        outbox.heartbeat("relay-b", ttl).await.expect("heartbeat"),
        2
    );
    assert_eq!(
        outbox.heartbeat("relay-a", ttl).await.expect("heartbeat"),
        2
    );

    let first = outbox.acquire("relay-a", 2, ttl).await.expect("acquire");
    assert_eq!(
        first.iter().map(|l| l.partition).collect::<Vec<_>>(),
        [0, 1],
        "at most `max` partitions"
    );
    assert!(
        first
            .iter()
            .all(|l| l.epoch == 1 && l.takeover == Takeover::Clean)
    );
    let rest = outbox.acquire("relay-b", 10, ttl).await.expect("acquire");
    assert_eq!(rest.iter().map(|l| l.partition).collect::<Vec<_>>(), [2, 3]);

    let renewed = outbox.renew(&first, ttl).await.expect("renew");
    assert_eq!(renewed, [0, 1]);
    let mut stale = first[0].clone();
    stale.epoch += 1;
    let mut impostor = first[1].clone();
    impostor.owner = "relay-b".into();
    assert!(
        outbox
            .renew(&[stale, impostor], ttl)
            .await
            .expect("renew")
            .is_empty(),
        "renew needs the owner and the epoch"
    );

    // Checkpoints only move forward.
    outbox
        .mark_published(&first[1], &[], Some(10))
        .await
        .expect("mark");
    outbox
        .mark_published(&first[1], &[], Some(5))
        .await
        .expect("mark");

    outbox
        .release(&first[0], true)
        .await
        .expect("release clean");
    outbox
        .release(&first[1], false)
        .await
        .expect("release unclean");
    let retaken = outbox.acquire("relay-b", 10, ttl).await.expect("acquire");
    assert_eq!(retaken.len(), 2);
    assert_eq!(lease_of(&retaken, 0).epoch, 2);
    assert_eq!(lease_of(&retaken, 0).takeover, Takeover::Clean);
    assert!(
        matches!(
            lease_of(&retaken, 1).takeover,
            Takeover::Unclean {
                checkpoint: Some(10),
                ..
            }
        ),
        "{:?}",
        lease_of(&retaken, 1).takeover
    );

    outbox.leave("relay-a").await.expect("leave");
    assert_eq!(
        outbox.heartbeat("relay-b", ttl).await.expect("heartbeat"),
        1
    );
}

#[tokio::test]
async fn status_reports_owner_backlog_and_blocks() {
    let db = db().await;
    let outbox = &db.outbox;
    let enqueued = enqueue_committed(
        outbox,
        (0..10)
            .map(|i| order_event(&i.to_string(), "order.created"))
            .collect(),
    )
    .await;
    let status = outbox.status().await.expect("status");
    assert_eq!(status.len(), PARTITIONS as usize);
    for partition in &status {
        let expected = enqueued
            .iter()
            .filter(|e| e.partition == partition.partition)
            .count() as u64;
        assert_eq!(partition.backlog, expected, "{partition:?}");
        assert_eq!(partition.owner, None);
        assert_eq!(partition.epoch, 0);
        assert_eq!(
            partition.oldest_unpublished_age_secs.is_some(),
            expected > 0
        );
        assert!(partition.oldest_unpublished_age_secs.unwrap_or(0.0) < 60.0);
    }

    let busy = enqueued[0].partition;
    let leases = outbox
        .acquire("relay-a", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire");
    let lease = lease_of(&leases, busy);
    outbox
        .set_blocked(lease, Some("message rejected: too large"))
        .await
        .expect("block");
    let ids: Vec<Uuid> = enqueued
        .iter()
        .filter(|e| e.partition == busy)
        .map(|e| e.id)
        .collect();
    outbox
        .mark_published(lease, &ids, None)
        .await
        .expect("mark");

    let status = outbox.status().await.expect("status");
    let row = &status[busy as usize];
    assert_eq!(row.partition, busy);
    assert_eq!(row.owner.as_deref(), Some("relay-a"));
    assert_eq!(row.epoch, 1);
    assert!(
        row.lease_expires_at
            .is_some_and(|at| at > chrono::Utc::now())
    );
    assert_eq!(row.backlog, 0);
    assert_eq!(row.oldest_unpublished_age_secs, None);
    assert_eq!(
        row.blocked_reason.as_deref(),
        Some("message rejected: too large")
    );

    outbox.set_blocked(lease, None).await.expect("unblock");
    assert_eq!(
        outbox.status().await.expect("status")[busy as usize].blocked_reason,
        None
    );
}

/// G6: with a retention, marked rows stay (for replay) until purged.
#[tokio::test]
async fn retention_keeps_published_rows_until_purged() {
    let retention = Duration::from_millis(400);
    let db = db_with(retention).await;
    let outbox = &db.outbox;
    assert_eq!(outbox.retention(), retention);
    let enqueued = enqueue_committed(
        outbox,
        (0..3)
            .map(|i| order_event("1", &format!("order.e{i}")))
            .collect(),
    )
    .await;
    let partition = enqueued[0].partition;
    let leases = outbox
        .acquire("relay-a", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire");
    let lease = lease_of(&leases, partition);
    let ids: Vec<Uuid> = enqueued[..2].iter().map(|e| e.id).collect();
    assert_eq!(
        outbox
            .mark_published(lease, &ids, None)
            .await
            .expect("mark"),
        2
    );
    assert_eq!(
        outbox
            .mark_published(lease, &ids, None)
            .await
            .expect("mark again"),
        0,
        "marking twice is harmless"
    );

    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 3);
    let unpublished = outbox.fetch(partition, 10).await.expect("fetch");
    assert_eq!(unpublished.len(), 1);
    assert_eq!(unpublished[0].id, enqueued[2].id);
    assert_eq!(
        outbox.status().await.expect("status")[partition as usize].backlog,
        1
    );

    assert_eq!(
        outbox.purge_published().await.expect("purge"),
        0,
        "still within retention"
    );
    tokio::time::sleep(retention + Duration::from_millis(200)).await;
    assert_eq!(outbox.purge_published().await.expect("purge"), 2);
    assert_eq!(db.count("SELECT COUNT(*) FROM {p}outbox").await, 1);
}

/// SQLite has one writer at a time: a writer that cannot get the lock within the busy
/// timeout gets a retryable error, and succeeds once the lock is free.
#[tokio::test]
async fn busy_database_is_a_retryable_error() {
    let db = db().await;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url())
        .expect("url")
        .busy_timeout(Duration::from_millis(100));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options)
        .await
        .expect("connect");
    let impatient = SqliteOutbox::new(pool, settings(Duration::ZERO));
    let leases = impatient
        .acquire("relay-a", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire");

    // A producer holds the write lock.
    let mut held = db.outbox.pool().begin().await.expect("begin");
    let enqueued = db
        .outbox
        .enqueue(&mut held, order_event("1", "order.created"))
        .await
        .expect("enqueue");

    let mut tx = impatient.pool().begin().await.expect("begin");
    let err = impatient
        .enqueue(&mut tx, order_event("2", "order.created"))
        .await
        .expect_err("write lock held");
    assert!(
        matches!(&err, EnqueueError::Store(store) if store.is_retryable()),
        "{err}"
    );
    tx.rollback().await.expect("rollback");
    let lease = lease_of(&leases, enqueued.partition);
    let err = impatient
        .mark_published(lease, &[enqueued.id], None)
        .await
        .expect_err("write lock held");
    assert!(err.is_retryable(), "{err}");

    // A transaction that read before another writer committed cannot write at all
    // (SQLITE_BUSY_SNAPSHOT, an extended code): retryable too, in a new transaction.
    let mut stale = impatient.pool().begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM ferry_outbox")
        .execute(&mut *stale)
        .await
        .expect("read");
    held.commit().await.expect("commit");
    let err = impatient
        .enqueue(&mut stale, order_event("2", "order.created"))
        .await
        .expect_err("snapshot is stale");
    assert!(
        matches!(&err, EnqueueError::Store(store) if store.is_retryable()),
        "{err}"
    );
    stale.rollback().await.expect("rollback");

    let mut tx = impatient.pool().begin().await.expect("begin");
    impatient
        .enqueue(&mut tx, order_event("2", "order.created"))
        .await
        .expect("enqueue once the lock is free");
    tx.commit().await.expect("commit");
    assert_eq!(
        impatient
            .mark_published(lease, &[enqueued.id], None)
            .await
            .expect("mark once the lock is free"),
        1
    );
}

/// G4 on the consumer side.
#[tokio::test]
async fn inbox_applies_each_message_once_and_never_a_stale_version() {
    let db = db().await;
    let pool = db.outbox.pool();
    sqlx::query("CREATE TABLE applied (id TEXT NOT NULL, version INTEGER NOT NULL)")
        .execute(pool)
        .await
        .expect("business table");
    let inbox = SqliteInbox::new("billing", &TablePrefix::default());

    let enqueued = enqueue_committed(
        &db.outbox,
        (0..3)
            .map(|i| order_event("1", &format!("order.e{i}")))
            .collect(),
    )
    .await;
    let messages = db
        .outbox
        .fetch(enqueued[0].partition, 10)
        .await
        .expect("fetch");
    let received: Vec<ReceivedMessage> = messages.into_iter().map(ReceivedMessage::from).collect();

    let apply = async |tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
                       message: &ReceivedMessage|
           -> Result<u64, sqlx::Error> {
        sqlx::query("INSERT INTO applied VALUES (?1, ?2)")
            .bind(message.id.to_string())
            .bind(message.version as i64)
            .execute(&mut **tx)
            .await?;
        Ok(message.version)
    };
    let failing = async |tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
                         message: &ReceivedMessage|
           -> Result<u64, &'static str> {
        sqlx::query("INSERT INTO applied VALUES (?1, ?2)")
            .bind(message.id.to_string())
            .bind(message.version as i64)
            .execute(&mut **tx)
            .await
            .map_err(|_| "insert failed")?;
        Err("downstream refused")
    };

    // Version 1 applies.
    let mut tx = pool.begin().await.expect("begin");
    let outcome = inbox
        .process(&mut tx, &received[0], apply)
        .await
        .expect("process");
    tx.commit().await.expect("commit");
    assert_eq!(
        outcome,
        Processed::Applied {
            output: 1,
            previous_version: 0
        }
    );

    // The same id again is a duplicate.
    let mut tx = pool.begin().await.expect("begin");
    let outcome = inbox
        .process(&mut tx, &received[0], apply)
        .await
        .expect("process");
    tx.commit().await.expect("commit");
    assert_eq!(outcome, Processed::Duplicate);

    // A handler error: the caller rolls back, taking the handler's write and the inbox
    // record with it.
    let mut tx = pool.begin().await.expect("begin");
    let err = inbox
        .process(&mut tx, &received[2], failing)
        .await
        .expect_err("handler fails");
    assert!(matches!(
        err,
        ferry::ProcessError::Handler("downstream refused")
    ));
    tx.rollback().await.expect("rollback");
    assert_eq!(db.count("SELECT COUNT(*) FROM applied").await, 1);

    // Re-processing applies it, skipping version 2 (it is reported).
    let mut tx = pool.begin().await.expect("begin");
    let outcome = inbox
        .process(&mut tx, &received[2], apply)
        .await
        .expect("process");
    tx.commit().await.expect("commit");
    assert_eq!(
        outcome,
        Processed::Applied {
            output: 3,
            previous_version: 1
        }
    );

    // Version 2 arrives late, with a new id: stale.
    let mut tx = pool.begin().await.expect("begin");
    let outcome = inbox
        .process(&mut tx, &received[1], apply)
        .await
        .expect("process");
    tx.commit().await.expect("commit");
    assert_eq!(
        outcome,
        Processed::Stale {
            last_applied_version: 3
        }
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM applied").await, 2);

    // Another consumer has its own record.
    let other = SqliteInbox::new("shipping", &TablePrefix::default());
    let mut tx = pool.begin().await.expect("begin");
    let outcome = other
        .process(&mut tx, &received[1], apply)
        .await
        .expect("process");
    tx.commit().await.expect("commit");
    assert!(outcome.is_applied());
}

/// Records what the relay publishes, to drive it end to end.
#[derive(Default)]
struct RecordingSink {
    published: Mutex<Vec<Message>>,
}

impl RecordingSink {
    fn published(&self) -> Vec<Message> {
        self.published.lock().expect("sink lock").clone()
    }
}

#[async_trait]
impl Sink for RecordingSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        self.published
            .lock()
            .expect("sink lock")
            .extend_from_slice(batch);
        batch.iter().map(|_| Ok(Delivery::default())).collect()
    }

    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }
}

/// Enqueues rounds `rounds` of every aggregate from four concurrent producers, one
/// message per transaction; round `r` is produced by producer `r % 4`, so the writers of
/// one aggregate race each other.
async fn produce(outbox: &Arc<SqliteOutbox>, aggregates: usize, rounds: Range<usize>) {
    let producers: Vec<_> = (0..4)
        .map(|worker| {
            let outbox = Arc::clone(outbox);
            let rounds = rounds.clone();
            tokio::spawn(async move {
                for round in rounds.filter(|round| round % 4 == worker) {
                    for aggregate in 0..aggregates {
                        let message = NewMessage::new(
                            "order",
                            aggregate.to_string(),
                            "order.updated",
                            format!(r#"{{"round":{round}}}"#),
                        );
                        enqueue_committed(&outbox, vec![message]).await;
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
}

/// Polls `done` every 20 ms for up to 60 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// G2 and G3 through the real relay loop: a second relay joins while producers commit,
/// the partitions are rebalanced, every message arrives once, each aggregate in version
/// order, and shutdown releases the leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_everything_in_order() {
    const PARTITIONS: u32 = 8;
    const AGGREGATES: usize = 20;
    const PER_AGGREGATE: usize = 25;
    const TOTAL: usize = AGGREGATES * PER_AGGREGATE;
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
    let producer = Arc::new(
        SqliteOutbox::connect(&url, 4, StoreSettings::default())
            .await
            .expect("connect"),
    );
    producer.migrate(PARTITIONS).await.expect("migrate");

    let sink = Arc::new(RecordingSink::default());
    let start_relay = async |name: &str| {
        let store = Arc::new(
            SqliteOutbox::connect(&url, 4, StoreSettings::default())
                .await
                .expect("connect"),
        );
        let config = RelayConfig {
            batch_size: 50,
            lease_ttl: Duration::from_secs(3),
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::new(name)
        };
        let relay = Relay::new(store.clone(), store, sink.clone(), config);
        let stats = relay.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        (stats, shutdown, task)
    };

    let (stats_a, shutdown_a, task_a) = start_relay("relay-a").await;
    produce(&producer, AGGREGATES, 0..12).await;
    let (stats_b, shutdown_b, task_b) = start_relay("relay-b").await;
    produce(&producer, AGGREGATES, 12..24).await;
    let owned = |stats: &RelayStats| stats.owned_partitions.load(Ordering::Relaxed);
    wait_until("the relays share the partitions", || {
        owned(&stats_a) > 0
            && owned(&stats_b) > 0
            && owned(&stats_a) + owned(&stats_b) == u64::from(PARTITIONS)
    })
    .await;
    // The last round goes through both relays.
    produce(&producer, AGGREGATES, 24..PER_AGGREGATE).await;
    wait_until("every message is delivered", || {
        sink.published().len() >= TOTAL
    })
    .await;
    // Let a late duplicate, if any, show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let published = sink.published();
    let unique: HashSet<Uuid> = published.iter().map(|m| m.id).collect();
    assert_eq!(unique.len(), TOTAL, "every message delivered");
    assert_eq!(published.len(), TOTAL, "no message delivered twice");
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for message in &published {
        versions
            .entry(message.aggregate_id.as_str())
            .or_default()
            .push(message.version);
    }
    assert_eq!(versions.len(), AGGREGATES);
    let expected: Vec<u64> = (1..=PER_AGGREGATE as u64).collect();
    for (aggregate, versions) in &versions {
        assert_eq!(versions, &expected, "aggregate {aggregate} out of order");
    }
    for stats in [&stats_a, &stats_b] {
        assert!(stats.published.load(Ordering::Relaxed) > 0, "{stats:?}");
    }
    assert_eq!(
        stats_a.published.load(Ordering::Relaxed) + stats_b.published.load(Ordering::Relaxed),
        TOTAL as u64
    );

    shutdown_a.cancel();
    shutdown_b.cancel();
    task_a.await.expect("relay task").expect("relay run");
    task_b.await.expect("relay task").expect("relay run");
    let status = producer.status().await.expect("status");
    assert!(
        status.iter().all(|p| p.owner.is_none() && p.backlog == 0),
        "{status:?}"
    );
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ferry_leases WHERE owner IS NOT NULL")
        .fetch_one(producer.pool())
        .await
        .expect("count");
    assert_eq!(held, 0, "shutdown released every lease");
    let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ferry_relays")
        .fetch_one(producer.pool())
        .await
        .expect("count");
    assert_eq!(live, 0, "both relays left");
}

/// What the relay asked of a [`LifecycleSink`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SinkCall {
    Open { partition: u32, epoch: i64 },
    Reconcile { partition: u32 },
    Publish { partition: u32, ids: Vec<Uuid> },
    Fenced { partition: u32 },
    Close { partition: u32 },
}

/// Records the relay's calls; the first publish to `fence` is refused as fenced.
struct LifecycleSink {
    calls: Mutex<Vec<SinkCall>>,
    fence: u32,
}

impl LifecycleSink {
    fn calls(&self) -> Vec<SinkCall> {
        self.calls.lock().expect("sink lock").clone()
    }

    fn record(&self, call: SinkCall) {
        self.calls.lock().expect("sink lock").push(call);
    }
}

#[async_trait]
impl Sink for LifecycleSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let partition = batch[0].partition;
        let fenced_before = self.calls().contains(&SinkCall::Fenced { partition });
        if partition == self.fence && !fenced_before {
            self.record(SinkCall::Fenced { partition });
            return batch
                .iter()
                .map(|_| Err(SinkError::fenced("a newer producer owns the partition")))
                .collect();
        }
        self.record(SinkCall::Publish {
            partition,
            ids: batch.iter().map(|m| m.id).collect(),
        });
        batch.iter().map(|_| Ok(Delivery::default())).collect()
    }

    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        self.record(SinkCall::Reconcile {
            partition: request.partition,
        });
        Ok(Vec::new())
    }

    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        self.record(SinkCall::Open {
            partition: lease.partition,
            epoch: lease.epoch,
        });
        Ok(())
    }

    async fn close_partition(&self, partition: u32) {
        self.record(SinkCall::Close { partition });
    }
}

/// The relay opens a partition in the sink before reconciling or publishing it, closes it
/// after its last publish, and on a fenced publish marks nothing, closes the partition and
/// gives its lease up as unclean, so that the next owner (here the same relay) reopens and
/// reconciles it before publishing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_partition_hooks_bracket_each_lease_and_a_fenced_publish_gives_it_up() {
    let db = db().await;
    let outbox = Arc::new(db.open_again(settings(Duration::ZERO)).await);
    let messages: Vec<NewMessage> = (0..40)
        .map(|i| order_event(&i.to_string(), "order.placed"))
        .collect();
    let enqueued = enqueue_committed(&outbox, messages).await;
    let fence = enqueued[0].partition;
    let sink = Arc::new(LifecycleSink {
        calls: Mutex::default(),
        fence,
    });
    let config = RelayConfig {
        lease_ttl: Duration::from_secs(2),
        poll_interval: Duration::from_millis(20),
        retry_initial: Duration::from_millis(20),
        ..RelayConfig::new("relay-hooks")
    };
    let relay = Relay::new(outbox.clone(), outbox.clone(), sink.clone(), config);
    let stats = relay.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    wait_until("every message is published", || {
        stats.marked.load(Ordering::Relaxed) >= 40
    })
    .await;
    shutdown.cancel();
    task.await.expect("relay task").expect("relay run");

    let calls = sink.calls();
    let published: Vec<Uuid> = calls
        .iter()
        .filter_map(|call| match call {
            SinkCall::Publish { ids, .. } => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let unique: HashSet<Uuid> = published.iter().copied().collect();
    assert_eq!(
        published.len(),
        40,
        "each message published once: {calls:?}"
    );
    assert_eq!(unique, enqueued.iter().map(|e| e.id).collect());
    for partition in 0..PARTITIONS {
        let mine: Vec<&SinkCall> = calls
            .iter()
            .filter(|call| match call {
                SinkCall::Open { partition: p, .. }
                | SinkCall::Reconcile { partition: p }
                | SinkCall::Publish { partition: p, .. }
                | SinkCall::Fenced { partition: p }
                | SinkCall::Close { partition: p } => *p == partition,
            })
            .collect();
        // Each lease: open, then reconcile (unclean takeovers only) and publishes, then close.
        let mut open = false;
        for call in &mine {
            match call {
                SinkCall::Open { .. } => {
                    assert!(!open, "opened twice without a close: {mine:?}");
                    open = true;
                }
                SinkCall::Close { .. } => {
                    assert!(open, "closed without an open: {mine:?}");
                    open = false;
                }
                _ => assert!(open, "called outside an open lease: {mine:?}"),
            }
        }
        assert!(!open, "still open after shutdown: {mine:?}");
        if partition == fence {
            let fenced_at = mine
                .iter()
                .position(|c| matches!(c, SinkCall::Fenced { .. }))
                .expect("the fenced publish");
            let epochs: Vec<i64> = mine
                .iter()
                .filter_map(|c| match c {
                    SinkCall::Open { epoch, .. } => Some(*epoch),
                    _ => None,
                })
                .collect();
            assert!(epochs.len() >= 2 && epochs[1] > epochs[0], "{mine:?}");
            assert!(
                matches!(mine[fenced_at + 1], SinkCall::Close { .. }),
                "closed at once after the fence: {mine:?}"
            );
            assert!(
                matches!(mine[fenced_at + 2], SinkCall::Open { .. })
                    && matches!(mine[fenced_at + 3], SinkCall::Reconcile { .. }),
                "reopened and reconciled before publishing again: {mine:?}"
            );
        }
    }
    assert!(stats.leases_lost.load(Ordering::Relaxed) == 0, "{stats:?}");
}
