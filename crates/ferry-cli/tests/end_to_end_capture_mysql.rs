//! Log capture (`capture.mode = "log"`) end to end on MariaDB: real `ferry relay` processes
//! streaming the outbox from the binlog (the MariaDB with a row-format binlog of
//! `scripts/services.sh`, `FERRY_TEST_MYSQL_BINLOG_URL`) into the real NATS JetStream:
//! round trip with a rolled-back transaction, kill -9 at random points while producers
//! commit out of sequence order, a paused relay fenced, SIGTERM, a standby taking over the
//! capture lock, the lag in `ferry status`, a relay killed in the middle of a large
//! transaction, and XA transactions committed while streaming and across a kill -9 between
//! their PREPARE and COMMIT. The kill -9, paused relay and standby
//! scenarios also run into the transactional Kafka (module `kafka`, feature `kafka`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::marker::PhantomData;
use std::time::Duration;

use common::log_capture::{self, LogStore, STREAMING};
use common::scenarios::StoreSink;
use common::sinks::{Nats, TestSink};
use common::{FAST_RELAY, Producer, Scenario, outbox_section, unique_tag};
use ferry::NewMessage;
use ferry::mysql::MyOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry_core::testing::services;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

/// A MariaDB outbox streamed from the binlog to sink `K`, both named after the scenario's
/// tag.
struct MyLog<K> {
    scenario: Scenario,
    outbox: MyOutbox,
    sink: PhantomData<K>,
}

type MyLogNats = MyLog<Nats>;

