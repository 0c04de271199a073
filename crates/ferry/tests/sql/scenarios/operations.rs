//! Operators' tools, the same on every store: blocked partitions, retry requests, skipping,
//! parking with the `park-aggregate` policy, requeueing and cleanup.

use std::time::Duration;

use ferry::sql::{SqlInbox, SqlOutbox, StoreSettings};
use ferry::{
    CleanupBounds, Lease, LeaseStore, NewMessage, OutboxAdmin, OutboxStore, ParkedQuery,
    RetainedFilter, StoreError,
};

use crate::harness::{TestDialect, TestOutbox, enqueue_committed, received, settings};

/// An event of aggregate `order/<id>`.
fn event(id: &str, n: u32) -> NewMessage {
    NewMessage::new("order", id, "order.changed", format!("{{\"n\":{n}}}"))
}

async fn lease<D: TestDialect>(outbox: &SqlOutbox<D>) -> Lease {
    outbox
        .acquire("relay-a", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0)
}

fn fetched_ids(messages: &[ferry::Message]) -> Vec<uuid::Uuid> {
    messages.iter().map(|m| m.id).collect()
}

fn enqueued_ids(messages: &[ferry::Enqueued]) -> Vec<uuid::Uuid> {
    messages.iter().map(|m| m.id).collect()
}

