//! Log capture mode against the in-memory log: the drain before streaming, no message
//! published twice from a re-sent transaction, per-partition log order, confirmations only
//! past acked and marked transactions, backpressure behind a blocked partition, a large
//! transaction in pieces (bounded read-ahead, a stream cut in its middle), and one
//! streaming relay at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use tokio::time::sleep;
use uuid::Uuid;

use super::{Running, config, enqueue, eventually};
use crate::message::{Message, NewMessage};
use crate::relay::{OnPermanentFailure, Relay, RelayConfig, RelayError};
use crate::testing::{MemoryLog, MemoryStore, Outcome, ScriptedSink, SinkEvent};
use tokio_util::sync::CancellationToken;

/// A store, its log and a sink, shared by the relays a test starts in log mode.
struct Fixture {
    store: Arc<MemoryStore>,
    log: MemoryLog,
    sink: Arc<ScriptedSink>,
}

impl Fixture {
    fn new(partitions: u32) -> Self {
        Self {
            store: Arc::new(MemoryStore::new(partitions)),
            log: MemoryLog::new(),
            sink: Arc::new(ScriptedSink::new()),
        }
    }

    /// Starts a relay streaming the log.
    fn start(&self, config: RelayConfig) -> Running {
        let relay = Relay::new(
            self.store.clone(),
            self.store.clone(),
            self.sink.clone(),
            config,
        )
        .with_log_capture(Arc::new(self.log.clone()));
        let shutdown = CancellationToken::new();
        Running {
            stats: relay.stats(),
            shutdown: shutdown.clone(),
            task: tokio::spawn(relay.run(shutdown)),
        }
    }

    /// Starts a relay and waits until it streams.
    async fn streaming(&self, config: RelayConfig) -> Running {
        let relay = self.start(config);
        eventually("the relay streams", || {
            relay.stats.streaming.load(Ordering::Relaxed)
        })
        .await;
        relay
    }
}

/// Every id the sink acked, with how many times.
fn acks(sink: &ScriptedSink) -> HashMap<Uuid, usize> {
    let mut acks = HashMap::new();
    for event in sink.events() {
        if let SinkEvent::Acked { ids, .. } = event {
            for id in ids {
                *acks.entry(id).or_default() += 1;
            }
        }
    }
    acks
}

