//! Sink failures: transient ones are retried in order, permanent ones block the partition
//! until the message passes; and an unreachable store is waited for.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::{TTL, config, enqueue, eventually, first_release, ids, marked_under, start};
use crate::message::Message;
use crate::testing::{MemoryStore, Outcome, ScriptedSink, SinkEvent};

fn rejection(message: &Message) -> String {
    format!(
        "message {} (sequence {}) rejected: scripted rejection",
        message.id, message.sequence
    )
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_in_order_without_blocking() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (1..=4).map(|i| enqueue(&store, &i.to_string())).collect();
    sink.script(messages[1].id, [Outcome::Transient]);
    let relay = start(&store, &sink, config("a"));
    eventually("every message is published", || {
        messages.iter().all(|m| store.is_published(m.id))
    })
    .await;

    let all = ids(&messages);
    assert_eq!(sink.batches(0), [all.clone(), all[1..].to_vec()]);
    assert_eq!(
        marked_under(&store, 1),
        [all[..1].to_vec(), all[1..].to_vec()]
    );
    let marks = store.marks();
    assert_eq!(
        marks[0].checkpoint, None,
        "past a failed message: no checkpoint"
    );
    assert!(marks[1].checkpoint.is_some());
    assert!(store.blocked_reasons(0).is_empty());
    // The failed message and the two the sink did not send after it.
    assert_eq!(relay.stats.publish_failures.load(Ordering::Relaxed), 3);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_permanent_rejection_blocks_the_partition_and_is_retried_at_retry_max() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (1..=3).map(|i| enqueue(&store, &i.to_string())).collect();
    let rejected = &messages[1];
    sink.script(rejected.id, [Outcome::Permanent; 8]);
    let config = config("a");
    let retry_max = config.retry_max;
    let relay = start(&store, &sink, config);
    eventually("eight rejections", || sink.batches(0).len() == 8).await;

    assert_eq!(store.blocked_reason(0), Some(rejection(rejected)));
    let waiting = ids(&messages[1..]);
    assert!(
        sink.batches(0)[1..].iter().all(|batch| *batch == waiting),
        "{:?}",
        sink.batches(0)
    );
    assert_eq!(sink.acked(0), [messages[0].id], "nothing after it passes");
    assert_eq!(marked_under(&store, 1), [[messages[0].id]]);
    assert_eq!(relay.stats.publish_failures.load(Ordering::Relaxed), 16);

    let sent_at: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|event| match event {
            SinkEvent::Published { at, .. } => Some(at),
            _ => None,
        })
        .collect();
    let gaps: Vec<Duration> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] <= Duration::from_millis(100), "{gaps:?}");
    // From the sixth rejection on, the backoff is at its cap.
    assert!(
        gaps[5..]
            .iter()
            .all(|gap| *gap >= retry_max / 2 && *gap <= retry_max),
        "{gaps:?}"
    );

    eventually("the rejected message passes", || {
        store.is_published(rejected.id)
    })
    .await;
    eventually("the next one too", || store.is_published(messages[2].id)).await;
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_blocked_reason_is_cleared_once_the_message_passes() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let first = enqueue(&store, "1");
    sink.script(first.id, [Outcome::Permanent, Outcome::Permanent]);
    let relay = start(&store, &sink, config("a"));
    eventually("it passes", || store.is_published(first.id)).await;
    let second = enqueue(&store, "2");
    eventually("the next one passes", || store.is_published(second.id)).await;

    let reason = rejection(&first);
    assert_eq!(
        store.blocked_reasons(0),
        [Some(reason.clone()), Some(reason), None]
    );
    assert_eq!(store.blocked_reason(0), None);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_is_waited_for() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    store.set_outbox_unavailable(true);
    let message = enqueue(&store, "1");
    let relay = start(&store, &sink, config("a"));
    let stopped_while_waiting = start(&store, &sink, config("b"));
    sleep(Duration::from_secs(30)).await;
    assert!(!relay.task.is_finished());
    stopped_while_waiting.stop().await;
    assert_eq!(store.live_relays(), Vec::<String>::new());

    store.set_outbox_unavailable(false);
    eventually("published", || store.is_published(message.id)).await;
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_worker_releases_its_partition_for_a_takeover_at_once() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (1..=2).map(|i| enqueue(&store, &i.to_string())).collect();
    sink.script(messages[1].id, [Outcome::Panic]);
    let started = Instant::now();
    let relay = start(&store, &sink, config("a"));
    eventually("every message is published", || {
        messages.iter().all(|m| store.is_published(m.id))
    })
    .await;

    assert!(
        started.elapsed() < TTL,
        "taken over after {:?}, not before the lease expired",
        started.elapsed()
    );
    assert_eq!(store.releases()[0], first_release(false));
    assert!(
        sink.events()
            .iter()
            .any(|event| matches!(event, SinkEvent::Reconciled { partition: 0, .. })),
        "the takeover reconciles what the panicked batch may have published"
    );
    assert!(
        sink.overlapping_opens().is_empty(),
        "closed before reopened"
    );
    assert_eq!(relay.stats.worker_panics.load(Ordering::Relaxed), 1);
    relay.stop().await;
}