/// A blocked partition is listed with its reason, since when, and its head; an operator's
/// retry request is taken once; a skipped message is parked (holding nothing), the
/// partition goes on, and a requeue puts it back at its place.
pub(crate) async fn blocked_partitions_are_listed_retried_and_skipped<D: TestDialect>() {
    let outbox = &TestOutbox::<D>::new(1).await;
    let first = enqueue_committed(outbox, event("1", 1)).await;
    let second = enqueue_committed(outbox, event("2", 1)).await;
    let lease = lease(outbox).await;
    assert!(outbox.blocked().await.unwrap().is_empty());
    assert!(
        !outbox.request_retry(0).await.unwrap(),
        "a partition that is not blocked has nothing to retry"
    );
    let before = chrono::Utc::now() - chrono::TimeDelta::seconds(5);
    outbox
        .set_blocked(&lease, Some("message too large"))
        .await
        .unwrap();
    outbox
        .set_blocked(&lease, Some("message too large, again"))
        .await
        .unwrap();
    let blocked = outbox.blocked().await.unwrap();
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].partition, 0);
    assert_eq!(blocked[0].reason, "message too large, again");
    let since = blocked[0].since.expect("blocked since");
    assert!(since > before && since <= chrono::Utc::now() + chrono::TimeDelta::seconds(5));
    assert_eq!(blocked[0].head.as_ref().map(|m| m.id), Some(first.id));

    assert!(!outbox.take_retry_request(&lease).await.unwrap());
    assert!(outbox.request_retry(0).await.unwrap());
    assert!(outbox.take_retry_request(&lease).await.unwrap());
    assert!(
        !outbox.take_retry_request(&lease).await.unwrap(),
        "a request is taken once"
    );

    let parked = outbox
        .skip(first.id, "ops@example", "payload rejected by the consumer")
        .await
        .unwrap()
        .expect("the message was unpublished");
    assert_eq!(parked.message.id, first.id);
    assert_eq!(parked.message.sequence, first.sequence);
    assert_eq!(parked.message.version, first.version);
    assert_eq!(parked.parked_by, "ops@example");
    assert_eq!(parked.reason, "payload rejected by the consumer");
    assert!(!parked.holds_aggregate);
    assert!(
        outbox.take_retry_request(&lease).await.unwrap(),
        "a skip asks the relay to go on at once"
    );
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [second.id]
    );
    assert!(
        outbox
            .skip(first.id, "ops", "again")
            .await
            .unwrap()
            .is_none(),
        "only unpublished messages can be skipped"
    );
    let listed = outbox
        .parked(&ParkedQuery {
            limit: 10,
            ..ParkedQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(listed, [parked]);

    assert_eq!(outbox.requeue_parked("order", "1").await.unwrap(), 1);
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [first.id, second.id],
        "back at its original place"
    );
    assert!(
        outbox
            .parked(&ParkedQuery {
                limit: 10,
                ..ParkedQuery::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
    outbox.set_blocked(&lease, None).await.unwrap();
    assert!(outbox.blocked().await.unwrap().is_empty());
}

/// The `park-aggregate` policy parks the rejected message and its aggregate's later ones,
/// in order, under a fenced lease; the aggregate's messages committed afterwards wait; a
/// requeue puts everything back in sequence order.
pub(crate) async fn park_aggregate_holds_the_aggregate_until_requeued<D: TestDialect>() {
    let outbox = &TestOutbox::<D>::new(1).await;
    let a1 = enqueue_committed(outbox, event("a", 1)).await;
    let b1 = enqueue_committed(outbox, event("b", 1)).await;
    let a2 = enqueue_committed(outbox, event("a", 2)).await;
    let c1 = enqueue_committed(outbox, event("c", 1)).await;
    let lease = lease(outbox).await;
    let rejected = outbox.fetch(0, 1).await.unwrap().remove(0);
    assert_eq!(rejected.id, a1.id);

    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease.clone()
    };
    assert!(matches!(
        outbox
            .park_aggregate(&stale, &rejected, "relay old", "rejected")
            .await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(
        outbox.fetch(0, 10).await.unwrap().len(),
        4,
        "fenced: unchanged"
    );

    assert_eq!(
        outbox
            .park_aggregate(&lease, &rejected, "relay relay-a", "rejected for good")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [b1.id, c1.id]
    );
    let a3 = enqueue_committed(outbox, event("a", 3)).await;
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [b1.id, c1.id],
        "held behind the parked messages"
    );
    let parked = outbox
        .parked(&ParkedQuery {
            aggregate: Some(("order".into(), "a".into())),
            after_sequence: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        parked.iter().map(|p| p.message.id).collect::<Vec<_>>(),
        [a1.id, a2.id]
    );
    assert!(parked.iter().all(|p| p.holds_aggregate));
    assert_eq!(parked[0].parked_by, "relay relay-a");

    assert_eq!(outbox.requeue_parked("order", "a").await.unwrap(), 2);
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [a1.id, b1.id, a2.id, c1.id, a3.id]
    );
}

/// Cleanup removes published rows, inbox records and parked messages past their bounds,
/// in batches, and is idempotent.
pub(crate) async fn cleanup_removes_what_is_past_its_bounds<D: TestDialect>() {
    let settings = StoreSettings {
        retention: Duration::from_secs(3600),
        ..settings()
    };
    let outbox = &TestOutbox::<D>::with(1, settings).await;
    let published = enqueue_committed(outbox, event("1", 1)).await;
    let skipped = enqueue_committed(outbox, event("2", 1)).await;
    let pending = enqueue_committed(outbox, event("3", 1)).await;
    let lease = lease(outbox).await;
    outbox
        .mark_published(&lease, &[published.id], None)
        .await
        .unwrap();
    outbox.skip(skipped.id, "ops", "bad").await.unwrap();
    let inbox = SqlInbox::<D>::new("cleanup", outbox.table_prefix());
    let mut tx = outbox.pool().begin().await.unwrap();
    inbox
        .process(&mut tx, &received("1", 1), async |_, _| {
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let nothing_old = CleanupBounds {
        published_older_than: Some(Duration::from_secs(3600)),
        inbox_older_than: Some(Duration::from_secs(3600)),
        parked_older_than: Some(Duration::from_secs(3600)),
    };
    assert_eq!(
        outbox.cleanup(&nothing_old).await.unwrap(),
        ferry::Cleaned::default()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let everything_old = CleanupBounds {
        published_older_than: Some(Duration::from_secs(1)),
        inbox_older_than: Some(Duration::from_secs(1)),
        parked_older_than: Some(Duration::from_secs(1)),
    };
    assert_eq!(
        outbox.cleanup(&everything_old).await.unwrap(),
        ferry::Cleaned {
            published: 1,
            inbox: 1,
            parked: 1
        }
    );
    assert_eq!(
        outbox.cleanup(&everything_old).await.unwrap(),
        ferry::Cleaned::default(),
        "idempotent"
    );
    assert_eq!(
        fetched_ids(&outbox.fetch(0, 10).await.unwrap()),
        [pending.id],
        "unpublished messages are never cleaned up"
    );
}

/// Retained (published, kept) messages are selected for replay by partition, sequence
/// range, creation time and aggregate, in sequence order, paged after a sequence, with a
/// summary of the same selection; unpublished messages are never selected.
pub(crate) async fn retained_messages_are_selected_for_replay<D: TestDialect>() {
    let settings = StoreSettings {
        retention: Duration::from_secs(3600),
        ..settings()
    };
    let outbox = &TestOutbox::<D>::with(2, settings).await;
    let mut published = Vec::new();
    for n in 0..6 {
        published.push(enqueue_committed(outbox, event(&(n % 3).to_string(), n)).await);
    }
    let pending = enqueue_committed(outbox, event("0", 9)).await;
    let leases = outbox
        .acquire("relay-a", 2, Duration::from_secs(30))
        .await
        .unwrap();
    for lease in &leases {
        let ids: Vec<_> = published
            .iter()
            .filter(|m| m.partition == lease.partition)
            .map(|m| m.id)
            .collect();
        outbox.mark_published(lease, &ids, None).await.unwrap();
    }
    let ids = |messages: Vec<ferry::Message>| fetched_ids(&messages);
    let everything = RetainedFilter::default();
    assert_eq!(
        ids(outbox.retained(&everything, None, 100).await.unwrap()),
        enqueued_ids(&published),
        "every published message, in sequence order, none unpublished"
    );
    assert!(
        !fetched_ids(&outbox.retained(&everything, None, 100).await.unwrap()).contains(&pending.id)
    );
    let summary = outbox.retained_summary(&everything).await.unwrap();
    assert_eq!(summary.count, 6);
    assert_eq!(summary.first_sequence, Some(published[0].sequence));
    assert_eq!(summary.last_sequence, Some(published[5].sequence));
    let (first, last) = (
        summary.first_created_at.unwrap(),
        summary.last_created_at.unwrap(),
    );
    assert!(first <= last && (chrono::Utc::now() - first).num_seconds().abs() < 60);

    let page = outbox.retained(&everything, None, 4).await.unwrap();
    let after = page.last().unwrap().sequence;
    assert_eq!(
        ids(outbox.retained(&everything, Some(after), 4).await.unwrap()),
        enqueued_ids(&published[4..]),
        "the next page starts after the last sequence of the previous one"
    );

    let partition = published[0].partition;
    let in_partition = RetainedFilter {
        partition: Some(partition),
        ..RetainedFilter::default()
    };
    let expected: Vec<_> = published
        .iter()
        .filter(|m| m.partition == partition)
        .collect();
    assert_eq!(
        ids(outbox.retained(&in_partition, None, 100).await.unwrap()),
        expected.iter().map(|m| m.id).collect::<Vec<_>>()
    );

    let range = RetainedFilter {
        from_sequence: Some(published[1].sequence),
        to_sequence: Some(published[3].sequence),
        ..RetainedFilter::default()
    };
    assert_eq!(
        ids(outbox.retained(&range, None, 100).await.unwrap()),
        enqueued_ids(&published[1..4])
    );
    assert_eq!(outbox.retained_summary(&range).await.unwrap().count, 3);

    let aggregate = RetainedFilter {
        aggregate: Some(("order".into(), "1".into())),
        ..RetainedFilter::default()
    };
    assert_eq!(
        ids(outbox.retained(&aggregate, None, 100).await.unwrap()),
        [published[1].id, published[4].id]
    );

    let future = RetainedFilter {
        since: Some(chrono::Utc::now() + chrono::TimeDelta::minutes(5)),
        ..RetainedFilter::default()
    };
    assert!(
        outbox
            .retained(&future, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        outbox.retained_summary(&future).await.unwrap(),
        ferry::RetainedSummary::default()
    );
    let window = RetainedFilter {
        since: Some(first - chrono::TimeDelta::seconds(1)),
        until: Some(last + chrono::TimeDelta::seconds(1)),
        ..RetainedFilter::default()
    };
    assert_eq!(outbox.retained_summary(&window).await.unwrap().count, 6);
    let before = RetainedFilter {
        until: Some(first - chrono::TimeDelta::seconds(1)),
        ..RetainedFilter::default()
    };
    assert_eq!(outbox.retained_summary(&before).await.unwrap().count, 0);
}
