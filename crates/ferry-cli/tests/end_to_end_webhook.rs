//! End-to-end with real `ferry relay` processes, the real PostgreSQL and a real HTTP
//! receiver in the test (axum on 127.0.0.1): kill -9 while messages flow, two relays
//! sharing (one killed), a receiver that is down at start and fails some requests with
//! 500, and a 400 that blocks its partition with the reason in `ferry status --json`.
//! The receiver checks every signature and, per aggregate with ferry's inbox semantics:
//! repeats may arrive (same Idempotency-Key), nothing may be missing or applied out of order.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use common::{PgScenario, Report, kill_nine_repeatedly, unique_tag};
use ferry::ReceivedMessage;
use ferry::webhook::signature::{SigningKey, verify};

const SECRET: &str = "end-to-end-shared-secret-0123456789";

#[derive(Default)]
struct Inbox {
    received: Vec<ReceivedMessage>,
    /// Requests whose signature did not verify.
    bad_signatures: u64,
    /// Answers by aggregate id (`"7"`) or by aggregate id and version (`"7/1"`), instead
    /// of 200.
    refuse: HashMap<String, (StatusCode, String)>,
}

/// The receiver: verifies, decodes and records each POST; fails every `fail_every`-th
/// request with 500 (0: never).
#[derive(Clone)]
struct Receiver {
    inbox: Arc<Mutex<Inbox>>,
    requests: Arc<AtomicU64>,
    fail_every: u64,
}

impl Receiver {
    fn new(fail_every: u64) -> Self {
        Self {
            inbox: Arc::default(),
            requests: Arc::default(),
            fail_every,
        }
    }

    async fn serve(&self, addr: SocketAddr) -> DropGuard {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(self.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
                .unwrap();
        });
        stop.drop_guard()
    }

    fn report(&self, produced: &HashSet<Uuid>) -> Report {
        let inbox = self.inbox.lock().unwrap();
        assert_eq!(inbox.bad_signatures, 0, "requests with a bad signature");
        Report::of(inbox.received.clone(), produced)
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let count = receiver.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = SigningKey::from_secret(SECRET).unwrap();
    let mut inbox = receiver.inbox.lock().unwrap();
    if verify(&key, header, &body, now, Duration::from_secs(300)).is_err() {
        inbox.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    if receiver.fail_every > 0 && count % receiver.fail_every == 0 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "try again".into());
    }
    let message = ferry::webhook::received_message(
        headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))),
        body,
    )
    .unwrap();
    let version = format!("{}/{}", message.aggregate_id, message.version);
    if let Some(answer) = inbox
        .refuse
        .get(&message.aggregate_id)
        .or_else(|| inbox.refuse.get(&version))
    {
        return answer.clone();
    }
    inbox.received.push(message);
    (StatusCode::OK, String::new())
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A PostgreSQL outbox relayed to `http://<addr>/hooks/{aggregate_type}`, signed.
async fn pg_to_webhook(partitions: u32, addr: SocketAddr) -> PgScenario {
    PgScenario::new(&unique_tag(), partitions, &webhook_sink(addr), "").await
}

