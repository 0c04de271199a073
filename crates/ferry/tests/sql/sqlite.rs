//! SQLite: the scenarios on a database file of their own each, and what only SQLite has:
//! one writer at a time, whose lock a writer may fail to get. The relay's sink hooks are
//! tested here too, on the store that needs no server.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry::sql::StoreSettings;
use ferry::sqlite::{SqliteDialect, SqliteOutbox};
use ferry::{
    Delivery, EnqueueError, Lease, LeaseStore, Message, NewMessage, OutboxStore, ReconcileRequest,
    Relay, RelayConfig, Sink, SinkError,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{
    TestDialect, TestOutbox, commit_messages, lease_of, order_event, settings, wait_until,
};

impl TestDialect for SqliteDialect {
    fn database_url(dir: &Path) -> String {
        format!("sqlite://{}", dir.join("ferry.db").display())
    }

    const CREATE_EFFECTS: &'static str = "CREATE TABLE {p}effects \
        (n INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE, version INTEGER NOT NULL)";
}

every_dialect_passes!(SqliteDialect);

const PARTITIONS: u32 = 4;

/// SQLite has one writer at a time: a writer that cannot get the lock within the busy
/// timeout gets a retryable error, and succeeds once the lock is free.
#[tokio::test]
async fn busy_database_is_a_retryable_error() {
    let db = TestOutbox::<SqliteDialect>::new(PARTITIONS).await;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(db.url())
        .expect("url")
        .busy_timeout(Duration::from_millis(100));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options)
        .await
        .expect("connect");
    let settings = StoreSettings {
        table_prefix: db.table_prefix().clone(),
        ..settings()
    };
    let impatient = SqliteOutbox::new(pool, settings);
    let leases = impatient
        .acquire("relay-a", PARTITIONS as usize, Duration::from_secs(10))
        .await
        .expect("acquire");

    // A producer holds the write lock.
    let mut held = db.pool().begin().await.expect("begin");
    let enqueued = db
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
    let read = db.table_prefix().render("SELECT COUNT(*) FROM {p}outbox");
    sqlx::query(sqlx::AssertSqlSafe(read))
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
    let db = TestOutbox::<SqliteDialect>::new(PARTITIONS).await;
    let outbox = Arc::new(db.open_again().await);
    let messages: Vec<NewMessage> = (0..40)
        .map(|i| order_event(&i.to_string(), "order.placed"))
        .collect();
    let enqueued = commit_messages(&outbox, messages).await;
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
