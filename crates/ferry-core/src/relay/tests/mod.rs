//! The relay against the in-memory store and the scripted sink, on tokio's paused clock:
//! leases, fencing, failures and shutdown, each in seconds and with no service.

mod capture;
mod failures;
mod fencing;
mod leases;
mod metrics;
mod parking;
mod shutdown;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Relay, RelayConfig, RelayError, RelayStats};
use crate::message::{Message, NewMessage};
use crate::testing::{MarkAttempt, MemoryStore, Release, ScriptedSink, SinkEvent};

/// The lease TTL of every test relay (the default).
const TTL: Duration = Duration::from_secs(10);

fn config(relay_id: &str) -> RelayConfig {
    let mut config = RelayConfig::new(relay_id);
    config.lease_ttl = TTL;
    config.retry_max = Duration::from_secs(2);
    config
}

/// A relay running as a task of the test's runtime.
struct Running {
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RelayError>>,
}

fn start(store: &Arc<MemoryStore>, sink: &Arc<ScriptedSink>, config: RelayConfig) -> Running {
    let relay = Relay::new(store.clone(), store.clone(), sink.clone(), config);
    let shutdown = CancellationToken::new();
    Running {
        stats: relay.stats(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(relay.run(shutdown)),
    }
}

impl Running {
    /// Asks for a graceful stop and waits until `run` has returned.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the relay task panicked")
            .expect("the relay failed");
    }
}

/// One partition, one message, and a relay whose batch of it waits `ack_delay` for its
/// acks, in flight when this returns.
async fn batch_in_flight(
    ack_delay: Duration,
    config: RelayConfig,
) -> (Arc<MemoryStore>, Arc<ScriptedSink>, Message, Running) {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    sink.set_ack_delay(ack_delay);
    let message = enqueue(&store, "1");
    let relay = start(&store, &sink, config);
    eventually("the batch is in flight", || sink.batches(0).len() == 1).await;
    (store, sink, message, relay)
}

/// Lets (paused) time run until `condition` holds; fails after a minute of it.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Enqueues an event of aggregate `order/<id>`.
fn enqueue(store: &MemoryStore, id: &str) -> Message {
    store.enqueue(NewMessage::new("order", id, "order.paid", "{}"))
}

/// The ids marked by accepted marks under `epoch`, one list per mark.
fn marked_under(store: &MemoryStore, epoch: i64) -> Vec<Vec<Uuid>> {
    store
        .marks()
        .into_iter()
        .filter(|mark| mark.accepted && mark.epoch == epoch)
        .map(|mark| mark.ids)
        .collect()
}

/// The marks the store refused.
fn refused_marks(store: &MemoryStore) -> Vec<MarkAttempt> {
    store
        .marks()
        .into_iter()
        .filter(|mark| !mark.accepted)
        .collect()
}

/// The release of partition 0's first lease.
fn first_release(clean: bool) -> Release {
    Release {
        partition: 0,
        epoch: 1,
        clean,
    }
}

fn reconciliations(sink: &ScriptedSink) -> Vec<SinkEvent> {
    sink.events()
        .into_iter()
        .filter(|event| matches!(event, SinkEvent::Reconciled { .. }))
        .collect()
}

fn ids(messages: &[Message]) -> Vec<Uuid> {
    messages.iter().map(|m| m.id).collect()
}
