//! Leases: what a worker does when its lease runs out, and how relays share partitions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::{
    TTL, batch_in_flight, config, enqueue, eventually, marked_under, reconciliations,
    refused_marks, start,
};
use crate::testing::{MemoryStore, ScriptedSink, SinkEvent};

/// The relays holding an unexpired lease on each partition.
fn owners(store: &MemoryStore, partitions: u32) -> Vec<Option<String>> {
    (0..partitions)
        .map(|p| store.owner(p).map(|(owner, _)| owner))
        .collect()
}

fn owned_by(store: &MemoryStore, partitions: u32, relay: &str) -> usize {
    owners(store, partitions)
        .iter()
        .filter(|owner| owner.as_deref() == Some(relay))
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_mid_batch_marks_nothing_and_is_not_released() {
    // The acks arrive after the lease has run out, and the lease store is back by then.
    let (store, sink, message, relay) =
        batch_in_flight(TTL + Duration::from_secs(2), config("a")).await;
    store.set_leases_unavailable(true);
    sleep(TTL + Duration::from_secs(1)).await;
    store.set_leases_unavailable(false);

    eventually("the acks arrive", || sink.acked(0) == [message.id]).await;
    eventually("the worker stopped", || {
        sink.events().contains(&SinkEvent::Closed { partition: 0 })
    })
    .await;
    assert!(marked_under(&store, 1).is_empty(), "{:?}", store.marks());
    assert_eq!(refused_marks(&store).len(), 1, "{:?}", store.marks());
    assert!(store.releases().is_empty(), "{:?}", store.releases());
    assert_eq!(relay.stats.leases_lost.load(Ordering::Relaxed), 1);
    assert_eq!(store.unpublished(0), [message.id]);

    // The next grant is unclean, so it reconciles before publishing the batch again.
    sink.set_ack_delay(Duration::ZERO);
    eventually("published again", || store.is_published(message.id)).await;
    assert_eq!(marked_under(&store, 2), [[message.id]]);
    assert_eq!(reconciliations(&sink).len(), 1);
    assert!(store.releases().is_empty(), "{:?}", store.releases());
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nothing_is_fetched_or_published_once_the_lease_deadline_passed() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let first = enqueue(&store, "1");
    let relay = start(&store, &sink, config("a"));
    eventually("the first message is marked", || {
        store.is_published(first.id)
    })
    .await;

    store.set_leases_unavailable(true);
    sleep(TTL + Duration::from_secs(1)).await;
    let late = enqueue(&store, "2");
    sleep(TTL).await;
    assert_eq!(sink.batches(0), [[first.id]]);
    assert!(refused_marks(&store).is_empty(), "{:?}", store.marks());
    assert_eq!(relay.stats.leases_lost.load(Ordering::Relaxed), 1);

    store.set_leases_unavailable(false);
    eventually("the late message is published", || {
        store.is_published(late.id)
    })
    .await;
    assert_eq!(marked_under(&store, 2), [[late.id]]);
    assert!(store.releases().is_empty(), "{:?}", store.releases());
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_joining_relay_is_handed_its_fair_share() {
    let store = Arc::new(MemoryStore::new(4));
    let sink = Arc::new(ScriptedSink::new());
    let a = start(&store, &sink, config("a"));
    eventually("a owns every partition", || owned_by(&store, 4, "a") == 4).await;

    let b = start(&store, &sink, config("b"));
    eventually("a and b own two partitions each", || {
        owned_by(&store, 4, "a") == 2 && owned_by(&store, 4, "b") == 2
    })
    .await;
    let handed_over = store.releases();
    assert_eq!(handed_over.len(), 2, "{handed_over:?}");
    assert!(handed_over.iter().all(|r| r.clean), "{handed_over:?}");

    // Both keep relaying their own partitions, and the shares stay put.
    let messages: Vec<_> = (0..20).map(|i| enqueue(&store, &i.to_string())).collect();
    eventually("every message is published", || {
        messages.iter().all(|m| store.is_published(m.id))
    })
    .await;
    sleep(3 * TTL).await;
    assert_eq!(owned_by(&store, 4, "a"), 2);
    assert_eq!(owned_by(&store, 4, "b"), 2);
    assert_eq!(store.releases().len(), 2);
    assert!(reconciliations(&sink).is_empty());
    assert!(sink.overlapping_opens().is_empty(), "{:?}", sink.events());
    assert!(refused_marks(&store).is_empty(), "{:?}", store.marks());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_leaving_relay_hands_its_partitions_over_at_once() {
    let store = Arc::new(MemoryStore::new(4));
    let sink = Arc::new(ScriptedSink::new());
    let a = start(&store, &sink, config("a"));
    let b = start(&store, &sink, config("b"));
    eventually("a and b own two partitions each", || {
        owned_by(&store, 4, "a") == 2 && owned_by(&store, 4, "b") == 2
    })
    .await;

    a.stop().await;
    let left = Instant::now();
    assert_eq!(store.live_relays(), ["b"]);
    eventually("b owns every partition", || owned_by(&store, 4, "b") == 4).await;
    // At b's next lease round (every third of the TTL), not once a's heartbeat would
    // have expired.
    assert!(left.elapsed() < TTL / 2, "took {:?}", left.elapsed());
    assert!(store.releases().iter().all(|r| r.clean));
    assert!(reconciliations(&sink).is_empty());
    assert!(sink.overlapping_opens().is_empty(), "{:?}", sink.events());

    let message = enqueue(&store, "after");
    eventually("b relays alone", || store.is_published(message.id)).await;
    assert!(refused_marks(&store).is_empty(), "{:?}", store.marks());
    assert_eq!(sink.acked(message.partition), [message.id]);
    b.stop().await;
}