fn webhook_sink(addr: SocketAddr) -> String {
    format!(
        "[sink]\ntype = \"webhook\"\nurl = \"http://{addr}/hooks/{{aggregate_type}}\"\n\
             signing_secret = \"{SECRET}\"\nconnect_timeout_secs = 1\nrequest_timeout_secs = 5\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_while_messages_flow_loses_nothing_and_the_inbox_applies_all_in_order() {
    let addr = free_addr();
    let receiver = Receiver::new(0);
    let _serving = receiver.serve(addr).await;
    let e2e = pg_to_webhook(8, addr).await;
    let producing = e2e.produce(100, 30, 4);
    let (relay, mut logs) = kill_nine_repeatedly(&e2e.scenario, 5).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 3_000);
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    receiver.report(&produced).assert_perfect_after_inbox();
    logs.push_str(&relay.logs());
    assert!(
        logs.contains("Unclean"),
        "no takeover after a kill:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_a_receiver_that_is_down_at_start_and_fails_now_and_then() {
    let addr = free_addr();
    let e2e = pg_to_webhook(8, addr).await;
    let a = e2e.scenario.relay("relay-a");
    let b = e2e.scenario.relay("relay-b");
    e2e.scenario.wait_for_shares(2, 4).await;
    let producing = e2e.produce(60, 30, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(e2e.scenario.backlog() > 0, "nothing can be delivered yet");

    // Back mid-run, answering every 7th request with 500.
    let receiver = Receiver::new(7);
    let _serving = receiver.serve(addr).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    a.kill_nine();
    let produced = producing.await.unwrap();
    e2e.scenario.wait_for_shares(1, 8).await;
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    receiver.report(&produced).assert_perfect_after_inbox();
    assert!(
        b.logs().contains("500"),
        "the 500s should show as retried publishes"
    );
    assert!(b.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_blocks_its_partition_with_the_reason_in_ferry_status_until_accepted() {
    let addr = free_addr();
    let receiver = Receiver::new(0);
    receiver.inbox.lock().unwrap().refuse.insert(
        "0".into(),
        (StatusCode::BAD_REQUEST, "unknown account 0".into()),
    );
    let _serving = receiver.serve(addr).await;
    let e2e = pg_to_webhook(1, addr).await;
    let produced = e2e.produce(3, 5, 1).await.unwrap();
    let relay = e2e.scenario.relay("relay");
    let reason = e2e.scenario.wait_blocked(0, &relay).await;
    assert!(
        reason.contains("400 Bad Request") && reason.contains("unknown account 0"),
        "{reason}"
    );
    // The first message of aggregate 0 is first in the partition: nothing is delivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(e2e.scenario.backlog(), 15);
    assert!(receiver.inbox.lock().unwrap().received.is_empty());

    // The receiver accepts now: the blocked partition is retried (retry_max 1 s), drains,
    // and its blocked reason clears.
    receiver.inbox.lock().unwrap().refuse.clear();
    e2e.scenario.wait_drained(Duration::from_secs(30)).await;
    let status = e2e.scenario.status();
    assert!(status[0]["blocked_reason"].is_null(), "{status:?}");
    let report = receiver.report(&produced);
    report.assert_perfect_after_inbox();
    assert_eq!(
        (report.out_of_order, report.duplicates),
        (0, 0),
        "{report:?}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

/// `ferry <args> --json` (or without JSON output) in `e2e`'s config; fails on a non-zero exit.
fn ferry_ok(e2e: &PgScenario, args: &[&str]) -> String {
    let output = e2e.scenario.ferry(args);
    assert!(
        output.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_skips_the_rejected_message_and_requeues_it_later() {
    let addr = free_addr();
    let receiver = Receiver::new(0);
    receiver.inbox.lock().unwrap().refuse.insert(
        "0/1".into(),
        (StatusCode::BAD_REQUEST, "unknown account 0".into()),
    );
    let _serving = receiver.serve(addr).await;
    // Blocked retries every 30 s: only the operator's skip lets the partition go on soon.
    let e2e = PgScenario::new(&unique_tag(), 1, &webhook_sink(addr), "").await;
    let relay_config =
        e2e.scenario
            .config_variant("slow-retry", "retry_max_ms = 1000", "retry_max_ms = 30000");
    let produced = e2e.produce(3, 5, 1).await.unwrap();
    let relay = e2e.scenario.relay_with_config("relay", &relay_config);
    e2e.scenario.wait_blocked(0, &relay).await;

    let blocked: serde_json::Value =
        serde_json::from_str(&ferry_ok(&e2e, &["blocked", "--json"])).unwrap();
    let head = &blocked[0]["head"];
    assert_eq!(blocked[0]["partition"], 0, "{blocked}");
    assert!(
        blocked[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown account 0")
    );
    assert!(blocked[0]["since"].is_string(), "{blocked}");
    assert_eq!(
        (head["aggregate_id"].as_str(), head["version"].as_u64()),
        (Some("0"), Some(1))
    );
    let skipped = head["id"].as_str().unwrap().to_owned();

    ferry_ok(
        &e2e,
        &[
            "skip",
            "--message",
            &skipped,
            "--reason",
            "account 0 is unknown",
            "--by",
            "ops",
        ],
    );
    e2e.scenario.wait_drained(Duration::from_secs(20)).await;
    let parked: serde_json::Value =
        serde_json::from_str(&ferry_ok(&e2e, &["parked", "--json"])).unwrap();
    assert_eq!(parked[0]["message"]["id"], skipped.as_str(), "{parked}");
    assert_eq!(parked[0]["parked_by"], "ops");
    assert_eq!(parked[0]["holds_aggregate"], false);
    {
        let inbox = receiver.inbox.lock().unwrap();
        let skipped = Uuid::parse_str(&skipped).unwrap();
        let rest: HashSet<Uuid> = produced
            .iter()
            .copied()
            .filter(|id| *id != skipped)
            .collect();
        let report = Report::of(inbox.received.clone(), &rest);
        assert_eq!(
            (report.missing, report.duplicates, report.out_of_order),
            (0, 0, 0),
            "everything but the skipped message, in order: {report:?}"
        );
    }
    assert!(
        e2e.scenario.status()[0]["blocked_reason"].is_null(),
        "unblocked once the partition moved on"
    );

    receiver.inbox.lock().unwrap().refuse.clear();
    ferry_ok(
        &e2e,
        &[
            "requeue-parked",
            "--aggregate-type",
            "account",
            "--aggregate-id",
            "0",
        ],
    );
    e2e.scenario.wait_drained(Duration::from_secs(20)).await;
    assert!(
        receiver
            .inbox
            .lock()
            .unwrap()
            .received
            .iter()
            .any(|m| m.id.to_string() == skipped)
    );
    let none = e2e.scenario.ferry(&["unblock", "--partition", "0"]);
    assert!(
        !none.status.success(),
        "partition 0 is not blocked any more"
    );
    assert!(String::from_utf8_lossy(&none.stderr).contains("not blocked"));
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_aggregate_parks_the_rejected_aggregate_in_order_while_the_rest_flows() {
    let addr = free_addr();
    let receiver = Receiver::new(0);
    receiver.inbox.lock().unwrap().refuse.insert(
        "1".into(),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "account 1 is closed".into(),
        ),
    );
    let _serving = receiver.serve(addr).await;
    let e2e = PgScenario::new(&unique_tag(), 1, &webhook_sink(addr), "").await;
    let relay_config = e2e.scenario.config_variant(
        "park",
        "[relay]\n",
        "[relay]\non_permanent_failure = \"park-aggregate\"\n",
    );
    let produced = e2e.produce(4, 6, 1).await.unwrap();
    let relay = e2e.scenario.relay_with_config("relay", &relay_config);
    e2e.scenario.wait_drained(Duration::from_secs(20)).await;
    let parked: serde_json::Value =
        serde_json::from_str(&ferry_ok(&e2e, &["parked", "--json"])).unwrap();
    let versions: Vec<u64> = parked
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["message"]["aggregate_id"], "1");
            assert_eq!(p["holds_aggregate"], true);
            assert!(
                p["reason"]
                    .as_str()
                    .unwrap()
                    .contains("account 1 is closed")
            );
            p["message"]["version"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4, 5, 6],
        "the whole aggregate, in order"
    );
    assert!(
        e2e.scenario.status()[0]["blocked_reason"].is_null(),
        "not blocked"
    );
    {
        let received = &receiver.inbox.lock().unwrap().received;
        assert!(received.iter().all(|m| m.aggregate_id != "1"));
        assert_eq!(received.len(), 18, "the other aggregates flowed");
    }

    receiver.inbox.lock().unwrap().refuse.clear();
    ferry_ok(
        &e2e,
        &[
            "requeue-parked",
            "--aggregate-type",
            "account",
            "--aggregate-id",
            "1",
        ],
    );
    e2e.scenario.wait_drained(Duration::from_secs(20)).await;
    let report = receiver.report(&produced);
    report.assert_perfect_after_inbox();
    assert_eq!(
        (report.out_of_order, report.duplicates),
        (0, 0),
        "{report:?}"
    );
    assert!(relay.logs().contains("parked it with its aggregate"));
    assert!(relay.terminate(Duration::from_secs(15)).success());
}
