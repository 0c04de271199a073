//! Operators' tools, the same on every store (each SQL dialect, Redis): blocked
//! partitions, retry requests, skipping, parking with the `park-aggregate` policy,
//! requeueing at the original place, cleanup and the selection of retained messages for
//! replay. Included by the `sql` and `redis_store` test binaries, which implement
//! [`OpsOutbox`] for their stores.

use std::time::Duration;

use ferry::{
    Cleaned, CleanupBounds, Enqueued, Lease, LeaseStore, Message, NewMessage, OutboxAdmin,
    OutboxStore, ParkedQuery, RetainedFilter, RetainedSummary, StoreError,
};

/// A store under test, with what the scenarios need that the contracts do not give.
pub(crate) trait OpsOutbox: Sized {
    type Store: OutboxStore + OutboxAdmin + LeaseStore;

    /// A fresh outbox of its own, migrated, keeping published messages for `retention`.
    async fn create(partitions: u32, retention: Duration) -> Self;

    fn store(&self) -> &Self::Store;

    /// Enqueues `message` on its own, committed.
    async fn commit(&self, message: NewMessage) -> Enqueued;

    /// Has consumer `consumer`'s inbox on this store record (and apply) a new message.
    async fn record_in_inbox(&self, consumer: &str);

    /// Removes what `create` made, where it outlives the test.
    async fn dispose(&self);
}

/// An event of aggregate `order/<id>`.
pub(crate) fn event(id: &str, n: u32) -> NewMessage {
    NewMessage::new("order", id, "order.changed", format!("{{\"n\":{n}}}"))
}

pub(crate) async fn lease(outbox: &impl LeaseStore) -> Lease {
    outbox
        .acquire("relay-a", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0)
}

pub(crate) fn ids(messages: &[Message]) -> Vec<uuid::Uuid> {
    messages.iter().map(|m| m.id).collect()
}

pub(crate) fn enqueued_ids(messages: &[Enqueued]) -> Vec<uuid::Uuid> {
    messages.iter().map(|m| m.id).collect()
}

/// Marks `messages` published, each partition's (of `partitions`) in one call, in the
/// order given.
pub(crate) async fn mark_all(
    outbox: &(impl OutboxStore + LeaseStore),
    partitions: u32,
    messages: &[Enqueued],
) {
    let leases = outbox
        .acquire("relay-a", partitions as usize, Duration::from_secs(30))
        .await
        .unwrap();
    for lease in &leases {
        let ids: Vec<_> = messages
            .iter()
            .filter(|m| m.partition == lease.partition)
            .map(|m| m.id)
            .collect();
        outbox.mark_published(lease, &ids, None).await.unwrap();
    }
}

/// Unpublished messages over all partitions, as `status` counts them.
pub(crate) async fn backlog(outbox: &impl OutboxStore) -> u64 {
    outbox
        .status()
        .await
        .unwrap()
        .iter()
        .map(|p| p.backlog)
        .sum()
}

fn all_parked() -> ParkedQuery {
    ParkedQuery {
        limit: 10,
        ..ParkedQuery::default()
    }
}

/// A blocked partition is listed with its reason, since when, and its head; an operator's
/// retry request is taken once; a skipped message is parked (holding nothing), the
/// partition goes on, and a requeue puts it back at its place.
pub(crate) async fn blocked_partitions_are_listed_retried_and_skipped<O: OpsOutbox>() {
    let fixture = &O::create(1, Duration::ZERO).await;
    let outbox = fixture.store();
    let first = fixture.commit(event("1", 1)).await;
    let second = fixture.commit(event("2", 1)).await;
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
    let since = outbox.blocked().await.unwrap()[0].since;
    tokio::time::sleep(Duration::from_millis(20)).await;
    outbox
        .set_blocked(&lease, Some("message too large, again"))
        .await
        .unwrap();
    let blocked = outbox.blocked().await.unwrap();
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].partition, 0);
    assert_eq!(blocked[0].reason, "message too large, again");
    assert_eq!(blocked[0].since, since, "since when is kept while blocked");
    let since = since.expect("blocked since");
    assert!(since > before && since <= chrono::Utc::now() + chrono::TimeDelta::seconds(5));
    assert_eq!(blocked[0].head.as_ref().map(|m| m.id), Some(first.id));

    assert!(!outbox.take_retry_request(&lease).await.unwrap());
    assert!(outbox.request_retry(0).await.unwrap());
    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease.clone()
    };
    assert!(
        !outbox.take_retry_request(&stale).await.unwrap(),
        "only the current owner takes a request"
    );
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
    assert_eq!(parked.message.partition, 0);
    assert_eq!(parked.message.payload.as_ref(), br#"{"n":1}"#);
    assert_eq!(parked.parked_by, "ops@example");
    assert_eq!(parked.reason, "payload rejected by the consumer");
    assert!(!parked.holds_aggregate);
    assert!(
        outbox.take_retry_request(&lease).await.unwrap(),
        "a skip asks the relay to go on at once"
    );
    assert_eq!(ids(&outbox.fetch(0, 10).await.unwrap()), [second.id]);
    assert_eq!(
        outbox
            .mark_published(&lease, &[first.id], None)
            .await
            .unwrap(),
        0,
        "a relay that published the skipped message meanwhile marks nothing"
    );
    assert!(
        outbox
            .skip(first.id, "ops", "again")
            .await
            .unwrap()
            .is_none(),
        "only unpublished messages can be skipped"
    );
    assert_eq!(outbox.parked(&all_parked()).await.unwrap(), [parked]);

    assert_eq!(outbox.requeue_parked("order", "1").await.unwrap(), 1);
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [first.id, second.id],
        "back at its original place"
    );
    assert_eq!(backlog(outbox).await, 2);
    assert!(outbox.parked(&all_parked()).await.unwrap().is_empty());
    assert_eq!(
        outbox
            .mark_published(&lease, &[first.id, second.id], None)
            .await
            .unwrap(),
        2,
        "a requeued message is marked like any other"
    );
    assert!(outbox.fetch(0, 10).await.unwrap().is_empty());
    outbox.set_blocked(&lease, None).await.unwrap();
    assert!(outbox.blocked().await.unwrap().is_empty());
    fixture.dispose().await;
}

