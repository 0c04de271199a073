//! HTTP webhook sink against a real HTTP server run by each test (axum on 127.0.0.1),
//! answering as the test scripts it: wire format and signature, retries on 500 and 429
//! with `Retry-After`, a 400 that blocks the partition under a real relay, and a receiver
//! that is down when the relay starts.
#![cfg(all(feature = "webhook", feature = "sqlite"))]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes as BodyBytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use bytes::Bytes;
use hmac::Mac as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::sql::StoreSettings;
use ferry::sqlite::SqliteOutbox;
use ferry::webhook::signature::{SigningKey, verify};
use ferry::webhook::{WebhookSink, WebhookSinkConfig, received_message};
use ferry::{Message, NewMessage, OutboxStore, Relay, RelayConfig, Sink};

mod common;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SECRET: &str = "a-shared-secret-of-more-than-24-bytes";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn decode(&self) -> Result<ferry::ReceivedMessage> {
        Ok(received_message(
            self.headers
                .iter()
                .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))),
            self.body.clone(),
        )?)
    }
}

/// What the receiver answers: scripted answers first, then `fallback`.
type Answer = (StatusCode, Vec<(&'static str, String)>, String);

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    /// Answers for requests whose `ce-subject` (aggregate id) is listed.
    by_aggregate: BTreeMap<String, Answer>,
    received: Vec<Received>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Script>>);

impl Receiver {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn received(&self) -> Vec<Received> {
        self.script().received.clone()
    }

    /// Serves on `addr` (port 0 for any) until the token is cancelled; returns the address.
    async fn serve(&self, addr: SocketAddr, stop: CancellationToken) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(bound)
    }
}

