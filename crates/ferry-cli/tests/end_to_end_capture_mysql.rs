//! Log capture (`capture.mode = "log"`) end to end on MariaDB: real `ferry relay` processes
//! streaming the outbox from the binlog (the MariaDB with a row-format binlog of
//! `scripts/services.sh`, `FERRY_TEST_MYSQL_BINLOG_URL`) into the real NATS JetStream:
//! round trip with a rolled-back transaction, kill -9 at random points while producers
//! commit out of sequence order, a paused relay fenced, SIGTERM, a standby taking over the
//! capture lock, and the lag in `ferry status`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::scenarios::StoreNats;
use common::{FAST_RELAY, Producer, Scenario, nats_sink_section, outbox_section, unique_tag};
use ferry::NewMessage;
use ferry::mysql::MyOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry_core::testing::services;

/// A MariaDB outbox streamed from the binlog to a NATS stream, both named after the
/// scenario's tag.
struct MyLogNats {
    scenario: Scenario,
    outbox: MyOutbox,
}

impl StoreNats for MyLogNats {
    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let url = services::mysql_binlog_url();
        let scenario = Scenario::new(
            &tag,
            &[
                &format!("[store]\ntype = \"mysql\"\nurl = \"{url}\"\n"),
                &outbox_section(&tag, partitions, extra_outbox),
                &nats_sink_section(&tag, duplicate_window_secs),
                FAST_RELAY,
                "[capture]\nmode = \"log\"\nheartbeat_interval_ms = 500\n",
            ],
        );
        let settings = StoreSettings {
            table_prefix: TablePrefix::new(format!("e{tag}_")).unwrap(),
            max_payload_bytes: 4 * 1024 * 1024,
            ..StoreSettings::default()
        };
        let outbox = MyOutbox::connect(&url, 6, settings).await.unwrap();
        Self { scenario, outbox }
    }

    fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    fn outbox(&self) -> &impl Producer {
        &self.outbox
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_never_publishes_a_rolled_back_transaction_and_reports_the_lag() {
    let e2e = MyLogNats::new(4, 120, "").await;
    // Committed before any relay streams: published from the table by the drain.
    let mut produced: HashSet<_> = e2e
        .outbox
        .commit(vec![NewMessage::new(
            "order",
            "before-streaming",
            "order.placed",
            "{}",
        )])
        .await
        .into_iter()
        .collect();
    let relay = e2e.scenario.relay("relay");
    relay
        .wait_for_log("the table is drained; streaming", Duration::from_secs(20))
        .await;
    let mut tx = e2e.outbox.pool().begin().await.unwrap();
    let rolled_back = e2e
        .outbox
        .enqueue(
            &mut tx,
            NewMessage::new("order", "rolled-back", "order.placed", "{}"),
        )
        .await
        .unwrap()
        .id;
    tx.rollback().await.unwrap();
    produced.extend(e2e.produce(20, 5, 2).await.unwrap());
    e2e.scenario.wait_drained(Duration::from_secs(30)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    assert!(!produced.contains(&rolled_back));

    let status = e2e.scenario.ferry(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("log capture:") && text.contains("bytes of log behind"),
        "{text}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_g4_kill_nine_while_streaming_loses_and_duplicates_nothing() {
    common::scenarios::kill_nine_at_random_points::<MyLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_paused_streaming_relay_is_fenced() {
    common::scenarios::paused_zombie_relay_is_fenced::<MyLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_confirms_and_releases_every_lease() {
    common::scenarios::sigterm_finishes_and_releases_leases::<MyLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_as_a_standby_and_takes_over_when_the_first_is_killed() {
    let e2e = MyLogNats::new(4, 1, "").await;
    let first = e2e.scenario.relay("relay-a");
    first
        .wait_for_log("the table is drained; streaming", Duration::from_secs(20))
        .await;
    let second = e2e.scenario.relay("relay-b");
    second
        .wait_for_log("standby", Duration::from_secs(20))
        .await;
    assert!(
        second.logs().contains("streamed by another relay"),
        "{}",
        second.logs()
    );
    let producing = e2e.produce(40, 30, 2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    first.kill_nine();
    second
        .wait_for_log("the table is drained; streaming", Duration::from_secs(30))
        .await;
    let produced = producing.await.unwrap();
    e2e.scenario.wait_drained(Duration::from_secs(60)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect_after_inbox();
    assert!(second.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}