/// The `park-aggregate` policy parks the rejected message and its aggregate's later ones,
/// in order, under a fenced lease; the aggregate's messages committed afterwards wait; a
/// requeue puts everything back in sequence order, and a second park takes requeued
/// messages out again.
pub(crate) async fn park_aggregate_holds_the_aggregate_until_requeued<O: OpsOutbox>() {
    let fixture = &O::create(1, Duration::ZERO).await;
    let outbox = fixture.store();
    let a1 = fixture.commit(event("a", 1)).await;
    let b1 = fixture.commit(event("b", 1)).await;
    let a2 = fixture.commit(event("a", 2)).await;
    let c1 = fixture.commit(event("c", 1)).await;
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
    assert_eq!(ids(&outbox.fetch(0, 10).await.unwrap()), [b1.id, c1.id]);
    let a3 = fixture.commit(event("a", 3)).await;
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [b1.id, c1.id],
        "held behind the parked messages"
    );
    assert_eq!(
        ids(&outbox.fetch(0, 1).await.unwrap()),
        [b1.id],
        "a limited fetch still stops at its limit"
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
    let after_first = outbox
        .parked(&ParkedQuery {
            after_sequence: Some(a1.sequence),
            ..all_parked()
        })
        .await
        .unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].message.id, a2.id);

    assert_eq!(outbox.requeue_parked("order", "a").await.unwrap(), 2);
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [a1.id, b1.id, a2.id, c1.id, a3.id]
    );
    assert_eq!(
        ids(&outbox.fetch(0, 3).await.unwrap()),
        [a1.id, b1.id, a2.id]
    );

    // Another aggregate parked meanwhile: the requeued ones still come in sequence order.
    let b_head = outbox
        .fetch(0, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == b1.id)
        .unwrap();
    assert_eq!(
        outbox
            .park_aggregate(&lease, &b_head, "relay relay-a", "b rejected")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [a1.id, a2.id, c1.id, a3.id]
    );
    assert_eq!(outbox.requeue_parked("order", "b").await.unwrap(), 1);
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [a1.id, b1.id, a2.id, c1.id, a3.id]
    );

    // Rejected again after the requeue: the requeued messages and a3 are parked again.
    assert_eq!(
        outbox
            .park_aggregate(&lease, &rejected, "relay relay-a", "still rejected")
            .await
            .unwrap(),
        3
    );
    assert_eq!(ids(&outbox.fetch(0, 10).await.unwrap()), [b1.id, c1.id]);
    assert_eq!(outbox.requeue_parked("order", "a").await.unwrap(), 3);
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [a1.id, b1.id, a2.id, c1.id, a3.id]
    );
    assert_eq!(outbox.requeue_parked("order", "a").await.unwrap(), 0);
    fixture.dispose().await;
}

