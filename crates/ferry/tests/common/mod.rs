//! What the store and sink test binaries share: messages, a relay into a file, and the
//! inbox scenarios every store's inbox must pass. Each binary includes this module and uses part
//! of it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod operations;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry::file::{FileSink, FileSinkConfig};
use ferry::{
    Enqueued, LeaseStore, NewMessage, OutboxStore, ProcessError, Processed, ReceivedMessage, Relay,
    RelayConfig, StoreError, Takeover, partition_for,
};
use tokio_util::sync::CancellationToken;

pub fn order_event(id: &str, event: &str) -> NewMessage {
    NewMessage::new("order", id, event, format!(r#"{{"order":"{id}"}}"#))
}

/// A message as a consumer receives it, with a fresh id.
pub fn received(aggregate: &str, version: u64) -> ReceivedMessage {
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

/// Versions per aggregate id, in arrival order.
pub fn versions_per_aggregate(events: &[ReceivedMessage]) -> BTreeMap<String, Vec<u64>> {
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in events {
        per_aggregate
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.version);
    }
    per_aggregate
}

/// Runs a relay on `store` into a JSON-lines file until `expected` events are there (or
/// 30 s passed); returns them.
pub async fn relay_into_file<S>(store: &S, expected: usize) -> Vec<ReceivedMessage>
where
    S: OutboxStore + LeaseStore + Clone,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = FileSink::open(&FileSinkConfig {
        path: path.clone(),
        source: None,
    })
    .await
    .unwrap();
    let store = Arc::new(store.clone());
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

pub type Applied = Result<Processed<()>, ProcessError<sqlx::Error>>;

/// A store's inbox wired for the shared scenarios.
pub trait InboxUnderTest {
    /// Runs `message` through the inbox in one transaction, with a handler that inserts a
    /// row into `<prefix>effects` and then fails if `fail`; commits on `Ok`, rolls back on
    /// `Err`.
    async fn apply(&self, message: &ReceivedMessage, fail: bool) -> Applied;

    /// Rows in `<prefix><table>`.
    async fn count(&self, table: &str) -> i64;
}

/// G4: a repeated id is a duplicate, an older version is stale, aggregates are
/// independent, and a gap shows in `previous_version`.
pub async fn inbox_skips_duplicate_ids_and_stale_versions(inbox: &impl InboxUnderTest) {
    let v1 = received("1", 1);
    let v2 = received("1", 2);
    assert_eq!(
        inbox.apply(&v1, false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 0
        }
    );
    assert_eq!(
        inbox.apply(&v2, false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 1
        }
    );
    assert_eq!(inbox.apply(&v2, false).await.unwrap(), Processed::Duplicate);
    assert_eq!(
        inbox.apply(&received("1", 1), false).await.unwrap(),
        Processed::Stale {
            last_applied_version: 2
        }
    );
    assert_eq!(
        inbox.apply(&received("2", 3), false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 0
        }
    );
    assert_eq!(
        inbox.count("effects").await,
        3,
        "the handler ran once per applied message"
    );
}

/// G4: a failing handler rolls the inbox record back with its effects, and a redelivery
/// applies the message.
pub async fn inbox_rolls_back_with_the_handler(inbox: &impl InboxUnderTest) {
    let message = received("1", 1);
    let err = inbox.apply(&message, true).await.unwrap_err();
    assert!(matches!(err, ProcessError::Handler(_)));
    assert_eq!(inbox.count("effects").await, 0);
    assert_eq!(
        inbox.count("inbox").await,
        0,
        "the inbox record rolled back with the handler"
    );
    assert!(
        inbox.apply(&message, false).await.unwrap().is_applied(),
        "a redelivery applies it"
    );
    assert_eq!(inbox.count("effects").await, 1);
}

/// A SQL store wired for the shared outbox scenarios.
pub trait OutboxUnderTest: OutboxStore + LeaseStore + Clone {
    /// Enqueues `messages` in one transaction, holds it open for `hold` (so that other
    /// writers overlap it), then commits, or rolls back unless `commit`.
    fn write(
        &self,
        messages: Vec<NewMessage>,
        hold: Duration,
        commit: bool,
    ) -> impl Future<Output = Vec<Enqueued>> + Send;

    /// Rows in `<prefix><table>`, committed ones only.
    fn count(&self, table: &str) -> impl Future<Output = i64> + Send;
}

/// Enqueues `message` in its own committed transaction.
pub async fn enqueue_committed(outbox: &impl OutboxUnderTest, message: NewMessage) -> Enqueued {
    outbox
        .write(vec![message], Duration::ZERO, true)
        .await
        .remove(0)
}

/// G1 on an outbox of any partition count: a rolled-back write leaves no row and takes no
/// version; a committed one is fetched with every field the store assigned.
pub async fn rolled_back_transaction_leaves_no_message(outbox: &impl OutboxUnderTest) {
    outbox
        .write(
            vec![order_event("1", "order.created")],
            Duration::ZERO,
            false,
        )
        .await;
    assert_eq!(outbox.count("outbox").await, 0);

    let enqueued = enqueue_committed(outbox, order_event("1", "order.created")).await;
    assert_eq!(outbox.count("outbox").await, 1);
    assert_eq!(enqueued.version, 1, "the rolled-back write took no version");
    let fetched = outbox.fetch(enqueued.partition, 10).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].id, enqueued.id);
    assert_eq!(fetched[0].sequence, enqueued.sequence);
    assert_eq!(fetched[0].partition_key, "order/1");
    assert_eq!(fetched[0].id.get_version_num(), 7);
    let age = chrono::Utc::now() - fetched[0].created_at;
    assert!(
        age.num_seconds().abs() < 60,
        "created_at is UTC: {}",
        fetched[0].created_at
    );
}