async fn handle(
    State(receiver): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: BodyBytes,
) -> impl IntoResponse {
    let mut script = receiver.script();
    let subject = headers
        .get("ce-subject")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    script.received.push(Received {
        uri,
        headers,
        body,
        at: Instant::now(),
    });
    let (status, extra, text) = script
        .by_aggregate
        .get(&subject)
        .cloned()
        .or_else(|| script.answers.pop_front())
        .unwrap_or((StatusCode::OK, Vec::new(), String::new()));
    let mut response = (status, text).into_response();
    for (name, value) in extra {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn message(aggregate_id: &str, version: u64) -> Message {
    common::order_message(aggregate_id, version, 2)
}

fn config(addr: SocketAddr, path: &str) -> WebhookSinkConfig {
    WebhookSinkConfig {
        url: format!("http://{addr}{path}"),
        connect_timeout_secs: 1,
        request_timeout_secs: 5,
        ..WebhookSinkConfig::default()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test]
async fn binary_mode_headers_idempotency_key_and_a_signature_that_verifies() -> Result {
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let addr = receiver.serve("127.0.0.1:0".parse()?, stop).await?;
    let sink = WebhookSink::new(&WebhookSinkConfig {
        signing_secret: Some(SECRET.to_owned().into()),
        bearer_token: Some("t0ken".to_owned().into()),
        ..config(addr, "/hook/{aggregate_type}?aggregate={aggregate_id}")
    })?;
    let batch = vec![message("a 1/é", 1), message("a 1/é", 2)];
    for outcome in sink.publish(&batch).await {
        outcome?;
    }
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    for (sent, request) in batch.iter().zip(&received) {
        assert_eq!(request.uri.path(), "/hook/order");
        assert_eq!(request.uri.query(), Some("aggregate=a%201%2F%C3%A9"));
        let id = sent.id.to_string();
        assert_eq!(request.header("ce-id"), Some(id.as_str()));
        assert_eq!(request.header("ce-specversion"), Some("1.0"));
        assert_eq!(request.header("ce-type"), Some("order.paid"));
        assert_eq!(request.header("ce-source"), Some("ferry://order"));
        // Outside printable ASCII, values are percent-encoded (CloudEvents HTTP binding).
        assert_eq!(request.header("ce-subject"), Some("a%201/%C3%A9"));
        assert_eq!(
            request.header("content-type"),
            Some("application/vnd.shop+json")
        );
        assert_eq!(request.header("idempotency-key"), Some(id.as_str()));
        assert_eq!(request.header("authorization"), Some("Bearer t0ken"));
        assert_eq!(
            request.header("traceparent").map(str::to_owned),
            sent.headers.get("traceparent").cloned()
        );

        let decoded = request.decode()?;
        assert_eq!(decoded.id, sent.id);
        assert_eq!(decoded.aggregate_id, "a 1/é");
        assert_eq!(decoded.version, sent.version);
        assert_eq!(decoded.partition_key, sent.partition_key);
        assert_eq!(decoded.time, Some(sent.created_at));
        assert_eq!(decoded.payload, sent.payload);

        // The signature, checked by the library helper and recomputed by hand as a
        // receiver in another language would.
        let key = SigningKey::from_secret(SECRET).map_err(|e| e.to_string())?;
        let lookup = |name: &str| request.header(name);
        verify(
            &key,
            lookup,
            &request.body,
            unix_now(),
            Duration::from_secs(300),
        )?;
        assert!(
            verify(
                &key,
                lookup,
                b"tampered",
                unix_now(),
                Duration::from_secs(300)
            )
            .is_err()
        );
        let timestamp = request.header("webhook-timestamp").ok_or("no timestamp")?;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(SECRET.as_bytes())?;
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(&request.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(request.header("webhook-signature"), Some(expected.as_str()));
        assert_eq!(request.header("webhook-id"), Some(id.as_str()));
    }
    Ok(())
}

#[tokio::test]
async fn a_500_is_retried_a_429_retry_after_is_honoured_and_a_400_is_permanent() -> Result {
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let addr = receiver.serve("127.0.0.1:0".parse()?, stop).await?;
    let sink = WebhookSink::new(&config(addr, "/hook"))?;
    let batch = vec![message("1", 1), message("1", 2)];
    receiver.script().answers.extend([
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Vec::new(),
            "db down".into(),
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", "2".into())],
            String::new(),
        ),
    ]);

    let outcomes = sink.publish(&batch).await;
    let first = outcomes[0].as_ref().expect_err("500");
    assert!(first.is_retryable(), "{first}");
    assert!(
        first.to_string().contains("500") && first.to_string().contains("db down"),
        "{first}"
    );
    assert!(outcomes[1].as_ref().expect_err("not sent").is_retryable());
    assert_eq!(
        receiver.received().len(),
        1,
        "nothing is sent after a failure"
    );

    let outcomes = sink.publish(&batch).await;
    assert!(outcomes[0].as_ref().expect_err("429").is_retryable());
    let limited_at = receiver.received()[1].at;

    // The next attempt waits out the Retry-After, then both pass.
    for outcome in sink.publish(&batch).await {
        outcome?;
    }
    let received = receiver.received();
    assert_eq!(received.len(), 4);
    let waited = received[2].at.duration_since(limited_at);
    assert!(
        waited >= Duration::from_millis(1900),
        "retried after {waited:?}"
    );
    // Every attempt of a message carries the same Idempotency-Key.
    let keys: Vec<_> = received[..3]
        .iter()
        .map(|r| r.header("idempotency-key"))
        .collect();
    assert!(
        keys.iter()
            .all(|k| *k == Some(batch[0].id.to_string().as_str())),
        "{keys:?}"
    );

    receiver.script().answers.push_back((
        StatusCode::BAD_REQUEST,
        Vec::new(),
        "unknown\nevent type".into(),
    ));
    let outcomes = sink.publish(&batch[..1]).await;
    let refused = outcomes[0].as_ref().expect_err("400");
    assert!(!refused.is_retryable(), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("400 Bad Request: unknown event type"),
        "{refused}"
    );

    receiver.script().answers.push_back((
        StatusCode::FOUND,
        vec![("location", "http://elsewhere/".into())],
        String::new(),
    ));
    let outcomes = sink.publish(&batch[..1]).await;
    let redirected = outcomes[0].as_ref().expect_err("302");
    assert!(
        !redirected.is_retryable() && redirected.to_string().contains("redirects"),
        "{redirected}"
    );
    Ok(())
}

/// An outbox on a fresh SQLite file, and a relay on it publishing to `sink`.
struct Relayed {
    _dir: tempfile::TempDir,
    outbox: Arc<SqliteOutbox>,
    stop: CancellationToken,
    relay: tokio::task::JoinHandle<std::result::Result<(), ferry::RelayError>>,
    stats: Arc<ferry::RelayStats>,
}

impl Relayed {
    async fn start(sink: WebhookSink, partitions: u32) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
        let outbox = Arc::new(SqliteOutbox::connect(&url, 4, StoreSettings::default()).await?);
        outbox.migrate(partitions).await?;
        let mut relay_config = RelayConfig::new("webhook-test");
        relay_config.batch_size = 50;
        relay_config.poll_interval = Duration::from_millis(50);
        relay_config.retry_initial = Duration::from_millis(20);
        relay_config.retry_max = Duration::from_millis(500);
        relay_config.lease_ttl = Duration::from_secs(3);
        let relay = Relay::new(outbox.clone(), outbox.clone(), Arc::new(sink), relay_config);
        let stats = relay.stats();
        let stop = CancellationToken::new();
        let relay = tokio::spawn(relay.run(stop.clone()));
        Ok(Self {
            _dir: dir,
            outbox,
            stop,
            relay,
            stats,
        })
    }

    async fn enqueue(&self, aggregate: &str, rounds: usize) -> Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        for round in 0..rounds {
            let mut tx = self.outbox.pool().begin().await?;
            let message = NewMessage::new(
                "order",
                aggregate,
                "order.changed",
                format!(r#"{{"r":{round}}}"#),
            );
            ids.push(self.outbox.enqueue(&mut tx, message).await?.id);
            tx.commit().await?;
        }
        Ok(ids)
    }

    async fn wait_until(
        &self,
        what: &str,
        mut done: impl FnMut(&[ferry::PartitionStatus]) -> bool,
    ) -> Result<Vec<ferry::PartitionStatus>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.outbox.status().await?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting until {what}: {status:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> Result {
        self.stop.cancel();
        self.relay.await??;
        Ok(())
    }
}

#[tokio::test]
async fn a_400_blocks_the_partition_with_the_reason_in_status_until_the_receiver_accepts() -> Result
{
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let addr = receiver.serve("127.0.0.1:0".parse()?, stop).await?;
    receiver.script().by_aggregate.insert(
        "bad".into(),
        (
            StatusCode::BAD_REQUEST,
            Vec::new(),
            "schema mismatch".into(),
        ),
    );
    let relayed = Relayed::start(WebhookSink::new(&config(addr, "/hook"))?, 1).await?;
    let bad = relayed.enqueue("bad", 1).await?;
    let after = relayed.enqueue("good", 3).await?;

    let status = relayed
        .wait_until("the partition is blocked", |s| {
            s[0].blocked_reason.is_some()
        })
        .await?;
    let reason = status[0].blocked_reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&bad[0].to_string())
            && reason.contains("400")
            && reason.contains("schema mismatch"),
        "{reason}"
    );
    assert_eq!(status[0].backlog, 4);
    // Later messages of the partition wait behind the rejected one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent: HashSet<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("ce-id").map(str::to_owned))
        .collect();
    assert!(
        after.iter().all(|id| !sent.contains(&id.to_string())),
        "sent past the block"
    );

    // The receiver is fixed: the relay's retry passes, the partition unblocks and drains.
    receiver.script().by_aggregate.clear();
    relayed
        .wait_until("the partition drains", |s| {
            s[0].backlog == 0 && s[0].blocked_reason.is_none()
        })
        .await?;
    let order: Vec<String> = receiver
        .received()
        .iter()
        .filter(|r| r.headers.get("ce-subject").is_some())
        .filter_map(|r| r.header("ce-id").map(str::to_owned))
        .collect();
    let tail: Vec<String> = order[order.len() - 4..].to_vec();
    let expected: Vec<String> = bad.iter().chain(&after).map(Uuid::to_string).collect();
    assert_eq!(tail, expected, "delivered in order once unblocked");
    relayed.stop().await
}

#[tokio::test]
async fn a_receiver_down_at_start_and_back_mid_run_loses_nothing() -> Result {
    // A port nobody listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let relayed = Relayed::start(WebhookSink::new(&config(addr, "/hook"))?, 4).await?;
    let mut produced = BTreeMap::new();
    for aggregate in 0..8 {
        let name = format!("o{aggregate}");
        produced.insert(name.clone(), relayed.enqueue(&name, 40).await?);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let failures = relayed
        .stats
        .publish_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(failures > 0, "the relay never met the closed port");

    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    receiver.serve(addr, stop).await?;
    relayed
        .wait_until("the outbox drains", |s| s.iter().all(|p| p.backlog == 0))
        .await?;

    // Per aggregate, with inbox semantics (drop repeats and stale versions): every
    // version, in order.
    let mut applied: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for request in receiver.received() {
        let message = request.decode()?;
        if !seen.insert(message.id) {
            continue;
        }
        let versions = applied.entry(message.aggregate_id.clone()).or_default();
        assert_eq!(
            message.version,
            versions.len() as u64 + 1,
            "gap or reorder in {}",
            message.aggregate_id
        );
        versions.push(message.id);
    }
    assert_eq!(applied, produced);
    relayed.stop().await
}