/// Cleanup removes published messages, inbox records and parked messages past their
/// bounds and is idempotent; a holding parked message that goes releases its aggregate.
pub(crate) async fn cleanup_removes_what_is_past_its_bounds<O: OpsOutbox>() {
    let fixture = &O::create(1, Duration::from_secs(3600)).await;
    let outbox = fixture.store();
    let published = fixture.commit(event("1", 1)).await;
    let skipped = fixture.commit(event("2", 1)).await;
    let pending = fixture.commit(event("3", 1)).await;
    let lease = lease(outbox).await;
    outbox
        .mark_published(&lease, &[published.id], None)
        .await
        .unwrap();
    outbox.skip(skipped.id, "ops", "bad").await.unwrap();
    fixture.record_in_inbox("cleanup").await;
    let nothing_old = CleanupBounds {
        published_older_than: Some(Duration::from_secs(3600)),
        inbox_older_than: Some(Duration::from_secs(3600)),
        parked_older_than: Some(Duration::from_secs(3600)),
    };
    assert_eq!(
        outbox.cleanup(&nothing_old).await.unwrap(),
        Cleaned::default()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let everything_old = CleanupBounds {
        published_older_than: Some(Duration::from_secs(1)),
        inbox_older_than: Some(Duration::from_secs(1)),
        parked_older_than: Some(Duration::from_secs(1)),
    };
    assert_eq!(
        outbox.cleanup(&everything_old).await.unwrap(),
        Cleaned {
            published: 1,
            inbox: 1,
            parked: 1
        }
    );
    assert_eq!(
        outbox.cleanup(&everything_old).await.unwrap(),
        Cleaned::default(),
        "idempotent"
    );
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [pending.id],
        "unpublished messages are never cleaned up"
    );
    assert!(
        outbox
            .retained(&RetainedFilter::default(), None, 10)
            .await
            .unwrap()
            .is_empty(),
        "the kept index goes with the kept messages"
    );

    // A parked message that holds its aggregate: cleaning it up lets the aggregate go on.
    let held = fixture.commit(event("3", 2)).await;
    let head = outbox.fetch(0, 1).await.unwrap().remove(0);
    assert_eq!(
        outbox
            .park_aggregate(&lease, &head, "relay relay-a", "rejected")
            .await
            .unwrap(),
        2
    );
    let waiting = fixture.commit(event("3", 3)).await;
    assert!(outbox.fetch(0, 10).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let parked_only = CleanupBounds {
        parked_older_than: Some(Duration::from_secs(1)),
        ..CleanupBounds::default()
    };
    assert_eq!(outbox.cleanup(&parked_only).await.unwrap().parked, 2);
    assert_eq!(
        ids(&outbox.fetch(0, 10).await.unwrap()),
        [waiting.id],
        "released: what waited behind {} flows",
        held.id
    );
    fixture.dispose().await;
}

/// Retained (published, kept) messages are selected for replay by partition, sequence
/// range, creation time and aggregate, in sequence order, paged after a sequence, with a
/// summary of the same selection; unpublished messages are never selected.
pub(crate) async fn retained_messages_are_selected_for_replay<O: OpsOutbox>() {
    let fixture = &O::create(2, Duration::from_secs(3600)).await;
    let outbox = fixture.store();
    let mut published = Vec::new();
    for n in 0..6 {
        published.push(fixture.commit(event(&(n % 3).to_string(), n)).await);
    }
    let pending = fixture.commit(event("0", 9)).await;
    // Marked in reverse: the kept index, not the order of marks, gives sequence order.
    let mut reversed = published.clone();
    reversed.reverse();
    mark_all(outbox, 2, &reversed).await;
    let everything = RetainedFilter::default();
    let all = outbox.retained(&everything, None, 100).await.unwrap();
    assert_eq!(
        ids(&all),
        enqueued_ids(&published),
        "every published message, in sequence order, none unpublished"
    );
    assert!(!ids(&all).contains(&pending.id));
    assert_eq!(all[1].version, published[1].version);
    assert_eq!(all[1].partition, published[1].partition);
    assert_eq!(all[1].payload.as_ref(), br#"{"n":1}"#);
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
    assert_eq!(page.len(), 4);
    let after = page.last().unwrap().sequence;
    assert_eq!(
        ids(&outbox.retained(&everything, Some(after), 4).await.unwrap()),
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
        .map(|m| m.id)
        .collect();
    assert_eq!(
        ids(&outbox.retained(&in_partition, None, 100).await.unwrap()),
        expected
    );

    let range = RetainedFilter {
        from_sequence: Some(published[1].sequence),
        to_sequence: Some(published[3].sequence),
        ..RetainedFilter::default()
    };
    assert_eq!(
        ids(&outbox.retained(&range, None, 100).await.unwrap()),
        enqueued_ids(&published[1..4])
    );
    assert_eq!(outbox.retained_summary(&range).await.unwrap().count, 3);

    let aggregate = RetainedFilter {
        aggregate: Some(("order".into(), "1".into())),
        ..RetainedFilter::default()
    };
    assert_eq!(
        ids(&outbox.retained(&aggregate, None, 100).await.unwrap()),
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
        RetainedSummary::default()
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
    fixture.dispose().await;
}
