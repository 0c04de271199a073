//! End-to-end guarantees with real `ferry relay` processes, the real PostgreSQL and the
//! real RabbitMQ: kill -9 at random points, two relays with one paused past its lease, the
//! broker unreachable at start and cut off mid-run, an unroutable message. A consumer
//! reads the queue and checks per aggregate that, after the inbox, nothing is missing and
//! every version is applied once and in order (RabbitMQ has no dedup: re-sends after a
//! crash reach the queue again, and the inbox drops them).
//!
//! The outage is made with a TCP proxy between the relay and the broker that the test
//! cuts and restores: restarting the shared RabbitMQ would disturb other tests.
#![allow(clippy::unwrap_used)]

mod common;

#[path = "../../ferry/tests/support/tcp_proxy.rs"]
mod tcp_proxy;

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use uuid::Uuid;

use common::{PgScenario, Report, kill_nine_repeatedly, read_amqp_queue, unique_tag};
use ferry::amqp::lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use ferry::amqp::lapin::types::FieldTable;
use ferry::amqp::lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use ferry::{NewMessage, ReceivedMessage};
use ferry_core::testing::services;
use tcp_proxy::{TcpProxy, address_of};

/// A PostgreSQL outbox relayed to the topic exchange `e<tag>`, whose queue `e<tag>` (durable,
/// declared by the test as an operator would) takes the routing keys matching `binding`.
struct PgRabbit {
    pg: PgScenario,
    connection: Connection,
    channel: Channel,
    name: String,
}

impl PgRabbit {
    /// `url` is where the relay connects (the broker, or a proxy in front of it).
    async fn new(partitions: u32, url: &str, binding: &str) -> Self {
        let tag = unique_tag();
        let name = format!("e{tag}");
        let connection =
            Connection::connect(&services::amqp_url(), ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let e2e_sink = format!(
            "[sink]\ntype = \"amqp\"\nurl = \"{url}\"\nexchange_template = \"{name}\"\nconfirm_timeout_secs = 3\n"
        );
        let pg = PgScenario::new(&tag, partitions, &e2e_sink, "").await;
        let e2e = Self {
            pg,
            connection,
            channel,
            name,
        };
        e2e.bind(binding).await;
        e2e
    }

    async fn bind(&self, binding: &str) {
        self.channel
            .queue_bind(
                self.name.as_str().into(),
                self.name.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Everything in the queue, in delivery order, until nothing came for two seconds.
    async fn read_all(&self) -> Vec<ReceivedMessage> {
        let channel = self.connection.create_channel().await.unwrap();
        let received = read_amqp_queue(&channel, &self.name).await;
        channel.close(200, "read".into()).await.unwrap();
        received
    }

    async fn check(&self, produced: &HashSet<Uuid>) -> Report {
        Report::of(self.read_all().await, produced)
    }

    async fn cleanup(self) {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        self.channel
            .exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_points_loses_nothing_and_the_inbox_applies_each_once_in_order() {
    let e2e = PgRabbit::new(8, &services::amqp_url(), "#").await;
    let producing = e2e.pg.produce(200, 60, 4);
    let (relay, mut logs) = kill_nine_repeatedly(&e2e.pg.scenario, 6).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 12_000);
    e2e.pg.scenario.wait_drained(Duration::from_secs(180)).await;
    let report = e2e.check(&produced).await;
    report.assert_perfect_after_inbox();
    logs.push_str(&relay.logs());
    assert!(logs.contains("Unclean"), "no takeover happened:\n{logs}");
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_one_paused_past_its_lease_lose_nothing_and_keep_order_after_the_inbox() {
    let e2e = PgRabbit::new(8, &services::amqp_url(), "#").await;
    let a = e2e.pg.scenario.relay("relay-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = e2e.pg.scenario.relay("relay-b");
    let producing = e2e.pg.produce(100, 60, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    e2e.pg.scenario.wait_drained(Duration::from_secs(120)).await;
    e2e.check(&produced).await.assert_perfect_after_inbox();
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_at_start_and_cut_off_mid_run_loses_nothing() {
    let mut proxy = TcpProxy::down(address_of(&services::amqp_url()));
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let e2e = PgRabbit::new(4, &url, "#").await;
    let relay = e2e.pg.scenario.relay("relay");
    relay
        .wait_for_log("not ready", Duration::from_secs(20))
        .await;

    proxy.restore().await;
    let before_the_cut = e2e.pg.produce(50, 80, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    // Written while the broker is cut off: the relay must fail to publish them, and
    // publish them once it is back.
    let during_the_cut = e2e.pg.produce(50, 20, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore().await;
    let mut produced = before_the_cut.await.unwrap();
    produced.extend(during_the_cut.await.unwrap());
    e2e.pg.scenario.wait_drained(Duration::from_secs(120)).await;
    e2e.check(&produced).await.assert_perfect_after_inbox();
    let logs = relay.logs();
    assert!(
        logs.contains("publish failed") || logs.contains("amqp connection lost"),
        "the outage went unseen:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_blocks_its_partition_visibly_until_a_queue_takes_it() {
    let e2e = PgRabbit::new(1, &services::amqp_url(), "account.#").await;
    let mut tx = e2e.pg.outbox.pool().begin().await.unwrap();
    let audit = e2e
        .pg
        .outbox
        .enqueue(
            &mut tx,
            NewMessage::new("audit", "audit-1", "audit.logged", "{}"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = e2e.pg.scenario.relay("relay");
    let reason = e2e.pg.scenario.wait_blocked(0, &relay).await;
    assert!(
        reason.contains(&audit.id.to_string()) && reason.contains("NO_ROUTE"),
        "{reason}"
    );

    // Messages behind the blocked one wait; none is sent or marked.
    let behind = e2e.pg.produce(5, 2, 1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        e2e.pg.scenario.backlog(),
        11,
        "nothing is marked while blocked"
    );
    assert!(e2e.read_all().await.is_empty(), "nothing behind it is sent");

    e2e.bind("audit.#").await;
    e2e.pg.scenario.wait_drained(Duration::from_secs(60)).await;
    let received = e2e.read_all().await;
    assert_eq!(
        received.first().map(|m| m.id),
        Some(audit.id),
        "the blocked message first"
    );
    let mut produced = behind;
    produced.insert(audit.id);
    Report::of(received, &produced).assert_perfect(produced.len());
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}
