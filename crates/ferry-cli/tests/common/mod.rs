//! The end-to-end harness every store and sink shares: an isolated scenario (its own
//! config file and names), real `ferry` processes, and the per-aggregate consistency check
//! that a consumer of any broker runs on what it received.
//!
//! Each `end_to_end*.rs` binary includes this module and uses part of it.
#![allow(dead_code, unreachable_pub)]

pub mod browser;
pub mod health;
pub mod log_capture;
pub mod scenarios;
pub mod service;
pub mod sinks;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

use ferry::postgres::PgOutbox;
use ferry::redis_store::{RedisOutbox, RedisWrites};
use ferry::sql::{Dialect, SqlOutbox, StoreSettings, TablePrefix};
use ferry::{NewMessage, ReceivedMessage};
use ferry_core::testing::services;

pub fn ferry_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A short random tag that keeps a scenario's tables, streams and topics apart from
/// every other test's.
pub fn unique_tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// A port free now, for a server of the test's own started right after.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a server of the test's own (`what`) accepts connections on `port`.
pub async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Relay settings that make takeovers quick: 2 s leases, fast polls and retries.
pub const FAST_RELAY: &str = r#"
[relay]
batch_size = 200
lease_ttl_secs = 2
poll_interval_ms = 200
retry_initial_ms = 50
retry_max_ms = 1000
shutdown_timeout_secs = 5
"#;

/// `[store]` for the test PostgreSQL.
pub fn pg_store_section() -> String {
    format!(
        "[store]\ntype = \"postgres\"\nurl = \"{}\"\n",
        services::postgres_url()
    )
}

/// `[outbox]` with the scenario's own table prefix.
pub fn outbox_section(tag: &str, partitions: u32, extra: &str) -> String {
    format!("[outbox]\ntable_prefix = \"e{tag}_\"\npartitions = {partitions}\n{extra}\n")
}

/// `[sink]` for the test NATS, into stream `E2E_<tag>` with subjects `e<tag>.>`.
pub fn nats_sink_section(tag: &str, duplicate_window_secs: u64) -> String {
    format!(
        r#"[sink]
type = "nats"
url = "{nats}"
stream = "{stream}"
subjects = ["e{tag}.>"]
subject_template = "e{tag}.{{aggregate_type}}.{{event_type}}"
duplicate_window_secs = {duplicate_window_secs}
"#,
        nats = services::nats_url(),
        stream = nats_stream(tag),
    )
}

pub fn nats_stream(tag: &str) -> String {
    format!("E2E_{tag}")
}

/// `[sink]` for Kafka at `brokers`, into topics `e<tag>.<aggregate_type>` with
/// transactional ids `e<tag>-p<N>`.
pub fn kafka_sink_section(tag: &str, brokers: &str) -> String {
    format!(
        r#"[sink]
type = "kafka"
brokers = "{brokers}"
topic_template = "e{tag}.{{aggregate_type}}"
transactional_id_prefix = "e{tag}"
topic_partitions = 4
timeout_secs = 10
transaction_timeout_secs = 10
reconcile_margin_secs = 5
"#
    )
}

/// One isolated scenario: a temporary directory with its `ferry.toml`, migrated.
pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub tag: String,
}

