//! End-to-end guarantees with real `ferry relay` processes, the real PostgreSQL and Redis
//! Streams: kill -9 at random points, two relays with one paused past its lease, Redis down
//! at start and killed mid-run, a stream key that blocks its partition. A consumer reads
//! every stream back and checks, per aggregate, that the streams hold each message exactly
//! once, in version order: the explicit entry ids keep re-sends out of the broker itself.
#![allow(clippy::unwrap_used)]

mod common;

#[path = "../../ferry/tests/support/redis_server.rs"]
mod redis_server;

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use uuid::Uuid;

use common::{PgScenario, Report, kill_nine_repeatedly, unique_tag};
use ferry::ReceivedMessage;
use ferry::redis_stream::decode_stream_id;
use ferry::redis_stream::redis::streams::StreamRangeReply;
use ferry::redis_stream::redis::{self, AsyncCommands as _};
use ferry_core::testing::services;
use redis_server::{PrivateRedis, free_port};

/// A PostgreSQL outbox relayed to Redis streams `e<tag>.{aggregate_type}.{partition}`.
struct PgRedis {
    pg: PgScenario,
    url: String,
}

impl PgRedis {
    async fn new(partitions: u32, url: &str) -> Self {
        let tag = unique_tag();
        let sink = format!(
            "[sink]\ntype = \"redis_stream\"\nurl = \"{url}\"\nstream_template = \"e{tag}.{{aggregate_type}}.{{partition}}\"\nresponse_timeout_secs = 3\n"
        );
        let pg = PgScenario::new(&tag, partitions, &sink, "").await;
        Self {
            pg,
            url: url.to_owned(),
        }
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let timeouts =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&timeouts)
            .await
            .unwrap()
    }

    async fn streams(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .connection()
            .await
            .keys(format!("e{}.*", self.pg.scenario.tag))
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Every entry of every stream, each stream in order (an aggregate lives in one).
    async fn read_all(&self) -> Vec<ReceivedMessage> {
        let mut connection = self.connection().await;
        let mut received = Vec::new();
        for stream in self.streams().await {
            let reply: StreamRangeReply = connection.xrange_all(&stream).await.unwrap();
            received.extend(
                reply
                    .ids
                    .iter()
                    .map(|entry| decode_stream_id(entry).unwrap()),
            );
        }
        received
    }

    async fn check(&self, produced: &HashSet<Uuid>) -> Report {
        Report::of(self.read_all().await, produced)
    }

    async fn cleanup(self) {
        let streams = self.streams().await;
        if !streams.is_empty() {
            let () = self.connection().await.del(streams).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_points_leaves_no_gap_reorder_or_duplicate_in_the_streams() {
    let e2e = PgRedis::new(8, &services::redis_url()).await;
    let producing = e2e.pg.produce(200, 60, 4);
    let (relay, mut logs) = kill_nine_repeatedly(&e2e.pg.scenario, 6).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 12_000);
    e2e.pg.scenario.wait_drained(Duration::from_secs(180)).await;
    let report = e2e.check(&produced).await;
    report.assert_perfect(produced.len());
    logs.push_str(&relay.logs());
    assert!(
        logs.contains("Unclean"),
        "restarted relays should have taken partitions over from killed ones:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_one_paused_past_its_lease_store_each_message_once_in_order() {
    let e2e = PgRedis::new(8, &services::redis_url()).await;
    let a = e2e.pg.scenario.relay("relay-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = e2e.pg.scenario.relay("relay-b");
    let producing = e2e.pg.produce(100, 60, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal(Signal::SIGSTOP);
    // Well past the 2 s lease: b takes a's partitions over, then a resumes mid-batch.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.signal(Signal::SIGCONT);
    let produced = producing.await.unwrap();
    e2e.pg.scenario.wait_drained(Duration::from_secs(120)).await;
    e2e.check(&produced).await.assert_perfect(produced.len());
    assert!(a.terminate(Duration::from_secs(15)).success());
    assert!(b.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_and_killed_mid_run_loses_and_duplicates_nothing() {
    let port = free_port().unwrap();
    let data = tempfile::tempdir().unwrap();
    let e2e = PgRedis::new(4, &format!("redis://127.0.0.1:{port}")).await;
    let relay = e2e.pg.scenario.relay("relay");
    relay
        .wait_for_log("not ready", Duration::from_secs(20))
        .await;

    let server = PrivateRedis::start_durable(port, data.path()).unwrap();
    let before_the_kill = e2e.pg.produce(50, 80, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.stop();
    // Written while Redis is down: the relay must fail to publish them, and publish them
    // once it is back.
    let during_the_outage = e2e.pg.produce(50, 20, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = PrivateRedis::start_durable(port, data.path()).unwrap();
    let mut produced = before_the_kill.await.unwrap();
    produced.extend(during_the_outage.await.unwrap());
    e2e.pg.scenario.wait_drained(Duration::from_secs(120)).await;
    e2e.check(&produced).await.assert_perfect(produced.len());
    assert!(
        relay.logs().contains("publish failed"),
        "the relay should have seen the outage:\n{}",
        relay.logs()
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_of_another_type_blocks_its_partition_with_the_reason_in_status() {
    let e2e = PgRedis::new(1, &services::redis_url()).await;
    let key = format!("e{}.account.0", e2e.pg.scenario.tag);
    let () = e2e
        .connection()
        .await
        .set(&key, "not a stream")
        .await
        .unwrap();
    let produced = e2e.pg.produce(3, 2, 1).await.unwrap();
    let relay = e2e.pg.scenario.relay("relay");
    let reason = e2e.pg.scenario.wait_blocked(0, &relay).await;
    assert!(
        reason.contains(&key) && reason.contains("not a stream"),
        "{reason}"
    );
    assert_eq!(
        e2e.pg.scenario.backlog(),
        6,
        "nothing is marked while blocked"
    );

    let () = e2e.connection().await.del(&key).await.unwrap();
    e2e.pg.scenario.wait_drained(Duration::from_secs(60)).await;
    e2e.check(&produced).await.assert_perfect(produced.len());
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}
