//! End-to-end guarantees with real `ferry relay` processes, the real PostgreSQL and the
//! real NATS JetStream: kill -9 at random points, a paused zombie relay, a blocked
//! partition, graceful shutdown. A checker reads the whole stream back and reports, per
//! aggregate, missing versions, duplicate ids and versions out of order.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use uuid::Uuid;

use common::{
    FAST_RELAY, Report, Scenario, delete_nats_stream, kill_nine_repeatedly, nats_sink_section,
    nats_stream, nats_url, outbox_section, pg_outbox, pg_store_section, produce_pg,
    read_nats_stream, unique_tag,
};
use ferry::NewMessage;
use ferry::postgres::PgOutbox;

/// A PostgreSQL outbox relayed to a NATS stream, both named after the scenario's tag.
struct PgNats {
    scenario: Scenario,
    outbox: PgOutbox,
}

impl PgNats {
    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        Self::with_sink(
            &tag,
            partitions,
            &nats_sink_section(&tag, duplicate_window_secs),
            extra_outbox,
        )
        .await
    }

    /// Subjects per aggregate type and partition: JetStream fences the relays (on by
    /// default for such subjects).
    async fn fenced(partitions: u32) -> Self {
        let tag = unique_tag();
        let sink = nats_sink_section(&tag, 120).replace(
            "{aggregate_type}.{event_type}",
            "{aggregate_type}.p{partition}",
        );
        Self::with_sink(&tag, partitions, &sink, "").await
    }

    async fn with_sink(tag: &str, partitions: u32, sink: &str, extra_outbox: &str) -> Self {
        let scenario = Scenario::new(
            tag,
            &[
                &pg_store_section(),
                &outbox_section(tag, partitions, extra_outbox),
                sink,
                FAST_RELAY,
            ],
        );
        let outbox = pg_outbox(tag).await;
        Self { scenario, outbox }
    }

    fn produce(
        &self,
        aggregates: usize,
        per_aggregate: usize,
        producers: usize,
    ) -> tokio::task::JoinHandle<HashSet<Uuid>> {
        tokio::spawn(produce_pg(
            self.outbox.clone(),
            aggregates,
            per_aggregate,
            producers,
        ))
    }

    /// Reads the stream from the start and checks it against `produced`.
    async fn check_stream(&self, produced: &HashSet<Uuid>) -> Report {
        Report::of(
            read_nats_stream(&nats_stream(&self.scenario.tag)).await,
            produced,
        )
    }

    async fn cleanup(self) {
        delete_nats_stream(&nats_stream(&self.scenario.tag)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_at_random_points_loses_and_duplicates_nothing() {
    // A 1 s duplicate window is shorter than every takeover here (lease TTL 2 s): only
    // reconciliation by message id keeps re-sends out of the stream.
    let e2e = PgNats::new(8, 1, "").await;
    let producing = e2e.produce(200, 110, 4);
    let (relay, mut takeover_logs) = kill_nine_repeatedly(&e2e.scenario, 6).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 22_000);
    e2e.scenario.wait_drained(Duration::from_secs(180)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_share_partitions_fairly_and_rebalance_when_one_joins_or_leaves() {
    let e2e = PgNats::new(8, 120, "").await;
    let a = e2e.scenario.relay("relay-a");
    e2e.scenario.wait_for_shares(1, 8).await;
    let producing = e2e.produce(50, 40, 2);
    let b = e2e.scenario.relay("relay-b");
    e2e.scenario.wait_for_shares(2, 4).await;
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.scenario.wait_for_shares(1, 8).await;
    let produced = producing.await.unwrap();
    e2e.scenario.wait_drained(Duration::from_secs(60)).await;
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    assert!(a.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_zombie_relay_is_fenced_and_order_holds() {
    zombie_is_fenced(PgNats::new(8, 120, "").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_zombie_relay_is_fenced_with_jetstream_subject_sequences() {
    zombie_is_fenced(PgNats::fenced(8).await).await;
}

/// Relay a is paused past its lease while b takes its partitions over, then resumes: the
/// stream stays perfect and a finds its leases gone.
async fn zombie_is_fenced(e2e: PgNats) {
    let a = e2e.scenario.relay("relay-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = e2e.scenario.relay("relay-b");
    let producing = e2e.produce(100, 60, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    // Well past the 2 s lease: b takes a's partitions over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = a.logs();
    assert!(
        logs.contains("lease lost") || logs.contains("lease taken over"),
        "the resumed relay should have found its leases gone:\n{logs}"
    );
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_releases_leases_and_exits_cleanly() {
    let e2e = PgNats::new(4, 120, "").await;
    let relay = e2e.scenario.relay("relay");
    let produced = e2e.produce(20, 10, 1).await.unwrap();
    e2e.scenario.wait_drained(Duration::from_secs(60)).await;
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let owners: Vec<_> = e2e.scenario.owners().into_iter().flatten().collect();
    assert!(
        owners.is_empty(),
        "leases still held after shutdown: {owners:?}"
    );
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_rejects_blocks_its_partition_visibly() {
    // The outbox accepts 2 MiB; NATS's default max_payload is 1 MiB.
    let e2e = PgNats::new(1, 120, "max_payload_bytes = 2097152").await;
    let mut tx = e2e.outbox.pool().begin().await.unwrap();
    let big = e2e
        .outbox
        .enqueue(
            &mut tx,
            NewMessage::new("blob", "1", "blob.stored", vec![b'x'; 1_500_000]),
        )
        .await
        .unwrap();
    e2e.outbox
        .enqueue(&mut tx, NewMessage::new("blob", "2", "blob.stored", "{}"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = e2e.scenario.relay("relay");
    let blocked = e2e.scenario.wait_blocked(0, &relay).await;
    assert!(blocked.contains(&big.id.to_string()), "{blocked}");
    assert_eq!(
        e2e.scenario.backlog(),
        2,
        "nothing after the rejected message is sent or marked"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// Runs a relay whose config has `from` replaced by the unreachable `to`: it must keep
/// running, log that it is waiting (naming `expected`), and stop cleanly on SIGTERM.
async fn assert_relay_waits(scenario: &Scenario, from: &str, to: &str, expected: &str) {
    let name = format!("unreachable-{expected}");
    let config = scenario.config_variant(&name, from, to);
    let relay = scenario.relay_with_config(&name, &config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = relay.logs();
    assert!(
        logs.contains(expected) && logs.contains("not ready"),
        "{logs}"
    );
    assert!(
        relay.terminate(Duration::from_secs(10)).success(),
        "a waiting relay stops on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_waits_for_an_unreachable_broker_or_database_and_bad_config_is_refused() {
    let e2e = PgNats::new(2, 120, "").await;
    assert_relay_waits(&e2e.scenario, &nats_url(), "nats://127.0.0.1:4299", "4299").await;
    assert_relay_waits(&e2e.scenario, "127.0.0.1:5432", "127.0.0.1:1", "PostgreSQL").await;

    let bad = e2e.scenario.dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\ntype = \"postgres\"\nurl = \"postgres://x@127.0.0.1/x\"\n[sink]\ntype = \"stdout\"\n[relay]\nbatch_sise = 10\n").unwrap();
    let output = std::process::Command::new(common::ferry_bin())
        .args(["relay", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("batch_sise"), "{stderr}");
    e2e.cleanup().await;
}

#[test]
fn demo_runs_on_embedded_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::ferry_bin())
        .args(["demo", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("done in"), "{stdout}");
    assert!(
        stdout.contains("0 applied, "),
        "a second delivery applies nothing: {stdout}"
    );
}
