//! End-to-end guarantees with leases outside the outbox store: real `ferry relay`
//! processes on the real PostgreSQL and NATS JetStream, with leases in the real Redis
//! (`FERRY_TEST_REDIS_URL`) or etcd (`FERRY_TEST_ETCD_URL`, feature `etcd-lease`). Every
//! scenario runs once per backend (`redis::…`, `etcd::…`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use uuid::Uuid;

use common::{
    FAST_RELAY, PgScenario, Report, delete_nats_stream, kill_nine_repeatedly, nats_sink_section,
    nats_stream, outbox_section, pg_store_section, read_nats_stream, unique_tag,
};
use ferry_core::testing::services;

/// The lease TTL of `FAST_RELAY`.
const LEASE_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Backend {
    Redis,
    #[cfg(feature = "etcd-lease")]
    Etcd,
}

impl Backend {
    /// The backend's address as it appears in the `[leases]` section.
    fn address(self) -> String {
        match self {
            Self::Redis => services::redis_url(),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => services::etcd_url(),
        }
    }

    /// The same address on a port where nothing listens.
    fn unreachable_address(self) -> String {
        match self {
            Self::Redis => "redis://127.0.0.1:1".into(),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => "http://127.0.0.1:1".into(),
        }
    }

    fn leases_section(self, tag: &str) -> String {
        match self {
            Self::Redis => format!(
                "[leases]\ntype = \"redis\"\nurl = \"{}\"\nkey_prefix = \"e{tag}:\"\n",
                self.address()
            ),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => format!(
                "[leases]\ntype = \"etcd\"\nendpoints = [\"{}\"]\nkey_prefix = \"e{tag}/\"\n",
                self.address()
            ),
        }
    }
}

/// A PostgreSQL outbox relayed to a NATS stream, with leases in `backend`.
struct Leased {
    pg: PgScenario,
}

impl Leased {
    async fn new(backend: Backend, partitions: u32, duplicate_window_secs: u64) -> Self {
        let tag = unique_tag();
        let pg = PgScenario::from_sections(
            &tag,
            &[
                &pg_store_section(),
                &outbox_section(&tag, partitions, ""),
                &nats_sink_section(&tag, duplicate_window_secs),
                FAST_RELAY,
                &backend.leases_section(&tag),
            ],
        )
        .await;
        Self { pg }
    }

    /// Drains the outbox, reads the stream back and checks it against `produced`.
    async fn assert_stream_perfect(&self, produced: &HashSet<Uuid>) {
        self.wait_drained().await;
        Report::of(
            read_nats_stream(&nats_stream(&self.pg.scenario.tag)).await,
            produced,
        )
        .assert_perfect(produced.len());
    }

