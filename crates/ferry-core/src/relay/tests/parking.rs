//! What operators and the `park-aggregate` policy do to a rejected message: an operator's
//! retry request cuts a blocked partition's wait short; parking moves the rejected message
//! and its aggregate's later ones aside, in order, while the partition goes on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::{config, eventually, ids, start};
use crate::message::{Message, NewMessage};
use crate::relay::OnPermanentFailure;
use crate::testing::{MemoryStore, Outcome, ScriptedSink};

fn event(store: &MemoryStore, aggregate: &str, n: u32) -> Message {
    store.enqueue(NewMessage::new(
        "order",
        aggregate,
        "order.changed",
        format!("{{\"n\":{n}}}"),
    ))
}

#[tokio::test(start_paused = true)]
async fn an_operators_retry_request_retries_a_blocked_partition_at_once() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let rejected = event(&store, "1", 1);
    sink.script(rejected.id, [Outcome::Permanent]);
    let mut config = config("a");
    // The next retry would come in ten minutes.
    config.retry_initial = Duration::from_secs(600);
    config.retry_max = Duration::from_secs(600);
    let relay = start(&store, &sink, config);
    eventually("the partition is blocked", || {
        store.blocked_reason(0).is_some()
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    assert!(!store.is_published(rejected.id));
    let asked_at = Instant::now();
    store.request_retry(0);
    eventually("the message passes", || store.is_published(rejected.id)).await;
    assert!(
        asked_at.elapsed() <= Duration::from_secs(2),
        "retried {:?} after the request, not at once",
        asked_at.elapsed()
    );
    eventually("the partition is unblocked", || {
        store.blocked_reason(0).is_none()
    })
    .await;
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn park_aggregate_parks_the_rejected_aggregate_in_order_and_the_partition_goes_on() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let first_of_1 = event(&store, "1", 1);
    let rejected = event(&store, "2", 1);
    let other = event(&store, "3", 1);
    let later_of_2 = event(&store, "2", 2);
    let last_of_1 = event(&store, "1", 2);
    // Rejected once: after its requeue it passes.
    sink.script(rejected.id, [Outcome::Permanent]);
    let mut config = config("a");
    config.on_permanent_failure = OnPermanentFailure::ParkAggregate;
    let relay = start(&store, &sink, config);
    eventually("every other message is published", || {
        [&first_of_1, &other, &last_of_1]
            .iter()
            .all(|m| store.is_published(m.id))
    })
    .await;
    assert_eq!(store.parked(), ids(&[rejected.clone(), later_of_2.clone()]));
    assert!(!store.is_published(later_of_2.id));
    assert!(
        store.blocked_reasons(0).is_empty(),
        "parking does not block"
    );
    assert_eq!(relay.stats.parked.load(Ordering::Relaxed), 2);

    // A message of the parked aggregate enqueued later waits for the parked ones.
    let newest_of_2 = event(&store, "2", 3);
    sleep(Duration::from_secs(5)).await;
    assert!(
        !store.is_published(newest_of_2.id),
        "held behind the parked"
    );

    assert_eq!(store.requeue_parked("order", "2"), 2);
    eventually("the aggregate's messages are published", || {
        store.is_published(newest_of_2.id)
    })
    .await;
    let of_2: Vec<_> = sink
        .acked(0)
        .into_iter()
        .filter(|id| [rejected.id, later_of_2.id, newest_of_2.id].contains(id))
        .collect();
    assert_eq!(
        of_2,
        [rejected.id, later_of_2.id, newest_of_2.id],
        "in version order"
    );
    relay.stop().await;
}
