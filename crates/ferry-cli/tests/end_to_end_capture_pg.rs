//! Log capture (`capture.mode = "log"`) end to end: real `ferry relay` processes streaming
//! the outbox from PostgreSQL's logical replication (the cluster with `wal_level =
//! logical` of `scripts/services.sh`, `FERRY_TEST_PG_LOGICAL_URL`) into the real NATS
//! JetStream: round trip, a rolled-back transaction, kill -9 at random points while
//! producers commit out of sequence order, a standby taking over the slot, a paused relay
//! fenced, SIGTERM, heartbeats moving an idle slot on, the slot's lag in `ferry status`,
//! and a relay killed in the middle of a large transaction.
//! The kill -9, paused relay and standby scenarios also run into the transactional Kafka
//! (module `kafka`, feature `kafka`).
#![allow(clippy::unwrap_used)]

mod common;

use std::marker::PhantomData;
use std::time::Duration;

use common::log_capture::{self, LogStore, STREAMING};
use common::scenarios::StoreSink;
use common::sinks::{Nats, TestSink};
use common::{FAST_RELAY, Producer, Scenario, outbox_section, pg_outbox_at, unique_tag};
use ferry::NewMessage;
use ferry::postgres::PgOutbox;
use ferry_core::testing::services;
use sqlx::PgPool;
use uuid::Uuid;

/// A PostgreSQL outbox streamed by log capture to sink `K`, both named after the
/// scenario's tag; its slot and publication are `e<tag>_outbox`.
struct PgLog<K> {
    scenario: Scenario,
    outbox: PgOutbox,
    sink: PhantomData<K>,
}

type PgLogNats = PgLog<Nats>;

impl<K> PgLog<K> {
    fn slot(&self) -> String {
        format!("e{}_outbox", self.scenario.tag)
    }

    fn pool(&self) -> &PgPool {
        self.outbox.pool()
    }

    /// The slot's confirmed position, in bytes from the start of the WAL.
    async fn confirmed_flush(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.slot())
        .fetch_one(self.pool())
        .await
        .unwrap()
    }
}

impl<K: TestSink> StoreSink for PgLog<K> {
    type Sink = K;

    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let url = services::postgres_logical_url();
        let scenario = Scenario::new(
            &tag,
            &[
                &format!("[store]\ntype = \"postgres\"\nurl = \"{url}\"\n"),
                &outbox_section(&tag, partitions, extra_outbox),
                &K::section(&tag, duplicate_window_secs),
                FAST_RELAY,
                "[capture]\nmode = \"log\"\nheartbeat_interval_ms = 500\n",
            ],
        );
        let outbox = pg_outbox_at(&url, &tag).await;
        Self {
            scenario,
            outbox,
            sink: PhantomData,
        }
    }

    fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    fn outbox(&self) -> &impl Producer {
        &self.outbox
    }

    /// Drops the slot (once its relays are gone), so that it pins no WAL after the test.
    async fn remove_outbox(&self) {
        for _ in 0..50 {
            let dropped = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(self.slot())
            .execute(self.pool())
            .await;
            if dropped.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the slot {} stayed active", self.slot());
    }
}

impl<K: TestSink> LogStore for PgLog<K> {
    async fn enqueue_rolled_back(&self, message: NewMessage) -> Uuid {
        let mut tx = self.pool().begin().await.unwrap();
        let id = self.outbox.enqueue(&mut tx, message).await.unwrap().id;
        tx.rollback().await.unwrap();
        id
    }

    fn server_port(&self) -> u16 {
        url::Url::parse(&services::postgres_logical_url())
            .unwrap()
            .port()
            .unwrap_or(5432)
    }

    async fn end_connections(&self, ports: &[u16]) {
        let ports: Vec<i32> = ports.iter().map(|&port| i32::from(port)).collect();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE client_addr = '127.0.0.1' AND client_port = ANY($1)",
        )
        .bind(ports)
        .execute(self.pool())
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_never_publishes_a_rolled_back_transaction_and_reports_the_slot_lag() {
    log_capture::round_trip_never_publishes_a_rolled_back_transaction::<PgLogNats>(&[
        "log capture: ",
        " bytes of log behind the server's",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_while_streaming_loses_and_duplicates_nothing() {
    common::scenarios::kill_nine_at_random_points::<PgLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_streaming_relay_is_fenced() {
    common::scenarios::paused_zombie_relay_is_fenced::<PgLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_confirms_and_releases_every_lease() {
    common::scenarios::sigterm_finishes_and_releases_leases::<PgLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_as_a_standby_and_takes_over_when_the_first_is_killed() {
    log_capture::a_standby_takes_over_when_the_streaming_relay_is_killed::<PgLogNats>("is active")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_the_slot_on_while_the_outbox_is_idle() {
    let e2e = PgLogNats::new(2, 120, "").await;
    let relay = e2e.scenario.relay("relay");
    relay.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    let before = e2e.confirmed_flush().await;
    // WAL written elsewhere: the slot must not stay behind it while no outbox row comes.
    sqlx::query("CREATE TEMP TABLE filler AS SELECT generate_series(1, 10000) AS n")
        .execute(e2e.pool())
        .await
        .unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while e2e.confirmed_flush().await <= before {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the idle slot's confirmed position did not move: {}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// The scenarios whose checks hold for any sink, into Kafka: its transactions (and the
/// producer epochs fencing a previous owner) keep every message once in the topic.
#[cfg(feature = "kafka")]
mod kafka {
    use super::common::sinks::Kafka;
    use super::{PgLog, common, log_capture};

    type PgLogKafka = PgLog<Kafka>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn g2_g3_g4_kill_nine_while_streaming_loses_and_duplicates_nothing() {
        common::scenarios::kill_nine_at_random_points::<PgLogKafka>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn g5_a_paused_streaming_relay_is_fenced() {
        common::scenarios::paused_zombie_relay_is_fenced::<PgLogKafka>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_relay_waits_as_a_standby_and_takes_over_when_the_first_is_killed() {
        log_capture::a_standby_takes_over_when_the_streaming_relay_is_killed::<PgLogKafka>(
            "is active",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_ending_the_relays_connections_loses_and_duplicates_nothing() {
    log_capture::the_database_ending_the_relays_connections_loses_nothing::<PgLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_in_the_middle_of_a_large_transaction_resumes_without_loss() {
    log_capture::a_relay_killed_in_the_middle_of_a_large_transaction_resumes_without_loss::<
        PgLogNats,
    >()
    .await;
}
