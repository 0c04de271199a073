//! `ferry relay` seen from outside, with `[metrics] listen` set: the Prometheus metrics
//! scraped over HTTP agree with what reached the real NATS JetStream, scrapes of a status
//! that is slow to read do not pile reads up in PostgreSQL, and `/readyz` follows
//! the broker (a NATS server of the test's own, killed and restarted; the shared one stays
//! up for the other tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::health::{Endpoints, metrics_section};
use common::{
    FAST_RELAY, PgScenario, Relay, delete_nats_stream, free_port, nats_sink_section, nats_stream,
    outbox_section, pg_store_section, read_nats_stream, unique_tag, wait_listening,
};

const PARTITIONS: u32 = 4;

/// The value of the series written exactly `series` (name and labels) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The sum of every series of metric `name` with labels.
fn sum_labelled(text: &str, name: &str) -> (usize, f64) {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    (values.len(), values.iter().sum())
}

/// A relay of a PostgreSQL outbox of its own into NATS, with `[metrics] listen` set, once
/// its `/readyz` answers 200.
async fn ready_relay() -> (String, PgScenario, Relay, Endpoints) {
    let tag = unique_tag();
    let port = free_port();
    let pg = PgScenario::from_sections(
        &tag,
        &[
            &pg_store_section(),
            &outbox_section(&tag, PARTITIONS, ""),
            &nats_sink_section(&tag, 120),
            FAST_RELAY,
            &metrics_section(port),
        ],
    )
    .await;
    let relay = pg.scenario.relay("relay");
    let endpoints = Endpoints::new(port);
    endpoints
        .wait_ready(200, Duration::from_secs(30), &relay)
        .await;
    (tag, pg, relay, endpoints)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scraped_metrics_agree_with_what_the_relay_published() {
    let (tag, pg, relay, endpoints) = ready_relay().await;
    let (status, body) = endpoints.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");

    let produced = pg.produce(20, 10, 2).await.unwrap();
    let n = produced.len() as f64;
    pg.scenario.wait_drained(Duration::from_secs(60)).await;
    let received = read_nats_stream(&nats_stream(&tag)).await;
    assert_eq!(received.len(), produced.len());

    let text = endpoints.scrape().await;
    assert_eq!(value(&text, "ferry_relay_published_total"), n);
    assert_eq!(value(&text, "ferry_relay_marked_total"), n);
    for class in ["transient", "permanent", "fenced"] {
        let series = format!("ferry_relay_publish_failures_total{{class=\"{class}\"}}");
        assert_eq!(value(&text, &series), 0.0, "{series}");
    }
    assert_eq!(
        value(&text, "ferry_relay_leases_acquired_total"),
        f64::from(PARTITIONS)
    );
    assert_eq!(value(&text, "ferry_relay_leases_lost_total"), 0.0);
    assert_eq!(
        value(&text, "ferry_relay_owned_partitions"),
        f64::from(PARTITIONS)
    );
    assert_eq!(value(&text, "ferry_relay_commit_to_ack_seconds_count"), n);
    assert!(value(&text, "ferry_relay_commit_to_ack_seconds_sum") > 0.0);
    assert_eq!(
        value(
            &text,
            "ferry_relay_commit_to_ack_seconds_bucket{le=\"+Inf\"}"
        ),
        n
    );
    assert_eq!(value(&text, "ferry_relay_batch_size_sum"), n);
    for gauge in [
        "ferry_outbox_backlog",
        "ferry_outbox_oldest_unpublished_age_seconds",
        "ferry_outbox_blocked",
    ] {
        assert_eq!(
            sum_labelled(&text, gauge),
            (PARTITIONS as usize, 0.0),
            "{gauge}:\n{text}"
        );
    }
    assert!(relay.terminate(Duration::from_secs(15)).success());
    delete_nats_stream(&nats_stream(&tag)).await;
}

/// The relay's `/metrics` reads of the outbox status waiting in PostgreSQL.
async fn status_reads_waiting(pool: &sqlx::PgPool, outbox_table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE query LIKE 'SELECT l.partition_no,%' AND query LIKE '%' || $1 || '%' \
         AND state = 'active'",
    )
    .bind(outbox_table)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrapes_of_a_slow_status_do_not_pile_up_reads_in_the_database() {
    let (tag, pg, relay, endpoints) = ready_relay().await;
    let pool = pg.outbox.pool();
    let outbox_table = format!("e{tag}_outbox");
    // The status read waits behind this lock as a scan of a huge backlog would take time.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {outbox_table} IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *lock)
    .await
    .unwrap();
    for _ in 0..3 {
        let (status, text) = endpoints.get("/metrics").await.expect("metrics served");
        assert_eq!(
            status, 200,
            "a scrape answers while the status cannot be read"
        );
        assert!(text.contains("ferry_relay_published_total"), "{text}");
    }
    assert_eq!(
        status_reads_waiting(pool, &outbox_table).await,
        1,
        "three scrapes, one status read in the database"
    );
    lock.rollback().await.unwrap();

    let produced = pg.produce(10, 5, 1).await.unwrap();
    pg.scenario.wait_drained(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_reads_waiting(pool, &outbox_table).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the held read ends with the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = endpoints.scrape().await;
    assert_eq!(
        value(&text, "ferry_relay_published_total"),
        produced.len() as f64
    );
    assert_eq!(
        sum_labelled(&text, "ferry_outbox_backlog"),
        (PARTITIONS as usize, 0.0),
        "the gauges are read again once the status answers:\n{text}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    delete_nats_stream(&nats_stream(&tag)).await;
}

/// A NATS server with JetStream of the test's own, on `port`, storing in `dir`.
struct OwnNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnNats {
    async fn start() -> Self {
        let mut nats = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.restart().await;
        nats
    }

    /// Starts the server (again, on the same port and store) and waits until it accepts.
    async fn restart(&mut self) {
        self.child = Some(spawn_nats(self.port, self.dir.path()));
        wait_listening(self.port, "own nats-server").await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_nats(port: u16, store: &Path) -> Child {
    Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (scripts/services.sh)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_turns_unready_while_the_broker_is_down_and_ready_when_it_returns() {
    let tag = unique_tag();
    let port = free_port();
    let mut nats = OwnNats::start().await;
    let sink = nats_sink_section(&tag, 120)
        .replace(&ferry_core::testing::services::nats_url(), &nats.url());
    assert!(sink.contains(&nats.url()), "{sink}");
    let pg = PgScenario::from_sections(
        &tag,
        &[
            &pg_store_section(),
            &outbox_section(&tag, PARTITIONS, ""),
            &sink,
            FAST_RELAY,
            &metrics_section(port),
        ],
    )
    .await;
    let relay = pg.scenario.relay("relay");
    let endpoints = Endpoints::new(port);
    let body = endpoints
        .wait_ready(200, Duration::from_secs(30), &relay)
        .await;
    assert!(body.contains("\"sink\":\"ok\""), "{body}");

    nats.kill();
    let body = endpoints
        .wait_ready(503, Duration::from_secs(30), &relay)
        .await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], "not ready", "{body}");
    assert_eq!(answer["checks"]["store"], "ok", "{body}");
    assert_eq!(answer["checks"]["leases"], "ok", "{body}");
    assert!(
        answer["checks"]["sink"].as_str().unwrap().contains("nats"),
        "{body}"
    );
    let (status, _) = endpoints.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "alive while not ready");

    nats.restart().await;
    endpoints
        .wait_ready(200, Duration::from_secs(60), &relay)
        .await;
    // Ready means it works: a message enqueued now is published.
    let produced = pg.produce(1, 1, 1).await.unwrap();
    pg.scenario.wait_drained(Duration::from_secs(30)).await;
    let text = endpoints.scrape().await;
    assert_eq!(
        value(&text, "ferry_relay_published_total"),
        produced.len() as f64
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}