/// G3 on an outbox of `partitions` partitions: writers of one aggregate that overlap get
/// versions in commit order, and sequence order equals version order.
pub async fn concurrent_writers_of_one_aggregate_get_versions_in_commit_order(
    outbox: &impl OutboxUnderTest,
    partitions: u32,
) {
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for i in 0..15 {
                    let message = order_event("hot", &format!("w{w}.{i}"));
                    outbox
                        .write(vec![message], Duration::from_millis(1), true)
                        .await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let rows = outbox
        .fetch(partition_for("order/hot", partitions), 1000)
        .await
        .unwrap();
    let versions: Vec<u64> = rows.iter().map(|m| m.version).collect();
    assert_eq!(
        versions,
        (1..=90).collect::<Vec<_>>(),
        "sequence order must equal version order"
    );
}

/// G5 on a one-partition outbox: an expired lease is granted to another relay with the
/// next epoch as an unclean takeover, and the old owner can neither mark nor renew;
/// releases hand the checkpoint on. Returns the fenced lease for store-specific checks.
pub async fn mark_is_fenced_after_the_lease_is_taken_over(
    outbox: &impl OutboxUnderTest,
) -> ferry::Lease {
    let enqueued = enqueue_committed(outbox, order_event("1", "order.created")).await;
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
            .is_empty(),
        "an unexpired lease is not granted twice"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = outbox
        .acquire("relay-b", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.epoch, 2);
    let Takeover::Unclean { since_expiry, .. } = second.takeover else {
        panic!(
            "an expired lease is an unclean takeover: {:?}",
            second.takeover
        )
    };
    assert!(since_expiry < Duration::from_secs(5), "{since_expiry:?}");

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
        outbox.count("outbox").await,
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
            .renew(std::slice::from_ref(&second), Duration::from_secs(10))
            .await
            .unwrap(),
        [0]
    );

    assert_eq!(
        outbox
            .mark_published(&second, &[enqueued.id], Some(5))
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox.count("outbox").await, 0);
    // Marking again is harmless, and a lower checkpoint does not move it back.
    assert_eq!(
        outbox
            .mark_published(&second, &[enqueued.id], Some(3))
            .await
            .unwrap(),
        0
    );
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
    // A release with a stale epoch gives nothing up.
    outbox.release(&third, true).await.unwrap();
    assert_eq!(
        outbox.status().await.unwrap()[0].owner.as_deref(),
        Some("relay-c")
    );
    first
}

