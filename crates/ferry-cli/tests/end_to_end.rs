//! End-to-end guarantees with real `ferry relay` processes, the real PostgreSQL and the
//! real NATS JetStream: kill -9 at random points, a paused zombie relay, a blocked
//! partition, graceful shutdown. A checker reads the whole stream back and reports, per
//! aggregate, missing versions, duplicate ids and versions out of order.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

use ferry::postgres::PgOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{NewMessage, OutboxStore, ReceivedMessage};

fn pg_url() -> String {
    std::env::var("FERRY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn nats_url() -> String {
    std::env::var("FERRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// One isolated scenario: its own tables, stream, subjects and config file.
struct Scenario {
    dir: tempfile::TempDir,
    stream: String,
    outbox: PgOutbox,
    config: PathBuf,
}

impl Scenario {
    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
        let prefix = format!("e{tag}_");
        let stream = format!("E2E_{tag}");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[store]
type = "postgres"
url = "{pg}"

[outbox]
table_prefix = "{prefix}"
partitions = {partitions}
{extra_outbox}

[sink]
type = "nats"
url = "{nats}"
stream = "{stream}"
subjects = ["e{tag}.>"]
subject_template = "e{tag}.{{aggregate_type}}.{{event_type}}"
duplicate_window_secs = {duplicate_window_secs}

[relay]
batch_size = 200
lease_ttl_secs = 2
poll_interval_ms = 200
retry_initial_ms = 50
retry_max_ms = 1000
shutdown_timeout_secs = 5
"#,
                pg = pg_url(),
                nats = nats_url(),
            ),
        )
        .unwrap();
        let status = Command::new(ferry_bin())
            .args(["migrate", "--config"])
            .arg(&config)
            .status()
            .unwrap();
        assert!(status.success(), "ferry migrate failed");
        let settings = StoreSettings {
            table_prefix: TablePrefix::new(prefix.clone()).unwrap(),
            max_payload_bytes: 4 * 1024 * 1024,
            ..StoreSettings::default()
        };
        let outbox = PgOutbox::connect(&pg_url(), 4, settings).await.unwrap();
        Self {
            dir,
            stream,
            outbox,
            config,
        }
    }

    fn relay(&self, name: &str) -> Relay {
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(ferry_bin())
            .args(["relay", "--config"])
            .arg(&self.config)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Relay { child, log }
    }

    fn produce(
        &self,
        aggregates: usize,
        per_aggregate: usize,
        producers: usize,
    ) -> tokio::task::JoinHandle<HashSet<Uuid>> {
        tokio::spawn(produce(
            self.outbox.clone(),
            aggregates,
            per_aggregate,
            producers,
        ))
    }

    async fn backlog(&self) -> u64 {
        self.outbox
            .status()
            .await
            .unwrap()
            .iter()
            .map(|p| p.backlog)
            .sum()
    }

    async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.backlog().await > 0 {
            assert!(
                Instant::now() < deadline,
                "outbox not drained in {timeout:?}: {} left",
                self.backlog().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads the stream from the start and checks it against `produced`.
    async fn check_stream(&self, produced: &HashSet<Uuid>) -> Report {
        let client = async_nats::connect(nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(&self.stream).await.unwrap();
        let total = stream.get_info().await.unwrap().state.messages;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut report = Report::default();
        let mut seen = HashSet::new();
        let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..total {
            let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("stream read timed out")
                .unwrap()
                .unwrap();
            let headers = message.headers.clone().unwrap_or_default();
            let pairs: Vec<(String, String)> = headers
                .iter()
                .flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (k.to_string(), v.as_str().to_owned()))
                })
                .collect();
            let received = ReceivedMessage::from_binary(
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                message.payload.clone(),
            )
            .unwrap();
            if !seen.insert(received.id) {
                report.duplicates += 1;
            }
            versions
                .entry(received.aggregate_id.clone())
                .or_default()
                .push(received.version);
        }
        report.missing = produced.difference(&seen).count();
        for (_, vs) in versions {
            report.out_of_order += vs.windows(2).filter(|w| w[1] <= w[0]).count();
            let distinct: std::collections::BTreeSet<u64> = vs.iter().copied().collect();
            let max = distinct.iter().next_back().copied().unwrap_or(0);
            report.gaps += (max as usize).saturating_sub(distinct.len());
        }
        report.received = total as usize;
        report
    }

    async fn cleanup(self) {
        let client = async_nats::connect(nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(&self.stream).await;
    }
}

#[derive(Debug, Default, PartialEq)]
struct Report {
    received: usize,
    missing: usize,
    duplicates: usize,
    out_of_order: usize,
    gaps: usize,
}

impl Report {
    fn assert_perfect(&self, produced: usize) {
        assert_eq!(
            (self.missing, self.duplicates, self.out_of_order, self.gaps),
            (0, 0, 0, 0),
            "consistency check failed: {self:?} (produced {produced})"
        );
        assert_eq!(self.received, produced, "{self:?}");
    }
}

struct Relay {
    child: Child,
    log: PathBuf,
}

impl Relay {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    fn kill_nine(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not stop within {within:?} of SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enqueues `per_aggregate` events for each of `aggregates` aggregates, ten aggregates per
/// transaction, from `producers` concurrent producers; returns the ids.
async fn produce(
    outbox: PgOutbox,
    aggregates: usize,
    per_aggregate: usize,
    producers: usize,
) -> HashSet<Uuid> {
    let mut tasks = Vec::new();
    for p in 0..producers {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mine: Vec<usize> = (0..aggregates).filter(|a| a % producers == p).collect();
            for round in 0..per_aggregate {
                for chunk in mine.chunks(10) {
                    let mut tx = outbox.pool().begin().await.unwrap();
                    for a in chunk {
                        let message = NewMessage::new(
                            "account",
                            a.to_string(),
                            "account.changed",
                            format!(r#"{{"round":{round}}}"#),
                        );
                        ids.push(outbox.enqueue(&mut tx, message).await.unwrap().id);
                    }
                    tx.commit().await.unwrap();
                }
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn ferry_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_at_random_points_loses_and_duplicates_nothing() {
    // A 1 s duplicate window is shorter than every takeover here (lease TTL 2 s): only
    // reconciliation by message id keeps re-sends out of the stream.
    let scenario = Scenario::new(8, 1, "").await;
    let producing = scenario.produce(200, 110, 4);
    let mut relay = scenario.relay("relay-0");
    let mut takeover_logs = String::new();
    for round in 1..=6 {
        let wait = Duration::from_millis(rand::random_range(400..1500));
        tokio::time::sleep(wait).await;
        relay.kill_nine();
        if round > 1 {
            takeover_logs.push_str(
                &std::fs::read_to_string(
                    scenario.dir.path().join(format!("relay-{}.log", round - 1)),
                )
                .unwrap_or_default(),
            );
        }
        relay = scenario.relay(&format!("relay-{round}"));
    }
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 22_000);
    scenario.wait_drained(Duration::from_secs(180)).await;
    let report = scenario.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    takeover_logs.push_str(&relay.logs());
    assert!(
        takeover_logs.contains("Unclean"),
        "restarted relays should have taken partitions over from killed ones:\n{takeover_logs}"
    );
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success());
    scenario.cleanup().await;
}

/// Owners of each partition per `ferry status --json`.
fn owners(config: &Path) -> Vec<Option<String>> {
    let output = Command::new(ferry_bin())
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    status
        .iter()
        .map(|p| p["owner"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until every partition is owned and each relay holds exactly `share` of them.
async fn wait_for_shares(config: &Path, relays: usize, share: usize) -> Vec<Option<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let owners = owners(config);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for owner in owners.iter().flatten() {
            *counts.entry(owner).or_default() += 1;
        }
        if owners.iter().all(Option::is_some)
            && counts.len() == relays
            && counts.values().all(|&c| c == share)
        {
            return owners;
        }
        assert!(
            Instant::now() < deadline,
            "no fair share of {share} per relay: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_share_partitions_fairly_and_rebalance_when_one_joins_or_leaves() {
    let scenario = Scenario::new(8, 120, "").await;
    let a = scenario.relay("relay-a");
    wait_for_shares(&scenario.config, 1, 8).await;
    let producing = scenario.produce(50, 40, 2);
    let b = scenario.relay("relay-b");
    wait_for_shares(&scenario.config, 2, 4).await;
    assert!(b.terminate(Duration::from_secs(15)).success());
    wait_for_shares(&scenario.config, 1, 8).await;
    let produced = producing.await.unwrap();
    scenario.wait_drained(Duration::from_secs(60)).await;
    scenario
        .check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    assert!(a.terminate(Duration::from_secs(15)).success());
    scenario.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_zombie_relay_is_fenced_and_order_holds() {
    let scenario = Scenario::new(8, 120, "").await;
    let a = scenario.relay("relay-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = scenario.relay("relay-b");
    let producing = scenario.produce(100, 60, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    // Well past the 2 s lease: b takes a's partitions over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    scenario.wait_drained(Duration::from_secs(120)).await;
    let report = scenario.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = a.logs();
    assert!(
        logs.contains("lease lost") || logs.contains("lease taken over"),
        "the resumed relay should have found its leases gone:\n{logs}"
    );
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    scenario.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_releases_leases_and_exits_cleanly() {
    let scenario = Scenario::new(4, 120, "").await;
    let relay = scenario.relay("relay");
    let produced = scenario.produce(20, 10, 1).await.unwrap();
    scenario.wait_drained(Duration::from_secs(60)).await;
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let owners: Vec<_> = scenario
        .outbox
        .status()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.owner)
        .collect();
    assert!(
        owners.is_empty(),
        "leases still held after shutdown: {owners:?}"
    );
    scenario
        .check_stream(&produced)
        .await
        .assert_perfect(produced.len());
    scenario.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_rejects_blocks_its_partition_visibly() {
    // The outbox accepts 2 MiB; NATS's default max_payload is 1 MiB.
    let scenario = Scenario::new(1, 120, "max_payload_bytes = 2097152").await;
    let mut tx = scenario.outbox.pool().begin().await.unwrap();
    let big = scenario
        .outbox
        .enqueue(
            &mut tx,
            NewMessage::new("blob", "1", "blob.stored", vec![b'x'; 1_500_000]),
        )
        .await
        .unwrap();
    scenario
        .outbox
        .enqueue(&mut tx, NewMessage::new("blob", "2", "blob.stored", "{}"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = scenario.relay("relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    let blocked = loop {
        let output = Command::new(ferry_bin())
            .args(["status", "--json", "--config"])
            .arg(&scenario.config)
            .output()
            .unwrap();
        assert!(output.status.success());
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if let Some(reason) = status[0]["blocked_reason"].as_str() {
            break reason.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "partition never reported blocked:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(blocked.contains(&big.id.to_string()), "{blocked}");
    assert_eq!(
        scenario.backlog().await,
        2,
        "nothing after the rejected message is sent or marked"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    scenario.cleanup().await;
}

/// Runs a relay whose config has `from` replaced by the unreachable `to`: it must keep
/// running, log that it is waiting (naming `expected`), and stop cleanly on SIGTERM.
async fn assert_relay_waits(scenario: &Scenario, from: &str, to: &str, expected: &str) {
    let text = std::fs::read_to_string(&scenario.config)
        .unwrap()
        .replace(from, to);
    let config = scenario
        .dir
        .path()
        .join(format!("unreachable-{expected}.toml"));
    std::fs::write(&config, text).unwrap();
    let log = scenario
        .dir
        .path()
        .join(format!("unreachable-{expected}.log"));
    let child = Command::new(ferry_bin())
        .args(["relay", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let relay = Relay { child, log };
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
    let scenario = Scenario::new(2, 120, "").await;
    assert_relay_waits(&scenario, &nats_url(), "nats://127.0.0.1:4299", "4299").await;
    assert_relay_waits(&scenario, "127.0.0.1:5432", "127.0.0.1:1", "PostgreSQL").await;

    let bad = scenario.dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\ntype = \"postgres\"\nurl = \"postgres://x@127.0.0.1/x\"\n[sink]\ntype = \"stdout\"\n[relay]\nbatch_sise = 10\n").unwrap();
    let output = Command::new(ferry_bin())
        .args(["relay", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("batch_sise"), "{stderr}");
    scenario.cleanup().await;
}

#[test]
fn demo_runs_on_embedded_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(ferry_bin())
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
