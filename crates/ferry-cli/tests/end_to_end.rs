//! End-to-end guarantees with real `ferry relay` processes, the real PostgreSQL and the
//! real NATS JetStream: kill -9 at random points, a paused zombie relay, a blocked
//! partition, graceful shutdown. A checker reads the whole stream back and reports, per
//! aggregate, missing versions, duplicate ids and versions out of order.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::scenarios::StoreSink;
use common::sinks::Nats;
use common::{PgScenario, Producer, Scenario, nats_sink_section, unique_tag};
use ferry_core::testing::services;

/// A PostgreSQL outbox relayed to a NATS stream, both named after the scenario's tag.
struct PgNats {
    pg: PgScenario,
}

impl PgNats {
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
        Self {
            pg: PgScenario::new(tag, partitions, sink, extra_outbox).await,
        }
    }
}

impl StoreSink for PgNats {
    type Sink = Nats;

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

    fn scenario(&self) -> &Scenario {
        &self.pg.scenario
    }

    fn outbox(&self) -> &impl Producer {
        &self.pg.outbox
    }
}

common::scenarios::scenario_tests!(PgNats);

/// The same relay publishing structured-mode events: reconciliation after each kill reads
/// the partition keys from the bodies.
struct PgNatsStructured(PgNats);

impl StoreSink for PgNatsStructured {
    type Sink = Nats;

    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let sink = format!(
            "{}content_mode = \"structured\"\n",
            nats_sink_section(&tag, duplicate_window_secs)
        );
        Self(PgNats::with_sink(&tag, partitions, &sink, extra_outbox).await)
    }

    fn scenario(&self) -> &Scenario {
        self.0.scenario()
    }

    fn outbox(&self) -> &impl Producer {
        self.0.outbox()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_in_structured_mode_loses_and_duplicates_nothing() {
    common::scenarios::kill_nine_at_random_points::<PgNatsStructured>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_zombie_relay_is_fenced_with_jetstream_subject_sequences() {
    common::scenarios::zombie_is_fenced(PgNats::fenced(8).await).await;
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
    assert_relay_waits(
        e2e.scenario(),
        &services::nats_url(),
        "nats://127.0.0.1:4299",
        "4299",
    )
    .await;
    assert_relay_waits(
        e2e.scenario(),
        "127.0.0.1:5432",
        "127.0.0.1:1",
        "PostgreSQL",
    )
    .await;

    let bad = e2e.scenario().dir.path().join("bad.toml");
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

/// Whether the scenario's outbox table has its notify trigger.
async fn has_notify_trigger(e2e: &PgNats) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
    )
    .bind(format!("e{}_outbox", e2e.scenario().tag))
    .bind(format!("e{}_outbox_notify", e2e.scenario().tag))
    .fetch_one(e2e.pg.outbox.pool())
    .await
    .unwrap()
}

/// `outbox.wake = "poll"`: `ferry migrate` leaves the table without its notify trigger, and
/// the relay finds every row by polling, in order, once; a relay configured to be notified
/// on that table says it is not, and `ferry migrate` with its config puts the trigger back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_notifications_polls_every_row_out() {
    let e2e = PgNats::new(4, 120, "wake = \"poll\"").await;
    assert!(!has_notify_trigger(&e2e).await, "migrated with wake = poll");
    let relay = e2e.scenario().relay("poll");
    let produced = e2e.produce(40, 5, 2).await.unwrap();
    e2e.scenario().wait_drained(Duration::from_secs(60)).await;
    e2e.check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    assert!(relay.terminate(Duration::from_secs(10)).success());
    assert!(
        !e2e.scenario().logs("poll").contains("notify trigger"),
        "{}",
        e2e.scenario().logs("poll")
    );

    let notify = e2e
        .scenario()
        .config_variant("notify", "wake = \"poll\"", "wake = \"notify\"");
    let relay = e2e.scenario().relay_with_config("notify", &notify);
    relay
        .wait_for_log("has no notify trigger", Duration::from_secs(20))
        .await;
    assert!(relay.terminate(Duration::from_secs(10)).success());
    let migrated = std::process::Command::new(common::ferry_bin())
        .args(["migrate", "--config"])
        .arg(&notify)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    assert!(
        has_notify_trigger(&e2e).await,
        "migrated with wake = notify"
    );
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