impl Scenario {
    /// Writes `ferry.toml` from whole TOML sections and runs `ferry migrate` on it.
    pub fn new(tag: &str, sections: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.toml");
        std::fs::write(&config, sections.join("\n")).unwrap();
        let scenario = Self {
            dir,
            config,
            tag: tag.to_owned(),
        };
        let output = scenario.ferry(&["migrate"]);
        assert!(
            output.status.success(),
            "ferry migrate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        scenario
    }

    /// Runs `ferry <args> --config <this scenario's file>` to completion.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// Starts `ferry relay` on this scenario's config, logging to `<name>.log`.
    pub fn relay(&self, name: &str) -> Relay {
        self.relay_with_config(name, &self.config)
    }

    /// Starts `ferry relay` on another config file (e.g. a variant of this one).
    pub fn relay_with_config(&self, name: &str, config: &Path) -> Relay {
        self.spawn("relay", name, config, "info")
    }

    /// Starts `ferry <subcommand> --config <config>` with `FERRY_LOG=<log_level>`,
    /// logging to `<name>.log`.
    pub fn spawn(&self, subcommand: &str, name: &str, config: &Path, log_level: &str) -> Relay {
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(ferry_bin())
            .args([subcommand, "--config"])
            .arg(config)
            .env("FERRY_LOG", log_level)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Relay { child, log }
    }

    /// Writes a variant of this scenario's config with `from` replaced by `to`.
    pub fn config_variant(&self, name: &str, from: &str, to: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace(from, to);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The log of relay `name`, started earlier in this scenario.
    pub fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `ferry status --json`: one object per partition.
    pub fn status(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.status_report()["partitions"].take()).unwrap()
    }

    /// The whole of `ferry status --json`: `partitions`, and `capture` (null in poll mode).
    pub fn status_report(&self) -> serde_json::Value {
        let output = self.ferry(&["status", "--json"]);
        assert!(
            output.status.success(),
            "ferry status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Unpublished messages over all partitions.
    pub fn backlog(&self) -> u64 {
        self.status()
            .iter()
            .map(|p| p["backlog"].as_u64().unwrap())
            .sum()
    }

    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let backlog = self.backlog();
            if backlog == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox not drained in {timeout:?}: {backlog} left"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The owner of each partition.
    pub fn owners(&self) -> Vec<Option<String>> {
        self.status()
            .iter()
            .map(|p| p["owner"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until every partition is owned and each of `relays` holds exactly `share`.
    pub async fn wait_for_shares(&self, relays: usize, share: usize) -> Vec<Option<String>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let owners = self.owners();
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

    /// Waits until `partition` reports a blocked reason in `ferry status`, and returns it.
    pub async fn wait_blocked(&self, partition: usize, relay: &Relay) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(reason) = self.status()[partition]["blocked_reason"].as_str() {
                return reason.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "partition {partition} never reported blocked:\n{}",
                relay.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A running `ferry` process (`relay`, `serve`); killed when dropped.
pub struct Relay {
    child: Child,
    log: PathBuf,
}

impl Relay {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The local ports of the relay's TCP connections to `server_port` on this host (read
    /// from /proc: its socket descriptors, matched with the kernel's TCP table), so a test
    /// can have the server end exactly these connections.
    pub fn ports_to(&self, server_port: u16) -> Vec<u16> {
        let pid = self.child.id();
        let sockets: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .collect();
        let port_of =
            |address: &str| u16::from_str_radix(address.rsplit_once(':').unwrap().1, 16).unwrap();
        let mut ports = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if port_of(fields[2]) == server_port && sockets.contains(fields[9]) {
                    ports.push(port_of(fields[1]));
                }
            }
        }
        ports
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    pub fn kill_nine(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
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

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the relay has logged `needle` (a busy box may take seconds to start it).
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the relay did not log {needle:?} within {timeout:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the relay `rounds` times at random moments while messages flow, starting a new
/// one each time; returns the last relay and the logs of all the earlier ones.
pub async fn kill_nine_repeatedly(scenario: &Scenario, rounds: usize) -> (Relay, String) {
    let mut relay = scenario.relay("relay-0");
    let mut logs = String::new();
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_millis(rand::random_range(400..1500))).await;
        relay.kill_nine();
        logs.push_str(&scenario.logs(&format!("relay-{}", round - 1)));
        relay = scenario.relay(&format!("relay-{round}"));
    }
    (relay, logs)
}

/// What a consumer received, checked per aggregate against what was produced.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// Messages the consumer saw, repeats included.
    pub received: usize,
    /// Repeats of an id already seen.
    pub duplicates: usize,
    /// Produced messages never seen.
    pub missing: usize,
    /// Messages whose version is not above the previous one of their aggregate.
    pub out_of_order: usize,
    /// Versions skipped in an aggregate's sequence.
    pub gaps: usize,
    /// What an inbox applies (new id, version above the last applied): versions it would
    /// apply out of sequence, i.e. effects lost or reordered despite deduplication.
    pub inbox_gaps: usize,
    /// Produced messages an inbox would never apply.
    pub inbox_missing: usize,
}

impl Report {
    /// Checks `received`, in arrival order, against the ids in `produced`.
    pub fn of(
        received: impl IntoIterator<Item = ReceivedMessage>,
        produced: &HashSet<Uuid>,
    ) -> Self {
        let mut report = Self::default();
        let mut seen = HashSet::new();
        let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut applied_ids = HashSet::new();
        let mut last_applied: HashMap<String, u64> = HashMap::new();
        for message in received {
            report.received += 1;
            if !seen.insert(message.id) {
                report.duplicates += 1;
            }
            versions
                .entry(message.aggregate_id.clone())
                .or_default()
                .push(message.version);
            let last = last_applied.entry(message.aggregate_id).or_default();
            if message.version > *last && applied_ids.insert(message.id) {
                if message.version != *last + 1 {
                    report.inbox_gaps += 1;
                }
                *last = message.version;
            }
        }
        report.missing = produced.difference(&seen).count();
        report.inbox_missing = produced.difference(&applied_ids).count();
        for vs in versions.values() {
            report.out_of_order += vs.windows(2).filter(|w| w[1] <= w[0]).count();
            let distinct: BTreeSet<u64> = vs.iter().copied().collect();
            let max = distinct.iter().next_back().copied().unwrap_or(0);
            report.gaps += (max as usize).saturating_sub(distinct.len());
        }
        report
    }

    /// The broker holds every message exactly once, in order per aggregate.
    pub fn assert_perfect(&self, produced: usize) {
        assert_eq!(
            (self.missing, self.duplicates, self.out_of_order, self.gaps),
            (0, 0, 0, 0),
            "consistency check failed: {self:?} (produced {produced})"
        );
        assert_eq!(self.received, produced, "{self:?}");
    }

    /// Redeliveries allowed, but an inbox applies every message once, in order, no gap.
    pub fn assert_perfect_after_inbox(&self) {
        assert_eq!(
            (self.missing, self.inbox_missing, self.inbox_gaps),
            (0, 0, 0),
            "consistency check after the inbox failed: {self:?}"
        );
    }
}

/// A scenario whose PostgreSQL outbox is relayed to `sink` (a whole `[sink]` section),
/// with [`FAST_RELAY`] settings, and a producer on that outbox.
pub struct PgScenario {
    pub scenario: Scenario,
    pub outbox: PgOutbox,
}

impl PgScenario {
    pub async fn new(tag: &str, partitions: u32, sink: &str, extra_outbox: &str) -> Self {
        Self::from_sections(
            tag,
            &[
                &pg_store_section(),
                &outbox_section(tag, partitions, extra_outbox),
                sink,
                FAST_RELAY,
            ],
        )
        .await
    }

    /// A scenario from whole config sections, the first of them [`pg_store_section`].
    pub async fn from_sections(tag: &str, sections: &[&str]) -> Self {
        let scenario = Scenario::new(tag, sections);
        let outbox = pg_outbox(tag).await;
        Self { scenario, outbox }
    }

    /// [`produce_pg`] on this scenario's outbox, in a task of its own.
    pub fn produce(
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
}

/// Whether a relay's logs say it found a lease of its gone (at renewal, at a fenced mark,
/// or when its worker looked), as a relay resumed after a takeover must.
pub fn found_a_lease_gone(logs: &str) -> bool {
    ["lease lost", "lease taken over", "lease no longer held"]
        .iter()
        .any(|gone| logs.contains(gone))
}

/// Connects to the test PostgreSQL as the outbox of `scenario` (table prefix `e<tag>_`).
pub async fn pg_outbox(tag: &str) -> PgOutbox {
    pg_outbox_at(&services::postgres_url(), tag).await
}

/// [`pg_outbox`] on the PostgreSQL server at `url`.
pub async fn pg_outbox_at(url: &str, tag: &str) -> PgOutbox {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(format!("e{tag}_")).unwrap(),
        max_payload_bytes: 4 * 1024 * 1024,
        ..StoreSettings::default()
    };
    PgOutbox::connect(url, 4, settings).await.unwrap()
}

/// An outbox that producers write through, whatever the store.
pub trait Producer: Clone + Send + Sync + 'static {
    /// Enqueues `messages` in one transaction, commits, and returns their ids.
    fn commit(&self, messages: Vec<NewMessage>) -> impl Future<Output = Vec<Uuid>> + Send;
}

/// Producers on a SQL store. In the scenarios each producer's aggregates are its own, so
/// no transaction waits on another's version lock (and InnoDB has no deadlock to resolve).
impl<D: Dialect> Producer for SqlOutbox<D> {
    async fn commit(&self, messages: Vec<NewMessage>) -> Vec<Uuid> {
        let mut tx = self.begin_write().await.unwrap();
        let mut ids = Vec::with_capacity(messages.len());
        for message in messages {
            ids.push(self.enqueue(&mut tx, message).await.unwrap().id);
        }
        tx.commit().await.unwrap();
        ids
    }
}

/// Producers on Redis: one script call enqueues a transaction's messages atomically.
impl Producer for RedisOutbox {
    async fn commit(&self, messages: Vec<NewMessage>) -> Vec<Uuid> {
        let enqueued = self
            .enqueue_all(&RedisWrites::new(), messages)
            .await
            .unwrap();
        enqueued.into_iter().map(|e| e.id).collect()
    }
}

/// Enqueues `per_aggregate` events for each of `aggregates` aggregates, ten aggregates per
/// transaction, from `producers` concurrent producers with aggregates of their own;
/// returns the ids.
pub async fn produce(
    outbox: impl Producer,
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
                    let messages = chunk
                        .iter()
                        .map(|a| {
                            NewMessage::new(
                                "account",
                                a.to_string(),
                                "account.changed",
                                format!(r#"{{"round":{round}}}"#),
                            )
                        })
                        .collect();
                    ids.extend(outbox.commit(messages).await);
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

/// [`produce`] into a PostgreSQL outbox.
pub async fn produce_pg(
    outbox: PgOutbox,
    aggregates: usize,
    per_aggregate: usize,
    producers: usize,
) -> HashSet<Uuid> {
    produce(outbox, aggregates, per_aggregate, producers).await
}

/// Everything in Kafka topic `topic` up to its end, read in read_committed from the
/// brokers of `config` (and over its TLS, if any).
#[cfg(feature = "kafka")]
pub async fn read_kafka_topic(
    config: &ferry::kafka::KafkaSinkConfig,
    topic: &str,
) -> Vec<ReceivedMessage> {
    let reader = ferry::kafka::CommittedReader::open(config, &[topic.to_owned()])
        .await
        .unwrap();
    let ends = reader.ends().await.unwrap();
    let mut received = Vec::new();
    reader
        .read_to(&ends, |record| received.push(record.message.unwrap()))
        .await
        .unwrap();
    reader.close().await;
    received
}

/// Everything in RabbitMQ queue `queue`, in delivery order, until nothing came for two
/// seconds (consumed without acks through `channel`).
pub async fn read_amqp_queue(
    channel: &ferry::amqp::lapin::Channel,
    queue: &str,
) -> Vec<ReceivedMessage> {
    use ferry::amqp::lapin::options::BasicConsumeOptions;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "ferry-e2e".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            ferry::amqp::lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        let delivery = delivery.unwrap();
        received.push(ferry::amqp::decode_delivery(&delivery.properties, &delivery.data).unwrap());
    }
    received
}

/// Reads NATS stream `stream` from its start, in order.
pub async fn read_nats_stream(stream: &str) -> Vec<ReceivedMessage> {
    let client = async_nats::connect(services::nats_url()).await.unwrap();
    read_nats_stream_with(client, stream).await
}

/// [`read_nats_stream`] through `client` (e.g. one over TLS).
pub async fn read_nats_stream_with(
    client: async_nats::Client,
    stream: &str,
) -> Vec<ReceivedMessage> {
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.unwrap();
    let total = stream.get_info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut received = Vec::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read timed out")
            .unwrap()
            .unwrap();
        received.push(ferry::nats::decode_message(&message).unwrap());
    }
    received
}

pub async fn delete_nats_stream(stream: &str) {
    let client = async_nats::connect(services::nats_url()).await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(stream)
        .await;
}
