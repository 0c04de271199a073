//! End-to-end guarantees of the Kafka sink with real `ferry relay` processes, the real
//! PostgreSQL and real Kafka-protocol brokers: kill -9 while messages flow, two relays
//! sharing the partitions, a paused zombie relay, a broker that is down at the start and
//! restarted mid-run. The checker reads each topic back in read_committed and reports, per
//! aggregate, missing versions, duplicate ids and versions out of order: with
//! transactions, a topic must hold every message exactly once, in order.
//!
//! They run against noida-db's Kafka (`FERRY_TEST_KAFKA_TXN_BROKERS`): Tansu hands aborted
//! records to read_committed consumers, and every test here can abort a transaction (a
//! relay killed, paused or handing a partition over mid-batch); a share test on Tansu saw
//! such records as duplicates.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use uuid::Uuid;

use common::{
    FAST_RELAY, PgScenario, Report, kafka_sink_section, kill_nine_repeatedly, outbox_section,
    pg_store_section, read_kafka_topic, unique_tag,
};
use ferry::kafka::KafkaSinkConfig;
use ferry_core::testing::services;

/// A PostgreSQL outbox relayed to Kafka; the producers write aggregate type `account`.
struct PgKafka {
    pg: PgScenario,
    brokers: String,
}

impl PgKafka {
    async fn new(partitions: u32, brokers: String) -> Self {
        Self::with_relay(partitions, brokers, FAST_RELAY).await
    }

    async fn with_relay(partitions: u32, brokers: String, relay: &str) -> Self {
        Self::with_sections(partitions, brokers, relay, "").await
    }

    async fn with_sections(partitions: u32, brokers: String, relay: &str, outbox: &str) -> Self {
        let tag = unique_tag();
        let pg = PgScenario::from_sections(
            &tag,
            &[
                &pg_store_section(),
                &outbox_section(&tag, partitions, outbox),
                &kafka_sink_section(&tag, &brokers),
                relay,
            ],
        )
        .await;
        Self { pg, brokers }
    }

    fn sink_config(&self) -> KafkaSinkConfig {
        KafkaSinkConfig {
            brokers: self.brokers.clone(),
            timeout_secs: 30,
            ..KafkaSinkConfig::default()
        }
    }

    fn topic(&self) -> String {
        format!("e{}.account", self.pg.scenario.tag)
    }

    /// Reads the topic in read_committed, up to its end, and checks it against `produced`.
    async fn check_topic(&self, produced: &HashSet<Uuid>) -> Report {
        self.check(&self.topic(), produced).await
    }

