//! Marks, what `status` reports, and retention (G6).

use std::time::Duration;

use ferry::sql::StoreSettings;
use ferry::{LeaseStore, OutboxStore};
use uuid::Uuid;

use crate::harness::{
    TestDialect, TestOutbox, commit_messages, count, lease_of, order_event, settings,
};

/// A mark takes any number of ids (in chunks where the dialect binds one placeholder per
/// id), ignoring repeats and unknown ids, in one fenced transaction.
pub(crate) async fn marks_any_number_of_ids_in_one_fenced_transaction<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(1).await;
    let ids: Vec<Uuid> = commit_messages(
        &outbox,
        (0..2500)
            .map(|i| order_event(&i.to_string(), "order.created"))
            .collect(),
    )
    .await
    .iter()
    .map(|e| e.id)
    .collect();
    let lease = outbox
        .acquire("r", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    // 1024 + 1024 + 452 ids, with a repeat and an unknown id mixed in.
    let mut marking = ids[..2000].to_vec();
    marking.push(ids[0]);
    marking.push(Uuid::now_v7());
    assert_eq!(
        outbox.mark_published(&lease, &marking, None).await.unwrap(),
        2000
    );
    let left = outbox.fetch(0, 5000).await.unwrap();
    assert_eq!(
        left.iter().map(|m| m.id).collect::<Vec<_>>(),
        ids[2000..].to_vec()
    );
    assert_eq!(
        outbox
            .mark_published(&lease, &ids[2000..2003], None)
            .await
            .unwrap(),
        3
    );
}

/// `status`: per partition its backlog and the age of its oldest message, its owner,
/// epoch and expiry, and the blocked reason, set and cleared.
pub(crate) async fn status_reports_owner_backlog_and_blocked_reason<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    let enqueued = commit_messages(
        &outbox,
        (0..10)
            .map(|i| order_event(&i.to_string(), "order.created"))
            .collect(),
    )
    .await;
    let backlog_of =
        |partition: u32| enqueued.iter().filter(|e| e.partition == partition).count() as u64;
    let status = outbox.status().await.unwrap();
    assert_eq!(status.len(), 4);
    for partition in &status {
        let expected = backlog_of(partition.partition);
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
        .acquire("relay-a", 4, Duration::from_secs(10))
        .await
        .unwrap();
    let lease = lease_of(&leases, busy);
    outbox
        .set_blocked(lease, Some("message rejected: too large"))
        .await
        .unwrap();
    let status = outbox.status().await.unwrap();
    let row = &status[busy as usize];
    assert_eq!(row.partition, busy);
    assert_eq!(row.owner.as_deref(), Some("relay-a"));
    assert_eq!(row.epoch, 1);
    assert!(
        row.lease_expires_at
            .is_some_and(|at| at > chrono::Utc::now())
    );
    assert_eq!(row.backlog, backlog_of(busy));
    assert!(row.oldest_unpublished_age_secs.is_some_and(|a| a < 60.0));
    assert_eq!(
        row.blocked_reason.as_deref(),
        Some("message rejected: too large")
    );
    for other in status.iter().filter(|p| p.partition != busy) {
        assert_eq!(other.blocked_reason, None, "{other:?}");
    }

    let ids: Vec<Uuid> = enqueued
        .iter()
        .filter(|e| e.partition == busy)
        .map(|e| e.id)
        .collect();
    outbox.mark_published(lease, &ids, None).await.unwrap();
    let row = &outbox.status().await.unwrap()[busy as usize];
    assert_eq!(row.backlog, 0);
    assert_eq!(row.oldest_unpublished_age_secs, None);
    assert_eq!(
        row.blocked_reason.as_deref(),
        Some("message rejected: too large")
    );

    outbox.set_blocked(lease, None).await.unwrap();
    assert_eq!(
        outbox.status().await.unwrap()[busy as usize].blocked_reason,
        None
    );
}

/// G6: with a retention, published rows stay (for replay, not fetched again) until purged
/// once past it; unpublished rows are never purged.
pub(crate) async fn g6_retention_keeps_published_rows_until_purged<D: TestDialect>() {
    let retention = Duration::from_secs(1);
    let settings = StoreSettings {
        retention,
        ..settings()
    };
    let outbox = TestOutbox::<D>::with(1, settings).await;
    assert_eq!(outbox.retention(), retention);
    let enqueued = commit_messages(
        &outbox,
        (0..3)
            .map(|i| order_event("1", &format!("order.e{i}")))
            .collect(),
    )
    .await;
    let lease = outbox
        .acquire("relay-a", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    let ids: Vec<Uuid> = enqueued[..2].iter().map(|e| e.id).collect();
    assert_eq!(outbox.mark_published(&lease, &ids, None).await.unwrap(), 2);
    assert_eq!(
        outbox.mark_published(&lease, &ids, None).await.unwrap(),
        0,
        "marking twice is harmless"
    );

    assert_eq!(count(&outbox, "outbox").await, 3, "kept for replay");
    let unpublished = outbox.fetch(0, 10).await.unwrap();
    assert_eq!(
        unpublished.iter().map(|m| m.id).collect::<Vec<_>>(),
        [enqueued[2].id],
        "published rows are not fetched again"
    );
    assert_eq!(outbox.status().await.unwrap()[0].backlog, 1);

    assert_eq!(
        outbox.purge_published().await.unwrap(),
        0,
        "not yet past retention"
    );
    tokio::time::sleep(retention + Duration::from_millis(200)).await;
    assert_eq!(outbox.purge_published().await.unwrap(), 2);
    assert_eq!(count(&outbox, "outbox").await, 1);
    assert_eq!(
        outbox.fetch(0, 10).await.unwrap()[0].id,
        enqueued[2].id,
        "unpublished rows are never purged"
    );
}
