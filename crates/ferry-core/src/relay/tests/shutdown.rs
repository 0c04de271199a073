//! Shutdown: the batch in flight is finished and marked within `shutdown_timeout`, or
//! abandoned unmarked after it.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::{batch_in_flight, config, first_release};
use crate::testing::SinkEvent;

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_lets_the_batch_in_flight_finish_and_releases_clean() {
    let (store, sink, message, relay) = batch_in_flight(Duration::from_secs(2), config("a")).await;

    let asked = Instant::now();
    relay.stop().await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(store.is_published(message.id));
    assert_eq!(store.releases(), [first_release(true)]);
    assert!(store.live_relays().is_empty());
    assert!(
        sink.events()
            .ends_with(&[SinkEvent::Closed { partition: 0 }, SinkEvent::ShutDown])
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_shutdown_timeout_the_batch_is_abandoned_unmarked_and_released_unclean() {
    let mut config = config("a");
    config.shutdown_timeout = Duration::from_secs(1);
    let (store, sink, message, relay) = batch_in_flight(Duration::from_secs(60), config).await;

    let asked = Instant::now();
    relay.stop().await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(store.releases(), [first_release(false)]);
    // The abandoned batch's acks never count: nothing is marked, even later.
    sleep(Duration::from_secs(120)).await;
    assert!(store.marks().is_empty(), "{:?}", store.marks());
    assert_eq!(store.unpublished(0), [message.id]);
    assert!(sink.acked(0).is_empty());
}