#[tokio::test(start_paused = true)]
async fn streams_in_log_order_per_partition_and_confirms_what_is_marked() {
    let fixture = Fixture::new(4);
    let Fixture { store, log, sink } = &fixture;
    let relay = fixture.streaming(config("a")).await;

    let mut all: Vec<Message> = Vec::new();
    for round in 0..5 {
        // One transaction per round, with messages of several aggregates and partitions.
        let transaction: Vec<Message> = (0..6)
            .map(|i| enqueue(store, &format!("{}", (i + round) % 7)))
            .collect();
        all.extend(transaction.iter().cloned());
        log.commit(transaction);
    }
    log.commit(Vec::new());
    eventually("everything is published and confirmed", || {
        all.iter().all(|m| store.is_published(m.id)) && log.confirmed() == 6
    })
    .await;

    let acks = acks(sink);
    assert!(all.iter().all(|m| acks[&m.id] == 1), "each message once");
    for partition in 0..4 {
        let published: Vec<Uuid> = sink.batches(partition).concat();
        let in_log_order: Vec<Uuid> = all
            .iter()
            .filter(|m| m.partition == partition)
            .map(|m| m.id)
            .collect();
        assert_eq!(published, in_log_order, "partition {partition}");
    }
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn drains_rows_the_log_does_not_hold_and_skips_re_sent_ones_already_published() {
    let fixture = Fixture::new(2);
    let Fixture { store, log, sink } = &fixture;
    // Committed before the log's slot existed (or while relays polled): in the table only.
    let before: Vec<Message> = (0..4).map(|i| enqueue(store, &i.to_string())).collect();
    // In the log and the table, not confirmed: the stream re-sends them after the drain
    // published them.
    let unconfirmed: Vec<Message> = (4..8).map(|i| enqueue(store, &i.to_string())).collect();
    log.commit(unconfirmed.clone());
    let relay = fixture.start(config("a"));
    // Committed while the relay drains: in the table and the log at once, as a commit is.
    let after = enqueue(store, "8");
    log.commit(vec![after.clone()]);
    eventually("the relay streams", || {
        relay.stats.streaming.load(Ordering::Relaxed)
    })
    .await;
    eventually("everything is published and confirmed", || {
        before
            .iter()
            .chain(&unconfirmed)
            .chain([&after])
            .all(|m| store.is_published(m.id))
            && log.confirmed() == 2
    })
    .await;

    let acks = acks(sink);
    for message in before.iter().chain(&unconfirmed).chain([&after]) {
        assert_eq!(
            acks[&message.id], 1,
            "message {} published once",
            message.id
        );
    }
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transactions_re_sent_after_the_drain_are_checked_a_batch_at_a_time() {
    let fixture = Fixture::new(4);
    let Fixture { store, log, sink } = &fixture;
    // A relay that crashed under a load of one-message transactions: thousands in the
    // table and in the log after its last confirmation.
    let resent: Vec<Message> = (0..2000)
        .map(|i| {
            let message = enqueue(store, &i.to_string());
            log.commit(vec![message.clone()]);
            message
        })
        .collect();
    let mut config = config("a");
    config.batch_size = 100;
    let relay = fixture.streaming(config).await;
    let after = enqueue(store, "after");
    log.commit(vec![after.clone()]);
    eventually("everything is published and confirmed", || {
        store.is_published(after.id) && log.confirmed() == 2001
    })
    .await;

    let acks = acks(sink);
    assert!(
        resent.iter().chain([&after]).all(|m| acks[&m.id] == 1),
        "each message once"
    );
    // Batches of 100: 2000 re-sent transactions are 20 checks per partition at
    // most, where one per transaction would be 2000.
    let checks = store.unpublished_checks();
    assert!(
        checks <= 4 * 20,
        "{checks} checks of the re-sent transactions"
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_row_streamed_before_it_is_visible_is_marked_once_it_is() {
    let fixture = Fixture::new(1);
    let Fixture { store, log, sink } = &fixture;
    let relay = fixture.streaming(config("a")).await;

    let late = store.enqueue_unseen(NewMessage::new("order", "1", "order.paid", "{}"));
    log.commit(vec![late.clone()]);
    eventually("the sink acked the streamed message", || {
        acks(sink).contains_key(&late.id)
    })
    .await;
    sleep(Duration::from_millis(50)).await;
    assert!(
        !store.is_published(late.id),
        "not visible yet: nothing to mark"
    );
    assert_eq!(log.confirmed(), 0, "not confirmed while unmarked");

    store.reveal(late.id);
    eventually("marked and confirmed once visible", || {
        store.is_published(late.id) && log.confirmed() == 1
    })
    .await;
    assert_eq!(acks(sink)[&late.id], 1, "published once");
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_blocked_partition_holds_the_confirmed_position_and_backpressures_the_log() {
    let fixture = Fixture::new(1);
    let Fixture { store, log, sink } = &fixture;
    let mut config = config("a");
    config.batch_size = 10;
    let relay = fixture.streaming(config).await;
    let first = enqueue(store, "1");
    let rejected = enqueue(store, "2");
    sink.script(rejected.id, [Outcome::Permanent; 8]);
    log.commit(vec![first.clone()]);
    log.commit(vec![rejected.clone()]);
    let behind: Vec<Message> = (0..400).map(|i| enqueue(store, &format!("b{i}"))).collect();
    for message in &behind {
        log.commit(vec![message.clone()]);
    }
    eventually(
        "the partition is blocked and the first transaction confirmed",
        || store.blocked_reason(0).is_some() && log.confirmed() == 1,
    )
    .await;
    sleep(Duration::from_millis(600)).await;
    assert!(!store.is_published(rejected.id), "still rejected");
    assert_eq!(
        log.confirmed(),
        1,
        "nothing past the rejected message is confirmed"
    );
    assert!(!store.is_published(behind[0].id), "nothing overtakes it");
    assert!(
        log.messages_read() < 300,
        "the stream is read no further than the full feed and the batch in hand: {} of 402",
        log.messages_read()
    );

    eventually("the rejection passes and the rest follows", || {
        behind.iter().all(|m| store.is_published(m.id)) && log.confirmed() == 402
    })
    .await;
    assert_eq!(store.blocked_reason(0), None);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_second_relay_waits_as_a_standby_and_takes_over() {
    let fixture = Fixture::new(2);
    let Fixture { store, log, .. } = &fixture;
    let first = fixture.streaming(config("a")).await;
    let second = fixture.start(config("b"));
    let message = enqueue(store, "1");
    log.commit(vec![message.clone()]);
    eventually("a publishes", || store.is_published(message.id)).await;
    assert!(!second.stats.streaming.load(Ordering::Relaxed), "b waits");
    assert_eq!(log.streams_started(), 1);

    first.stop().await;
    eventually("b streams", || {
        second.stats.streaming.load(Ordering::Relaxed)
    })
    .await;
    let later = enqueue(store, "2");
    log.commit(vec![later.clone()]);
    eventually("b publishes", || store.is_published(later.id)).await;
    assert_eq!(
        store.owner(later.partition).map(|(owner, _)| owner),
        Some("b".into())
    );
    second.stop().await;
}

#[tokio::test(start_paused = true)]
async fn park_aggregate_is_refused_in_log_mode() {
    let mut config = config("a");
    config.on_permanent_failure = OnPermanentFailure::ParkAggregate;
    let relay = Fixture::new(1).start(config);
    let failed = relay.task.await.expect("the relay task panicked");
    assert!(matches!(failed, Err(RelayError::Config(why)) if why.contains("on_permanent_failure")));
}

#[tokio::test(start_paused = true)]
async fn a_relay_that_lost_its_leases_gives_the_log_up_and_streams_again_once_it_holds_them() {
    let fixture = Fixture::new(2);
    let Fixture { store, log, .. } = &fixture;
    let relay = fixture.streaming(config("a")).await;
    // The store's clock jumps past the leases: the next renewal finds them expired.
    store.advance_clock(super::TTL * 2);
    eventually("a new stream is started", || log.streams_started() == 2).await;
    let later = enqueue(store, "1");
    log.commit(vec![later.clone()]);
    eventually("the new session publishes", || store.is_published(later.id)).await;
    assert!(relay.stats.leases_lost.load(Ordering::Relaxed) >= 1);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_message_transactions_behind_a_slow_sink_are_published_in_full_batches() {
    let fixture = Fixture::new(1);
    let Fixture { store, log, sink } = &fixture;
    let mut config = config("a");
    config.batch_size = 1000;
    // A sink whose cost is per batch (a Kafka transaction): the transactions committed
    // while one batch is in flight must go out together, as polling would fetch them.
    sink.set_ack_delay(Duration::from_secs(1));
    let relay = fixture.streaming(config).await;
    let messages: Vec<Message> = (0..1500).map(|i| enqueue(store, &i.to_string())).collect();
    for message in &messages {
        log.commit(vec![message.clone()]);
    }
    let last = messages.last().expect("messages").id;
    eventually("the last message is published", || store.is_published(last)).await;
    assert!(messages.iter().all(|m| store.is_published(m.id)));
    let sizes: Vec<usize> = sink.batches(0).iter().map(Vec::len).collect();
    assert_eq!(
        sizes.iter().max(),
        Some(&1000),
        "batches of batch_size while the sink is slow: {sizes:?}"
    );
    relay.stop().await;
}

/// One transaction of `len` messages of ten aggregates, committed to the log.
fn commit_large_transaction(store: &MemoryStore, log: &MemoryLog, len: usize) -> Vec<Message> {
    let transaction: Vec<Message> = (0..len)
        .map(|i| enqueue(store, &(i % 10).to_string()))
        .collect();
    log.commit(transaction.clone());
    transaction
}

/// Each partition's acked ids are its messages of `all`, in order.
fn assert_acked_in_log_order(sink: &ScriptedSink, all: &[Message], partitions: u32) {
    for partition in 0..partitions {
        let acked = sink.acked(partition);
        let in_log_order: Vec<Uuid> = all
            .iter()
            .filter(|m| m.partition == partition)
            .map(|m| m.id)
            .collect();
        assert_eq!(acked, in_log_order, "partition {partition}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_large_transaction_streams_in_pieces_and_the_relay_reads_only_a_few_batches_ahead() {
    let fixture = Fixture::new(1);
    let Fixture { store, log, sink } = &fixture;
    let mut config = config("a");
    config.batch_size = 10;
    let relay = fixture.streaming(config).await;
    let transaction = commit_large_transaction(store, log, 1000);
    sink.script(transaction[500].id, [Outcome::Permanent; 8]);
    eventually("the partition is blocked", || {
        store.blocked_reason(0).is_some()
    })
    .await;
    sleep(Duration::from_millis(600)).await;
    // The blocked batch (500..510), a full feed (a batch), the piece waiting for room.
    assert!(
        log.messages_read() <= 530,
        "the stream is read no further than the feed holds: {} of 1000",
        log.messages_read()
    );
    assert_eq!(log.confirmed(), 0, "not confirmed before its last piece");

    eventually("the rejection passes and the rest follows", || {
        transaction.iter().all(|m| store.is_published(m.id)) && log.confirmed() == 1
    })
    .await;
    let acks = acks(sink);
    assert!(
        transaction.iter().all(|m| acks[&m.id] == 1),
        "each message once"
    );
    assert_acked_in_log_order(sink, &transaction, 1);
    assert!(
        sink.batches(0).iter().all(|batch| batch.len() <= 10),
        "no batch above batch_size"
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_in_the_middle_of_a_transaction_resumes_from_the_previous_end_and_skips_nothing()
 {
    let fixture = Fixture::new(2);
    let Fixture { store, log, sink } = &fixture;
    let mut config = config("a");
    config.batch_size = 10;
    sink.set_ack_delay(Duration::from_millis(20));
    let relay = fixture.streaming(config).await;
    let before = commit_large_transaction(store, log, 5);
    let transaction = commit_large_transaction(store, log, 1000);
    eventually("part of the transaction is published", || {
        transaction
            .iter()
            .filter(|m| store.is_published(m.id))
            .count()
            >= 200
    })
    .await;
    log.cut_stream();
    eventually("a new stream is started", || log.streams_started() == 2).await;
    assert!(
        log.confirmed() <= 1,
        "the cut transaction was not confirmed: {}",
        log.confirmed()
    );
    eventually("everything is published and confirmed", || {
        transaction.iter().all(|m| store.is_published(m.id)) && log.confirmed() == 2
    })
    .await;
    let acks = acks(sink);
    let all: Vec<Message> = before.into_iter().chain(transaction).collect();
    assert!(
        all.iter().all(|m| acks[&m.id] == 1),
        "each message once: the new session's drain publishes the rest, and skips it from the re-sent transaction"
    );
    assert_acked_in_log_order(sink, &all, 2);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_worker_is_reported_and_its_partition_released_unclean() {
    let fixture = Fixture::new(1);
    let Fixture { store, log, sink } = &fixture;
    let relay = fixture.streaming(config("a")).await;
    let transaction: Vec<Message> = (1..=2).map(|i| enqueue(store, &i.to_string())).collect();
    sink.script(transaction[1].id, [Outcome::Panic]);
    log.commit(transaction.clone());
    eventually("the transaction is published after the panic", || {
        transaction.iter().all(|m| store.is_published(m.id))
    })
    .await;

    assert_eq!(relay.stats.worker_panics.load(Ordering::Relaxed), 1);
    assert!(
        store.releases().iter().any(|release| !release.clean),
        "released unclean, for the next session to reconcile: {:?}",
        store.releases()
    );
    assert_eq!(acks(sink)[&transaction[0].id], 1, "not published twice");
    relay.stop().await;
}