    /// Waits for an empty outbox; on timeout, fails with every relay's log.
    async fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let backlog = self.pg.scenario.backlog();
            if backlog == 0 {
                return;
            }
            if Instant::now() > deadline {
                panic!("outbox not drained: {backlog} left\n{}", self.all_logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The logs of every relay of the scenario, for failure messages.
    fn all_logs(&self) -> String {
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.pg.scenario.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                logs.push_str(&format!("== {}\n", path.display()));
                logs.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        logs
    }

    async fn cleanup(self) {
        delete_nats_stream(&nats_stream(&self.pg.scenario.tag)).await;
    }
}

/// G5: relay a is paused (SIGSTOP) past its lease while b takes its partitions over and
/// the outbox adopts b's epochs; a resumes (SIGCONT) and finds itself fenced. The stream
/// holds every message once, in order per aggregate.
async fn a_paused_relay_is_fenced_after_the_takeover(backend: Backend) {
    let e2e = Leased::new(backend, 8, 120).await;
    let a = e2e.pg.scenario.relay("relay-a");
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let b = e2e.pg.scenario.relay("relay-b");
    let producing = e2e.pg.produce(100, 60, 2);
    e2e.pg.scenario.wait_for_shares(2, 4).await;
    a.signal(Signal::SIGSTOP);
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    tokio::time::sleep(LEASE_TTL).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    e2e.assert_stream_perfect(&produced).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = a.logs();
    assert!(
        common::found_a_lease_gone(&logs),
        "the resumed relay should have found its leases gone:\n{logs}"
    );
    assert!(
        e2e.pg.scenario.logs("relay-b").contains("lease adopted"),
        "b took partitions over uncleanly and had the outbox adopt them"
    );
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// Relay a is killed (-9) while b runs: b owns every partition once a's leases and its
/// heartbeat have run out (one lease TTL after a's last renewal) plus b's next lease round,
/// and nothing is lost or repeated. The bound leaves room for etcd's whole-second leases
/// and its half-second expiry sweep, `ferry status` polls and a loaded machine.
async fn failover_completes_within_the_lease_time(backend: Backend) {
    let e2e = Leased::new(backend, 8, 120).await;
    let a = e2e.pg.scenario.relay("relay-a");
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let b = e2e.pg.scenario.relay("relay-b");
    e2e.pg.scenario.wait_for_shares(2, 4).await;
    let producing = e2e.pg.produce(40, 50, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    a.kill_nine();
    e2e.pg.scenario.wait_for_shares(1, 8).await;
    let failover = killed.elapsed();
    eprintln!("{backend:?} leases: failover took {failover:?} (lease TTL {LEASE_TTL:?})");
    assert!(
        failover < LEASE_TTL * 3 + Duration::from_secs(2),
        "failover took {failover:?} with a {LEASE_TTL:?} lease"
    );
    let produced = producing.await.unwrap();
    e2e.assert_stream_perfect(&produced).await;
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// Three relays share six partitions two each; when one leaves, the others take three
/// each; when one joins again, two each; messages flow throughout.
async fn three_relays_share_fairly_and_rebalance(backend: Backend) {
    let e2e = Leased::new(backend, 6, 120).await;
    let a = e2e.pg.scenario.relay("relay-a");
    let b = e2e.pg.scenario.relay("relay-b");
    let c = e2e.pg.scenario.relay("relay-c");
    e2e.pg.scenario.wait_for_shares(3, 2).await;
    let producing = e2e.pg.produce(60, 40, 2);
    assert!(c.terminate(Duration::from_secs(15)).success());
    e2e.pg.scenario.wait_for_shares(2, 3).await;
    let d = e2e.pg.scenario.relay("relay-d");
    e2e.pg.scenario.wait_for_shares(3, 2).await;
    let produced = producing.await.unwrap();
    e2e.assert_stream_perfect(&produced).await;
    for relay in [a, b, d] {
        assert!(relay.terminate(Duration::from_secs(15)).success());
    }
    e2e.cleanup().await;
}

/// kill -9 at random points with a 1 s duplicate window: only reconciliation by id keeps
/// re-sends out of the stream. Then the last relay, which marked in every partition, is
/// killed with more messages waiting: its successor reconciles from the checkpoints the
/// outbox recorded on those marks (the lease backend cannot know them).
async fn kill_nine_reconciles_from_the_recorded_checkpoint(backend: Backend) {
    let e2e = Leased::new(backend, 8, 1).await;
    let producing = e2e.pg.produce(100, 60, 4);
    let (relay, _) = kill_nine_repeatedly(&e2e.pg.scenario, 4).await;
    let mut produced = producing.await.unwrap();
    e2e.wait_drained().await;
    relay.kill_nine();
    produced.extend(e2e.pg.produce(100, 20, 4).await.unwrap());
    let successor = e2e.pg.scenario.relay("successor");
    e2e.assert_stream_perfect(&produced).await;
    let logs = successor.logs();
    let from_checkpoint: HashSet<&str> = logs
        .lines()
        .filter(|line| {
            line.contains("reconciling from the checkpoint the outbox recorded")
                && line.contains("Some(")
        })
        .filter_map(|line| line.split_whitespace().find(|f| f.contains("partition")))
        .collect();
    assert_eq!(
        from_checkpoint.len(),
        8,
        "every partition's unclean takeover should reconcile from its recorded checkpoint:\n{logs}"
    );
    assert!(successor.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// A relay whose lease backend is unreachable waits, saying so, and stops on SIGTERM.
async fn an_unreachable_lease_backend_is_waited_for(backend: Backend) {
    let e2e = Leased::new(backend, 2, 120).await;
    let config = e2e.pg.scenario.config_variant(
        "unreachable",
        &backend.address(),
        &backend.unreachable_address(),
    );
    let relay = e2e.pg.scenario.relay_with_config("unreachable", &config);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = relay.logs();
        if logs.contains("not ready") && logs.contains("leases") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no word of the unreachable backend:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(relay.terminate(Duration::from_secs(10)).success());
    e2e.cleanup().await;
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Redis).await;
                }
            )*
        }
        #[cfg(feature = "etcd-lease")]
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Etcd).await;
                }
            )*
        }
    };
}

for_each_backend!(
    a_paused_relay_is_fenced_after_the_takeover,
    failover_completes_within_the_lease_time,
    three_relays_share_fairly_and_rebalance,
    kill_nine_reconciles_from_the_recorded_checkpoint,
    an_unreachable_lease_backend_is_waited_for,
);

/// A binary built without the etcd feature refuses etcd leases, saying how to get them.
#[cfg(not(feature = "etcd-lease"))]
#[tokio::test]
async fn etcd_leases_without_the_feature_are_refused_with_the_fix() {
    let tag = unique_tag();
    let scenario = Scenario::new(
        &tag,
        &[
            &pg_store_section(),
            &outbox_section(&tag, 2, ""),
            "[sink]\ntype = \"stdout\"\n",
            "[leases]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:23790\"]\n",
        ],
    );
    let output = scenario.ferry(&["relay"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--features etcd-lease"), "{stderr}");
}
