//! The end-to-end scenarios every outbox store runs with real `ferry relay` processes and
//! a real broker: kill -9 at random points, two relays sharing and rebalancing, a paused
//! zombie relay, graceful shutdown, a message the broker rejects, a replay of a lost
//! stream. A store's test binary implements [`StoreSink`] for the sinks it runs against
//! ([`super::sinks`]) and calls each scenario from a `#[tokio::test]`; the scenarios that
//! rest on what only NATS does ask for `StoreSink<Sink = Nats>`.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use uuid::Uuid;

use ferry::NewMessage;

use super::sinks::{Nats, TestSink};
use super::{Producer, Report, Scenario, kill_nine_repeatedly, produce};

/// An outbox in one store, relayed to a [`TestSink`], both named after the scenario's tag.
#[allow(async_fn_in_trait)]
pub trait StoreSink: Sized {
    type Sink: TestSink;

    /// A migrated outbox of `partitions` partitions (plus `extra_outbox` lines in its
    /// `[outbox]` section), relayed to a fresh stream or topic; `duplicate_window_secs` is
    /// the broker's de-duplication window where it has one.
    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self;

    fn scenario(&self) -> &Scenario;

    /// The store's producer API on the scenario's outbox.
    fn outbox(&self) -> &impl Producer;

    /// Enqueues `per_aggregate` events for each of `aggregates` aggregates from `producers`
    /// concurrent producers, with the store's producer API; returns the ids.
    fn produce(
        &self,
        aggregates: usize,
        per_aggregate: usize,
        producers: usize,
    ) -> JoinHandle<HashSet<Uuid>> {
        tokio::spawn(produce(
            self.outbox().clone(),
            aggregates,
            per_aggregate,
            producers,
        ))
    }

    /// Enqueues, together, a 1.5 MB message (over NATS's 1 MiB limit) for aggregate
    /// `blob/1` and a small one for `blob/2`; returns the large one's id.
    async fn enqueue_oversized_then_small(&self) -> Uuid {
        let ids = self
            .outbox()
            .commit(vec![
                NewMessage::new("blob", "1", "blob.stored", vec![b'x'; 1_500_000]),
                NewMessage::new("blob", "2", "blob.stored", "{}"),
            ])
            .await;
        ids[0]
    }

    /// Removes what `new` made in the store, if the store keeps it apart from other tests.
    async fn remove_outbox(&self) {}

    /// Reads the stream or topic from the start and checks it against `produced`.
    async fn check_stream(&self, produced: &HashSet<Uuid>) -> Report {
        Report::of(Self::Sink::read(&self.scenario().tag).await, produced)
    }

    async fn cleanup(self) {
        Self::Sink::remove(&self.scenario().tag).await;
        self.remove_outbox().await;
    }
}

/// G2, G3, G4: six kill -9s while 22,000 messages flow lose and duplicate nothing.
pub async fn kill_nine_at_random_points<S: StoreSink>() {
    // A 1 s duplicate window is shorter than every takeover here (lease TTL 2 s): only
    // reconciliation by message id keeps re-sends out of the stream.
    let e2e = S::new(8, 1, "").await;
    let producing = e2e.produce(200, 110, 4);
    let (relay, mut takeover_logs) = kill_nine_repeatedly(e2e.scenario(), 6).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 22_000);
    e2e.scenario().wait_drained(Duration::from_secs(180)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    takeover_logs.push_str(&relay.logs());
    assert!(
        takeover_logs.contains("Unclean"),
        "restarted relays should have taken partitions over from killed ones:\n{takeover_logs}"
    );
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success());
    e2e.cleanup().await;
}

