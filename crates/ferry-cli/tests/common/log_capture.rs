//! The log capture scenarios (`capture.mode = "log"`) of every store that has a log the
//! relay streams, against any sink: a round trip with a rolled-back transaction, a standby
//! taking over (both relays ready all along), the server ending the relay's connections; and into NATS, a relay killed in
//! the middle of a large transaction.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use ferry::NewMessage;
use uuid::Uuid;

use super::health::{Endpoints, metrics_section};
use super::scenarios::StoreSink;
use super::sinks::Nats;
use super::{Producer, Relay, Scenario, free_port};

/// What the relay logs once it streams.
pub const STREAMING: &str = "the table is drained; streaming";

/// A store relayed in log mode.
pub trait LogStore: StoreSink {
    /// Enqueues `message` in a transaction that is then rolled back; returns its id.
    async fn enqueue_rolled_back(&self, message: NewMessage) -> Uuid;

    /// The database server's port on this host.
    fn server_port(&self) -> u16;

    /// Has the server end the connections coming from these local ports of this host.
    async fn end_connections(&self, ports: &[u16]);
}

/// A row committed before streaming (the drain's), a rolled-back transaction never
/// published, then committed producers; `ferry status` prints each of `lag_texts`, and
/// `ferry status --json` carries the lag: behind while the first row waits, none of it
/// unpublished once drained.
pub async fn round_trip_never_publishes_a_rolled_back_transaction<S: LogStore>(lag_texts: &[&str]) {
    let e2e = S::new(4, 120, "").await;
    let mut produced: HashSet<_> = e2e
        .outbox()
        .commit(vec![NewMessage::new(
            "order",
            "before-streaming",
            "order.placed",
            "{}",
        )])
        .await
        .into_iter()
        .collect();
    let waiting = capture_lag(e2e.scenario());
    assert!(waiting.0 > 0 && waiting.1 > 0.0, "{waiting:?}");
    let relay = e2e.scenario().relay("relay");
    relay.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    let rolled_back = e2e
        .enqueue_rolled_back(NewMessage::new(
            "order",
            "rolled-back",
            "order.placed",
            "{}",
        ))
        .await;
    produced.extend(e2e.produce(20, 5, 2).await.unwrap());
    e2e.scenario().wait_drained(Duration::from_secs(30)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    assert!(!produced.contains(&rolled_back));

    let status = e2e.scenario().ferry(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    for lag_text in lag_texts {
        assert!(text.contains(lag_text), "{text}");
    }
    assert_eq!(capture_lag(e2e.scenario()).1, 0.0);
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// The capture's lag in `ferry status --json`: log bytes behind, and the age of the oldest
/// unpublished message.
fn capture_lag(scenario: &Scenario) -> (u64, f64) {
    let report = scenario.status_report();
    let capture = &report["capture"];
    match (
        capture["lag_bytes"].as_u64(),
        capture["oldest_unpublished_age_secs"].as_f64(),
    ) {
        (Some(bytes), Some(secs)) => (bytes, secs),
        _ => panic!("no capture lag in ferry status --json: {report}"),
    }
}

/// The scenario's config with `[metrics] listen` on a port of its own, as `<name>.toml`:
/// the file and the port.
fn with_health_port(scenario: &Scenario, name: &str) -> (PathBuf, u16) {
    let port = free_port();
    let text = std::fs::read_to_string(&scenario.config).unwrap() + "\n" + &metrics_section(port);
    let path = scenario.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, port)
}

/// Waits until `GET /readyz` on `port` answers 200.
async fn wait_ready(port: u16, relay: &Relay) {
    Endpoints::new(port)
        .wait_ready(200, Duration::from_secs(20), relay)
        .await;
}

/// A second relay waits as a standby (its log says `held_text`) and streams once the first
/// is killed; nothing is lost, duplicated or reordered after the inbox. Both answer
/// `/readyz` with 200 all along: the streaming relay, and the standby, ready to take over.
pub async fn a_standby_takes_over_when_the_streaming_relay_is_killed<S: LogStore>(held_text: &str) {
    let e2e = S::new(4, 1, "").await;
    let (config_a, port_a) = with_health_port(e2e.scenario(), "relay-a");
    let first = e2e.scenario().relay_with_config("relay-a", &config_a);
    first.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    wait_ready(port_a, &first).await;
    let (config_b, port_b) = with_health_port(e2e.scenario(), "relay-b");
    let second = e2e.scenario().relay_with_config("relay-b", &config_b);
    second
        .wait_for_log("standby", Duration::from_secs(20))
        .await;
    assert!(second.logs().contains(held_text), "{}", second.logs());
    wait_ready(port_b, &second).await;
    let producing = e2e.produce(40, 30, 2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    first.kill_nine();
    second
        .wait_for_log(STREAMING, Duration::from_secs(30))
        .await;
    wait_ready(port_b, &second).await;
    let produced = producing.await.unwrap();
    e2e.scenario().wait_drained(Duration::from_secs(60)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect_after_inbox();
    assert!(second.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// The database ends every connection of the streaming relay (as its restart does) three
/// times while producers commit: the relay connects again and streams on from the
/// confirmed position; nothing is lost, duplicated or reordered after the inbox.
pub async fn the_database_ending_the_relays_connections_loses_nothing<S: LogStore>() {
    let e2e = S::new(4, 120, "").await;
    let relay = e2e.scenario().relay("relay");
    relay.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    let producing = e2e.produce(40, 30, 2);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let ports = relay.ports_to(e2e.server_port());
        assert!(
            !ports.is_empty(),
            "the relay holds no connection to the database"
        );
        e2e.end_connections(&ports).await;
    }
    let produced = producing.await.unwrap();
    e2e.scenario().wait_drained(Duration::from_secs(60)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect_after_inbox();
    let logs = relay.logs();
    assert!(
        logs.matches(STREAMING).count() >= 2,
        "streamed again: {logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// A relay killed (-9) in the middle of a large transaction resumes from the end before it:
/// one transaction of 6,000 small messages (30 of the relay's batches) with a 1.5 MB one
/// (over NATS's 1 MiB limit) after the first 2,000 blocks the large one's partition, so the
/// relay stops reading the log there with the transaction partly published in every
/// partition and not confirmed. It is killed, an operator skips the rejected message, and
/// the next relay publishes the rest: nothing lost, duplicated or reordered.
pub async fn a_relay_killed_in_the_middle_of_a_large_transaction_resumes_without_loss<
    S: LogStore + StoreSink<Sink = Nats>,
>() {
    let e2e = S::new(4, 120, "max_payload_bytes = 2097152").await;
    let first = e2e.scenario().relay("relay-a");
    first.wait_for_log(STREAMING, Duration::from_secs(20)).await;
    let mut transaction: Vec<NewMessage> = (0..6000)
        .map(|n| NewMessage::new("order", (n % 40).to_string(), "order.placed", "{}"))
        .collect();
    transaction.insert(
        2000,
        NewMessage::new("blob", "1", "blob.stored", vec![b'x'; 1_500_000]),
    );
    let ids = e2e.outbox().commit(transaction).await;
    let rejected = ids[2000];
    let mut produced: HashSet<Uuid> = ids.into_iter().collect();
    wait_until(
        e2e.scenario(),
        &first,
        "a partition is blocked",
        |scenario| {
            scenario
                .status()
                .iter()
                .any(|partition| !partition["blocked_reason"].is_null())
        },
    )
    .await;
    wait_until(
        e2e.scenario(),
        &first,
        "what precedes the rejected message is published",
        |scenario| scenario.backlog() <= 6001 - 2000,
    )
    .await;
    first.kill_nine();

    let skipped = e2e.scenario().ferry(&[
        "skip",
        "--message",
        &rejected.to_string(),
        "--reason",
        "over the broker's limit",
    ]);
    assert!(
        skipped.status.success(),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    produced.remove(&rejected);
    let second = e2e.scenario().relay("relay-b");
    e2e.scenario().wait_drained(Duration::from_secs(60)).await;
    let report = e2e.check_stream(&produced).await;
    report.assert_perfect(produced.len());
    assert!(second.terminate(Duration::from_secs(15)).success());
    e2e.cleanup().await;
}

/// Waits until `condition` holds of the scenario (read with `ferry status`).
async fn wait_until(
    scenario: &Scenario,
    relay: &super::Relay,
    what: &str,
    condition: impl Fn(&Scenario) -> bool,
) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition(scenario) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "not within 60 s: {what}\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