impl<K: TestSink> StoreSink for MyLog<K> {
    type Sink = K;

    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let url = services::mysql_binlog_url();
        let scenario = Scenario::new(
            &tag,
            &[
                &format!("[store]\ntype = \"mysql\"\nurl = \"{url}\"\n"),
                &outbox_section(&tag, partitions, extra_outbox),
                &K::section(&tag, duplicate_window_secs),
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
}

impl<K: TestSink> LogStore for MyLog<K> {
    async fn enqueue_rolled_back(&self, message: NewMessage) -> Uuid {
        let mut tx = self.outbox.pool().begin().await.unwrap();
        let id = self.outbox.enqueue(&mut tx, message).await.unwrap().id;
        tx.rollback().await.unwrap();
        id
    }

    fn server_port(&self) -> u16 {
        url::Url::parse(&services::mysql_binlog_url())
            .unwrap()
            .port()
            .unwrap_or(3306)
    }

    async fn end_connections(&self, ports: &[u16]) {
        let hosts: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE FIND_IN_SET(HOST, ?)",
        )
        .bind(hosts.join(","))
        .fetch_all(self.outbox.pool())
        .await
        .unwrap();
        for id in ids {
            // The connection may have ended by itself meanwhile.
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                .execute(self.outbox.pool())
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_never_publishes_a_rolled_back_transaction_and_reports_the_lag() {
    log_capture::round_trip_never_publishes_a_rolled_back_transaction::<MyLogNats>(&[
        "bytes of log behind",
    ])
    .await;
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
    log_capture::a_standby_takes_over_when_the_streaming_relay_is_killed::<MyLogNats>(
        "streamed by another relay",
    )
    .await;
}

/// The scenarios whose checks hold for any sink, into Kafka: its transactions (and the
/// producer epochs fencing a previous owner) keep every message once in the topic.
#[cfg(feature = "kafka")]
mod kafka {
    use super::common::sinks::Kafka;
    use super::{MyLog, common, log_capture};

    type MyLogKafka = MyLog<Kafka>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn g2_g3_g4_kill_nine_while_streaming_loses_and_duplicates_nothing() {
        common::scenarios::kill_nine_at_random_points::<MyLogKafka>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn g5_a_paused_streaming_relay_is_fenced() {
        common::scenarios::paused_zombie_relay_is_fenced::<MyLogKafka>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_relay_waits_as_a_standby_and_takes_over_when_the_first_is_killed() {
        log_capture::a_standby_takes_over_when_the_streaming_relay_is_killed::<MyLogKafka>(
            "streamed by another relay",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_ending_the_relays_connections_loses_and_duplicates_nothing() {
    log_capture::the_database_ending_the_relays_connections_loses_nothing::<MyLogNats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_in_the_middle_of_a_large_transaction_resumes_without_loss() {
    log_capture::a_relay_killed_in_the_middle_of_a_large_transaction_resumes_without_loss::<
        MyLogNats,
    >()
    .await;
}

/// An XA transaction of one message for each of `aggregates`, prepared on a connection of
/// its own: the connection, its XID and the messages' ids. The server keeps it prepared
/// after the connection ends, should the test fail before its end (`XA RECOVER` lists it).
async fn prepare_xa(
    outbox: &MyOutbox,
    aggregates: &[String],
) -> (sqlx::pool::PoolConnection<sqlx::MySql>, String, Vec<Uuid>) {
    let mut conn = outbox.pool().acquire().await.unwrap();
    let xid = format!("'{}'", Uuid::now_v7().simple());
    sqlx::raw_sql(AssertSqlSafe(format!("XA START {xid}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for aggregate in aggregates {
        let message = NewMessage::new("order", aggregate.as_str(), "order.paid", "{}");
        ids.push(outbox.enqueue(&mut conn, message).await.unwrap().id);
    }
    sqlx::raw_sql(AssertSqlSafe(format!("XA END {xid}; XA PREPARE {xid}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    (conn, xid, ids)
}

async fn complete_xa(mut conn: sqlx::pool::PoolConnection<sqlx::MySql>, xid: &str, how: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!("XA {how} {xid}")))
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Issue 15: MariaDB binlogs an XA transaction's PREPARE, with its rows, apart from its
/// later `XA COMMIT`. While producers commit, an XA producer prepares and commits
/// transactions on aggregates of its own (and rolls every fifth back); one is left prepared
/// while the streaming relay goes on past it for seconds, and the relay is killed (-9)
/// before it commits. The next relay still publishes it: every committed message arrives,
/// in order, once after the inbox; no rolled-back one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xa_transactions_arrive_once_in_order_across_a_kill_between_prepare_and_commit() {
    let e2e = MyLogNats::new(4, 120, "").await;
    let first = e2e.scenario().relay("relay-a");
    first.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    let producing = e2e.produce(20, 20, 2);
    let xa_aggregates: Vec<String> = (0..4).map(|n| format!("xa-{n}")).collect();
    let mut produced = HashSet::new();
    for round in 0..10 {
        let (conn, xid, ids) = prepare_xa(&e2e.outbox, &xa_aggregates).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if round % 5 == 4 {
            complete_xa(conn, &xid, "ROLLBACK").await;
        } else {
            complete_xa(conn, &xid, "COMMIT").await;
            produced.extend(ids);
        }
    }
    let (held, held_xid, held_ids) = prepare_xa(&e2e.outbox, &xa_aggregates).await;
    // Long enough for the relay to confirm what commits after the PREPARE.
    e2e.outbox()
        .commit(vec![NewMessage::new("order", "after", "order.paid", "{}")])
        .await
        .into_iter()
        .for_each(|id| {
            produced.insert(id);
        });
    tokio::time::sleep(Duration::from_millis(2000)).await;
    first.kill_nine();
    let second = e2e.scenario().relay("relay-b");
    second
        .wait_for_log(STREAMING, Duration::from_secs(30))
        .await;
    complete_xa(held, &held_xid, "COMMIT").await;
    produced.extend(held_ids);
    produced.extend(producing.await.unwrap());
    e2e.scenario().wait_drained(Duration::from_secs(60)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect_after_inbox();
    assert_eq!(
        report.received - report.duplicates,
        produced.len(),
        "the distinct messages received are the committed ones: {report:?}"
    );
    assert!(second.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}