/// Two relays share the partitions fairly, and one takes all again when the other leaves.
pub async fn relays_share_partitions_fairly_and_rebalance<S: StoreSink>() {
    let e2e = S::new(8, 120, "").await;
    let scenario = e2e.scenario();
    let a = scenario.relay("relay-a");
    scenario.wait_for_shares(1, 8).await;
    let producing = e2e.produce(50, 40, 2);
    let b = scenario.relay("relay-b");
    scenario.wait_for_shares(2, 4).await;
    assert!(b.terminate(Duration::from_secs(15)).success());
    scenario.wait_for_shares(1, 8).await;
    let produced = producing.await.unwrap();
    scenario.wait_drained(Duration::from_secs(60)).await;
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    assert!(a.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// G5: a relay paused past its lease finds its leases gone when it resumes; order holds.
pub async fn paused_zombie_relay_is_fenced<S: StoreSink>() {
    zombie_is_fenced(S::new(8, 120, "").await).await;
}

/// Relay a is paused past its lease while b takes its partitions over, then resumes: the
/// stream stays perfect and a finds its leases gone.
pub async fn zombie_is_fenced<S: StoreSink>(e2e: S) {
    let scenario = e2e.scenario();
    let a = scenario.relay("relay-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = scenario.relay("relay-b");
    let producing = e2e.produce(100, 60, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    // Well past the 2 s lease: b takes a's partitions over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    scenario.wait_drained(Duration::from_secs(120)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = a.logs();
    assert!(
        super::found_a_lease_gone(&logs),
        "the resumed relay should have found its leases gone:\n{logs}"
    );
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// SIGTERM lets the relay finish, release every lease and exit 0.
pub async fn sigterm_finishes_and_releases_leases<S: StoreSink>() {
    let e2e = S::new(4, 120, "").await;
    let scenario = e2e.scenario();
    let relay = scenario.relay("relay");
    let produced = e2e.produce(20, 10, 1).await.unwrap();
    scenario.wait_drained(Duration::from_secs(60)).await;
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let owners: Vec<_> = scenario.owners().into_iter().flatten().collect();
    assert!(
        owners.is_empty(),
        "leases still held after shutdown: {owners:?}"
    );
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    e2e.cleanup().await;
}

/// A message the broker rejects for good blocks its partition, with the reason in `ferry
/// status`, and nothing after it is sent.
pub async fn rejected_message_blocks_its_partition<S: StoreSink<Sink = Nats>>() {
    // The outbox accepts 2 MiB; NATS's default max_payload is 1 MiB.
    let e2e = S::new(1, 120, "max_payload_bytes = 2097152").await;
    let big = e2e.enqueue_oversized_then_small().await;
    let scenario = e2e.scenario();
    let relay = scenario.relay("relay");
    let blocked = scenario.wait_blocked(0, &relay).await;
    assert!(blocked.contains(&big.to_string()), "{blocked}");
    assert_eq!(
        scenario.backlog(),
        2,
        "nothing after the rejected message is sent or marked"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// The broker loses the stream after the relay published everything; `ferry replay --all`
/// restores it from the messages the store kept: each once, every aggregate in order.
pub async fn replay_restores_a_lost_stream<S: StoreSink<Sink = Nats>>() {
    let e2e = S::new(4, 120, "retention_secs = 3600").await;
    let scenario = e2e.scenario();
    let relay = scenario.relay("relay");
    let produced = e2e.produce(20, 10, 2).await.unwrap();
    scenario.wait_drained(Duration::from_secs(60)).await;
    assert!(relay.terminate(Duration::from_secs(15)).success());
    Nats::remove(&scenario.tag).await;

    let progress = scenario.dir.path().join("replay.json");
    let output = scenario.ferry(&[
        "replay",
        "--name",
        "restore",
        "--all",
        "--progress-file",
        progress.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(&format!("finished: {} messages sent", produced.len())),
        "{text}"
    );
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    e2e.cleanup().await;
}

/// One `#[tokio::test]` per scenario above, for the [`StoreSink`] implementation `$store`
/// (relayed to NATS).
#[allow(unused_macros)]
macro_rules! scenario_tests {
    ($store:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn g2_g3_g4_kill_nine_at_random_points_loses_and_duplicates_nothing() {
            common::scenarios::kill_nine_at_random_points::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn relays_share_partitions_fairly_and_rebalance_when_one_joins_or_leaves() {
            common::scenarios::relays_share_partitions_fairly_and_rebalance::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn g5_a_paused_zombie_relay_is_fenced_and_order_holds() {
            common::scenarios::paused_zombie_relay_is_fenced::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sigterm_finishes_releases_leases_and_exits_cleanly() {
            common::scenarios::sigterm_finishes_and_releases_leases::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_the_broker_rejects_blocks_its_partition_visibly() {
            common::scenarios::rejected_message_blocks_its_partition::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn replay_restores_a_lost_stream_from_the_kept_messages() {
            common::scenarios::replay_restores_a_lost_stream::<$store>().await;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use scenario_tests;
