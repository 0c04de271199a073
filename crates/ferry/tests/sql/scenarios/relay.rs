//! The real relay loop on the store: every message published once, each aggregate in
//! version order (G2, G3), with one relay or two sharing the partitions.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry::sql::SqlOutbox;
use ferry::{
    Delivery, EnqueueError, Message, NewMessage, OutboxStore, ReconcileRequest, Relay, RelayConfig,
    RelayStats, Sink, SinkError,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{
    TestDialect, TestOutbox, commit_messages, count, enqueue_committed, number, order_event,
    relay_into_file, versions_per_aggregate, wait_until,
};

/// Transactions of 40 aggregates each, five rounds: a relay into a file publishes each
/// aggregate's five versions in order.
pub(crate) async fn relay_publishes_every_aggregate_in_version_order<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(8).await;
    for round in 0..5 {
        let messages = (0..40)
            .map(|agg| order_event(&agg.to_string(), &format!("step{round}")))
            .collect();
        commit_messages(&outbox, messages).await;
    }
    let events = relay_into_file(&outbox, 200).await;
    assert_eq!(events.len(), 200);
    let per_aggregate =
        versions_per_aggregate(events.iter().map(|e| (e.aggregate_id.as_str(), e.version)));
    for (agg, versions) in per_aggregate {
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "aggregate {agg}");
    }
}

/// Writers interleave on shared aggregates, committing in whatever order the locks allow:
/// the relay still publishes each aggregate's versions in order, without a gap.
pub(crate) async fn relay_publishes_every_aggregate_in_version_order_with_concurrent_writers<
    D: TestDialect,
>() {
    let outbox = TestOutbox::<D>::new(8).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for round in 0..10 {
                    let aggregates: Vec<_> = (0..5).map(|agg| (w * 5 + agg + round) % 20).collect();
                    commit_retrying(&outbox, &aggregates).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let events = relay_into_file(&outbox, 200).await;
    assert_eq!(events.len(), 200);
    let per_aggregate =
        versions_per_aggregate(events.iter().map(|e| (e.aggregate_id.as_str(), e.version)));
    assert_eq!(per_aggregate.len(), 20);
    for (agg, versions) in per_aggregate {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "aggregate {agg}");
    }
}

/// Enqueues one message per aggregate in one transaction, as an application would: a
/// transaction that fails retryably (a deadlock victim: the lock order wraps around, 19
/// then 0; a busy database) is rolled back and retried.
async fn commit_retrying<D: TestDialect>(outbox: &SqlOutbox<D>, aggregates: &[usize]) {
    'transaction: loop {
        let mut tx = outbox.pool().begin().await.unwrap();
        for id in aggregates {
            match outbox
                .enqueue(&mut tx, order_event(&id.to_string(), "step"))
                .await
            {
                Ok(_) => {}
                Err(EnqueueError::Store(err)) if err.is_retryable() => {
                    tx.rollback().await.unwrap();
                    continue 'transaction;
                }
                Err(err) => panic!("{err}"),
            }
        }
        tx.commit().await.unwrap();
        return;
    }
}

/// Records what the relay publishes.
#[derive(Default)]
struct RecordingSink {
    published: Mutex<Vec<Message>>,
}

impl RecordingSink {
    fn published(&self) -> Vec<Message> {
        self.published.lock().unwrap().clone()
    }
}

#[async_trait]
impl Sink for RecordingSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        self.published.lock().unwrap().extend_from_slice(batch);
        batch.iter().map(|_| Ok(Delivery::default())).collect()
    }

    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }
}

/// Enqueues rounds `rounds` of every aggregate from four concurrent producers, one
/// message per transaction; round `r` is produced by producer `r % 4`, so the writers of
/// one aggregate race each other.
async fn produce<D: TestDialect>(outbox: &TestOutbox<D>, aggregates: usize, rounds: Range<usize>) {
    let producers: Vec<_> = (0..4)
        .map(|worker| {
            let outbox = outbox.clone();
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
                        enqueue_committed(&outbox, message).await;
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
}

/// G2 and G3 through the real relay loop: a second relay joins while producers commit,
/// the partitions are rebalanced, every message arrives once, each aggregate in version
/// order, and shutdown releases the leases.
pub(crate) async fn two_relays_deliver_everything_in_order<D: TestDialect>() {
    const PARTITIONS: u32 = 8;
    const AGGREGATES: usize = 20;
    const PER_AGGREGATE: usize = 25;
    const TOTAL: usize = AGGREGATES * PER_AGGREGATE;
    let producer = TestOutbox::<D>::new(PARTITIONS).await;

    let sink = Arc::new(RecordingSink::default());
    let start_relay = async |name: &str| {
        let store = Arc::new(producer.open_again().await);
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
    let versions = versions_per_aggregate(
        published
            .iter()
            .map(|m| (m.aggregate_id.as_str(), m.version)),
    );
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
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    let status = producer.status().await.unwrap();
    assert!(
        status.iter().all(|p| p.owner.is_none() && p.backlog == 0),
        "{status:?}"
    );
    assert_eq!(
        number(
            &producer,
            "SELECT COUNT(*) AS n FROM {p}leases WHERE owner IS NOT NULL"
        )
        .await,
        0,
        "shutdown released every lease"
    );
    assert_eq!(count(&producer, "relays").await, 0, "both relays left");
}