    /// Reads `topic` in read_committed, up to its end, and checks it against `produced`.
    async fn check(&self, topic: &str, produced: &HashSet<Uuid>) -> Report {
        let received = read_kafka_topic(&self.sink_config(), topic).await;
        Report::of(received, produced)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_at_random_points_leaves_each_message_once_in_the_topic() {
    let e2e = PgKafka::new(8, services::kafka_txn_brokers()).await;
    let producing = e2e.pg.produce(200, 60, 4);
    let (relay, mut logs) = kill_nine_repeatedly(&e2e.pg.scenario, 6).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 12_000);
    e2e.pg.scenario.wait_drained(Duration::from_secs(180)).await;
    e2e.check_topic(&produced)
        .await
        .assert_perfect(produced.len());
    logs.push_str(&relay.logs());
    assert!(
        logs.contains("Unclean") && logs.contains("kafka tail scanned"),
        "restarted relays should have reconciled partitions taken from killed ones:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_share_partitions_and_the_topic_gets_everything_once_in_order() {
    let e2e = PgKafka::new(8, services::kafka_txn_brokers()).await;
    let a = e2e.pg.scenario.relay("relay-a");
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let producing = e2e.pg.produce(50, 40, 2);
    let b = e2e.pg.scenario.relay("relay-b");
    e2e.pg.scenario.wait_for_shares(2, 4).await;
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let produced = producing.await.unwrap();
    e2e.pg.scenario.wait_drained(Duration::from_secs(60)).await;
    e2e.check_topic(&produced)
        .await
        .assert_perfect(produced.len());
    assert!(a.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_zombie_relay_is_fenced_and_nothing_it_sent_after_the_takeover_shows() {
    let e2e = PgKafka::new(8, services::kafka_txn_brokers()).await;
    let a = e2e.pg.scenario.relay("relay-a");
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let producing = e2e.pg.produce(100, 60, 2);
    let a_id = e2e.pg.scenario.owners()[0].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    let b = e2e.pg.scenario.relay("relay-b");
    // b takes every partition once a's 2 s leases have run out, and publishes a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !e2e
        .pg
        .scenario
        .owners()
        .iter()
        .all(|owner| owner.is_some() && *owner != a_id)
    {
        assert!(
            Instant::now() < deadline,
            "b never took a's partitions over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    e2e.pg.scenario.wait_drained(Duration::from_secs(120)).await;
    // a's open transactions were aborted by b's init_transactions and whatever a commits
    // after resuming is refused: a re-send of the same messages by b would otherwise show
    // up as duplicates here.
    e2e.check_topic(&produced)
        .await
        .assert_perfect(produced.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = a.logs();
    assert!(
        common::found_a_lease_gone(&logs) || logs.contains("fenced"),
        "the resumed relay should have found its partitions gone:\n{logs}"
    );
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
}

/// A noida-db Kafka broker of the test's own, on a free port, with its data kept in a
/// directory across restarts.
struct OwnBroker {
    executable: PathBuf,
    data: PathBuf,
    port: u16,
    process: Option<Child>,
}

impl OwnBroker {
    fn new(dir: &Path) -> Self {
        let executable = services::noida_db();
        assert!(
            executable.exists(),
            "{} is missing: run scripts/services.sh",
            executable.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            executable,
            data: dir.join("broker"),
            port,
            process: None,
        }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let child = Command::new(&self.executable)
            .args(["start", "--only", "kafka", "--kafka-port"])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(&self.data)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the test broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker the way Ctrl-C does (it saves its data), and waits for it.
    fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let group = Pid::from_raw(child.id() as i32);
            let _ = killpg(group, Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = killpg(group, Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The broker is down when the relay starts, and stopped again mid-run (between two waves
/// of messages, while the relay runs) and restarted after a second wave was committed.
/// noida-db restores its records but forgets its producers, so every partition's producer
/// fails and is replaced, and each partition is reconciled. The broker is not stopped in
/// the middle of a transaction: noida-db then keeps the open transaction's records but
/// forgets the transaction, which stays open for ever and holds read_committed readers of
/// that Kafka partition back (seen here: the last stable offset did not move in minutes).
/// A Kafka broker keeps transaction state across restarts and aborts such a transaction
/// after `transaction.timeout.ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_and_restarted_mid_run_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let mut broker = OwnBroker::new(work.path());
    // Every partition is taken up again and reconciled after the restart: leases long
    // enough for that on a loaded machine.
    let relay_section = FAST_RELAY.replace("lease_ttl_secs = 2", "lease_ttl_secs = 6");
    let e2e = PgKafka::with_relay(4, broker.brokers(), &relay_section).await;
    let relay = e2e.pg.scenario.relay("relay");
    let mut produced = e2e.pg.produce(40, 25, 2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !relay.logs().contains("not ready") {
        assert!(
            Instant::now() < deadline,
            "the relay should say it waits for the broker:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.start();
    e2e.pg.scenario.wait_drained(Duration::from_secs(60)).await;
    broker.stop();
    produced.extend(e2e.pg.produce(40, 25, 2).await.unwrap());
    // librdkafka rides out a short outage within `timeout_secs` (10 s) by itself: the
    // broker stays down until a publish has failed, so the restart is met mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let interrupted = |logs: &str| {
        logs.contains("publish failed") || logs.contains("the sink fenced this partition")
    };
    while !interrupted(&relay.logs()) {
        assert!(
            Instant::now() < deadline,
            "a publish should fail while the broker is down:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.start();
    let deadline = Instant::now() + Duration::from_secs(180);
    while e2e.pg.scenario.backlog() > 0 {
        if Instant::now() > deadline {
            let logs = relay.logs();
            let ferry_lines: Vec<&str> = logs
                .lines()
                .filter(|line| !line.contains("rdkafka"))
                .collect();
            let tail = &ferry_lines[ferry_lines.len().saturating_sub(60)..];
            panic!(
                "not drained after the broker's restart ({} left):\n{}",
                e2e.pg.scenario.backlog(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let report = e2e.check_topic(&produced).await;
    report.assert_perfect(produced.len());
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

/// A replay into a second topic while the live relay runs: the replay's transactional
/// producers have ids of their own, so the relay is never fenced and keeps publishing; the
/// replay topic holds the retained messages once each, in order, committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_beside_a_live_relay_never_fences_it() {
    let e2e = PgKafka::with_sections(
        4,
        services::kafka_txn_brokers(),
        FAST_RELAY,
        "retention_secs = 3600",
    )
    .await;
    let scenario = &e2e.pg.scenario;
    let relay = scenario.relay("relay");
    let first = e2e.pg.produce(20, 10, 2).await.unwrap();
    scenario.wait_drained(Duration::from_secs(120)).await;

    let replay_topic = format!("r{}.account", scenario.tag);
    let sink = scenario.dir.path().join("replay-sink.toml");
    std::fs::write(
        &sink,
        kafka_sink_section(&scenario.tag, &e2e.brokers)
            .replace("topic_template = \"e", "topic_template = \"r"),
    )
    .unwrap();
    let replaying = e2e.pg.produce(20, 10, 2);
    let output = Command::new(common::ferry_bin())
        .args(["replay", "--name", "into-r", "--all", "--config"])
        .arg(&scenario.config)
        .arg("--sink-config")
        .arg(&sink)
        .current_dir(scenario.dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    let second = replaying.await.unwrap();
    scenario.wait_drained(Duration::from_secs(120)).await;

    let replayed = e2e.check(&replay_topic, &first).await;
    assert!(
        replayed.received >= 200
            && replayed.missing == 0
            && replayed.duplicates == 0
            && replayed.out_of_order == 0,
        "the replay topic holds every message retained when it started, once, in order: {replayed:?}\n{text}"
    );
    let all: HashSet<Uuid> = first.union(&second).copied().collect();
    e2e.check_topic(&all).await.assert_perfect(400);
    assert!(
        !relay.logs().contains("the sink fenced this partition"),
        "the live relay was fenced:\n{}",
        relay.logs()
    );
}