/// Heartbeats count the relays alive; leaving or expiring takes one out.
pub async fn heartbeat_counts_live_relays(outbox: &impl OutboxUnderTest) {
    let ttl = Duration::from_secs(10);
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(outbox.heartbeat("b", ttl).await.unwrap(), 2);
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 2);
    outbox.leave("b").await.unwrap();
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);
    outbox
        .heartbeat("short", Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        outbox.heartbeat("a", ttl).await.unwrap(),
        1,
        "an expired heartbeat is not live"
    );
}

/// G6 on a one-partition outbox with a 1 s retention: published rows are kept, not
/// fetched, and purged once past retention; unpublished rows never are.
pub async fn retention_keeps_published_rows_until_purged(outbox: &impl OutboxUnderTest) {
    let enqueued = enqueue_committed(outbox, order_event("1", "order.created")).await;
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
    assert_eq!(outbox.count("outbox").await, 1, "kept for replay");
    assert_eq!(outbox.status().await.unwrap()[0].backlog, 0);
    assert_eq!(
        outbox.purge_published().await.unwrap(),
        0,
        "not yet past retention"
    );
    let unpublished = enqueue_committed(outbox, order_event("2", "order.created")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(outbox.purge_published().await.unwrap(), 1);
    assert_eq!(outbox.count("outbox").await, 1);
    assert_eq!(
        outbox.fetch(0, 10).await.unwrap()[0].id,
        unpublished.id,
        "unpublished rows are never purged"
    );
}

/// `status` on a two-partition outbox: owner, epoch, expiry, backlog, age and the blocked
/// reason, set and cleared.
pub async fn status_shows_owner_backlog_and_blocked_reason(outbox: &impl OutboxUnderTest) {
    let e = enqueue_committed(outbox, order_event("1", "order.created")).await;
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
    assert_eq!(p.epoch, 1);
    assert!(p.lease_expires_at.is_some_and(|t| t > chrono::Utc::now()));
    assert_eq!(p.backlog, 1);
    assert!(p.oldest_unpublished_age_secs.is_some_and(|a| a < 60.0));
    assert_eq!(p.blocked_reason.as_deref(), Some("message too large"));
    let other = &status[1 - e.partition as usize];
    assert_eq!((other.backlog, other.blocked_reason.as_deref()), (0, None));
    outbox.set_blocked(lease, None).await.unwrap();
    assert_eq!(
        outbox.status().await.unwrap()[e.partition as usize].blocked_reason,
        None
    );
}

/// Version `version` of order `aggregate_id` in `partition`, with a trace header, a
/// content type and `created_at` at microsecond precision (as CloudEvents `time` has it).
pub fn order_message(aggregate_id: &str, version: u64, partition: u32) -> ferry::Message {
    let mut headers = ferry::Headers::new();
    headers.insert(
        "traceparent".into(),
        format!("00-{version:032x}-{version:016x}-01"),
    );
    headers.insert("content-type".into(), "application/vnd.shop+json".into());
    ferry::Message {
        id: uuid::Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        version,
        event_type: "order.paid".into(),
        payload: bytes::Bytes::from(format!(r#"{{"order":"{aggregate_id}","v":{version}}}"#)),
        headers,
        partition_key: format!("order/{aggregate_id}"),
        partition,
        created_at: chrono::DateTime::from_timestamp_micros(chrono::Utc::now().timestamp_micros())
            .unwrap_or_else(chrono::Utc::now),
        sequence: version as i64,
    }
}
