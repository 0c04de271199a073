//! Leases in the store: grants, renewals, releases, takeovers, and the fencing of an old
//! owner (G5).

use std::collections::HashSet;
use std::time::Duration;

use ferry::{LeaseStore, OutboxStore, StoreError, Takeover};

use crate::harness::{
    TestDialect, TestOutbox, count, enqueue_committed, lease_of, number, order_event,
};

/// G5: an expired lease is granted to another relay with the next epoch as an unclean
/// takeover; the old owner can then neither mark, record a blocked reason, renew nor
/// release; releases hand the checkpoint on.
pub(crate) async fn g5_mark_is_fenced_after_the_lease_is_taken_over<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(1).await;
    let other = outbox.open_again().await;
    let enqueued = enqueue_committed(&outbox, order_event("1", "order.created")).await;
    let first = outbox
        .acquire("relay-a", 1, Duration::from_secs(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((first.epoch, &first.takeover), (1, &Takeover::Clean));
    assert!(
        other
            .acquire("relay-b", 1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "an unexpired lease is not granted twice"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = other
        .acquire("relay-b", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.epoch, 2);
    let Takeover::Unclean {
        since_expiry,
        checkpoint,
    } = second.takeover
    else {
        panic!(
            "an expired lease is an unclean takeover: {:?}",
            second.takeover
        )
    };
    assert!(
        since_expiry >= Duration::from_millis(50) && since_expiry < Duration::from_secs(5),
        "{since_expiry:?}"
    );
    assert_eq!(checkpoint, None);

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
    assert!(!err.is_retryable());
    assert_eq!(
        count(&outbox, "outbox").await,
        1,
        "a fenced mark changes nothing"
    );
    assert_eq!(
        number(
            &outbox,
            "SELECT COUNT(*) AS n FROM {p}leases WHERE checkpoint IS NOT NULL"
        )
        .await,
        0,
        "a fenced mark records no checkpoint"
    );
    assert!(
        matches!(
            outbox.set_blocked(&first, Some("late")).await,
            Err(StoreError::Fenced { .. })
        ),
        "a fenced relay cannot record a blocked reason either"
    );
    assert!(
        outbox
            .renew(std::slice::from_ref(&first), Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty()
    );
    outbox
        .release(&first, true)
        .await
        .expect("the old owner's release is harmless");
    assert_eq!(
        other
            .renew(std::slice::from_ref(&second), Duration::from_secs(10))
            .await
            .unwrap(),
        [0]
    );

    assert_eq!(
        other
            .mark_published(&second, &[enqueued.id], Some(5))
            .await
            .unwrap(),
        1
    );
    assert_eq!(count(&outbox, "outbox").await, 0);
    // Marking again is harmless, and a lower checkpoint does not move it back.
    assert_eq!(
        other
            .mark_published(&second, &[enqueued.id], Some(3))
            .await
            .unwrap(),
        0
    );
    other.release(&second, true).await.unwrap();
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
}

/// Grants are capped at `max`; renewals need the owner and the epoch; checkpoints only
/// move forward; a clean release is a clean takeover, an unclean one hands the checkpoint
/// on.
pub(crate) async fn renew_release_and_takeover_kinds<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    let ttl = Duration::from_secs(10);

    let first = outbox.acquire("relay-a", 2, ttl).await.unwrap();
    assert_eq!(first.len(), 2, "at most `max` partitions");
    assert!(
        first
            .iter()
            .all(|l| l.epoch == 1 && l.takeover == Takeover::Clean)
    );
    let rest = outbox.acquire("relay-b", 10, ttl).await.unwrap();
    let mut granted: Vec<u32> = first.iter().chain(&rest).map(|l| l.partition).collect();
    granted.sort_unstable();
    assert_eq!(granted, [0, 1, 2, 3], "the rest, each partition once");

    let mut renewed = outbox.renew(&first, ttl).await.unwrap();
    renewed.sort_unstable();
    let mut held: Vec<u32> = first.iter().map(|l| l.partition).collect();
    held.sort_unstable();
    assert_eq!(renewed, held);
    let mut stale = first[0].clone();
    stale.epoch += 1;
    let mut impostor = first[1].clone();
    impostor.owner = "relay-b".into();
    assert!(
        outbox
            .renew(&[stale, impostor], ttl)
            .await
            .unwrap()
            .is_empty(),
        "renew needs the owner and the epoch"
    );

    // Checkpoints only move forward.
    outbox
        .mark_published(&first[1], &[], Some(10))
        .await
        .unwrap();
    outbox
        .mark_published(&first[1], &[], Some(5))
        .await
        .unwrap();

    outbox.release(&first[0], true).await.unwrap();
    outbox.release(&first[1], false).await.unwrap();
    let retaken = outbox.acquire("relay-b", 10, ttl).await.unwrap();
    assert_eq!(retaken.len(), 2);
    let clean = lease_of(&retaken, first[0].partition);
    assert_eq!((clean.epoch, &clean.takeover), (2, &Takeover::Clean));
    let unclean = lease_of(&retaken, first[1].partition);
    assert!(
        matches!(
            unclean.takeover,
            Takeover::Unclean {
                checkpoint: Some(10),
                ..
            }
        ),
        "{:?}",
        unclean.takeover
    );
}

/// Heartbeats count the relays alive; leaving or expiring takes one out.
pub(crate) async fn heartbeat_counts_live_relays<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    let ttl = Duration::from_secs(10);
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(outbox.heartbeat("b", ttl).await.unwrap(), 2);
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 2);
    outbox.leave("b").await.unwrap();
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(outbox.heartbeat("b", ttl).await.unwrap(), 2);
    outbox.leave("a").await.unwrap();
    assert_eq!(outbox.heartbeat("b", ttl).await.unwrap(), 1);
    outbox
        .heartbeat("short", Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        outbox.heartbeat("b", ttl).await.unwrap(),
        1,
        "an expired heartbeat is not live"
    );
}

/// Relays acquiring at once each get partitions of their own, every one granted once.
pub(crate) async fn two_relays_acquiring_at_once_never_share_a_partition<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(32).await;
    let grants: Vec<_> = (0..4)
        .map(|r| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox
                    .acquire(&format!("relay-{r}"), 32, Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut owned = HashSet::new();
    for grant in grants {
        for lease in grant.await.unwrap() {
            assert_eq!(lease.epoch, 1);
            assert!(
                owned.insert(lease.partition),
                "{} granted twice",
                lease.partition
            );
        }
    }
    assert_eq!(owned.len(), 32, "every partition granted once");
}
