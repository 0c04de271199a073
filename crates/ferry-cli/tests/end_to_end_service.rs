//! The reliable message service as deployed: real `ferry serve` processes (HTTP API,
//! check-backs, redeliveries and the relay) on PostgreSQL or SQLite, publishing to NATS
//! JetStream, killed with SIGKILL between steps and at random moments. Producers and a
//! consumer talk to it over HTTP; the consumer applies messages through ferry's inbox.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{FAST_RELAY, Relay, Report, Scenario, nats_sink_section, unique_tag};
use ferry::message::DELIVERY_ATTEMPT_HEADER;
use ferry::sql::TablePrefix;
use ferry::sqlite::{SqliteInbox, SqliteOutbox};
use ferry::{Admission, Inbox, ReceivedMessage};
use ferry_core::testing::services;

const PRODUCER: &str = "e2e-producer-token-0123456789";
const CONSUMER: &str = "e2e-consumer-token-0123456789";
const ADMIN: &str = "e2e-admin-token-0123456789";
const CHECK_BEARER: &str = "e2e-check-bearer-0123456789";

#[derive(Debug, Clone, Copy)]
enum Store {
    Postgres,
    Sqlite,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `[service]` with quick check-backs and ack timeouts, listening on `port`.
fn service_section(port: u16, extra: &str) -> String {
    format!(
        r#"[service]
listen = "127.0.0.1:{port}"
prepare_timeout_secs = 1
check_timeout_ms = 2000
max_checks = 30
check_backoff_initial_ms = 100
check_backoff_max_ms = 500
check_bearer_token = "{CHECK_BEARER}"
ack_timeout_secs = 2
ack_timeout_max_secs = 4
max_deliveries = 20
poll_interval_ms = 100
{extra}

[[service.tokens]]
name = "producer"
token = "{PRODUCER}"
scopes = ["producer"]

[[service.tokens]]
name = "consumer"
token = "{CONSUMER}"
scopes = ["consumer"]

[[service.tokens]]
name = "admin"
token = "{ADMIN}"
scopes = ["admin"]
"#
    )
}

/// A scenario for `ferry serve`: config, migrated tables, the stream, the HTTP address.
struct Service {
    scenario: Scenario,
    stream: String,
    api: Api,
    _sqlite_dir: tempfile::TempDir,
}

impl Service {
    fn new(store: Store, service_extra: &str) -> Self {
        let tag = unique_tag();
        let sqlite_dir = tempfile::tempdir().unwrap();
        let store_section = match store {
            Store::Postgres => common::pg_store_section(),
            Store::Sqlite => format!(
                "[store]\ntype = \"sqlite\"\npath = \"{}\"\n",
                sqlite_dir.path().join("ferry.db").display()
            ),
        };
        let port = free_port();
        let scenario = Scenario::new(
            &tag,
            &[
                &store_section,
                &common::outbox_section(&tag, 4, ""),
                &nats_sink_section(&tag, 120),
                FAST_RELAY,
                &service_section(port, service_extra),
            ],
        );
        Self {
            scenario,
            stream: common::nats_stream(&tag),
            api: Api::new(format!("http://127.0.0.1:{port}")),
            _sqlite_dir: sqlite_dir,
        }
    }

    /// Starts `ferry serve` and waits until it answers.
    async fn serve(&self, name: &str, log_level: &str) -> Relay {
        let process = self
            .scenario
            .spawn("serve", name, &self.scenario.config, log_level);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(
            self.api
                .try_call(reqwest::Method::GET, "/healthz", None, None)
                .await,
            Ok((200, _))
        ) {
            assert!(
                Instant::now() < deadline,
                "ferry serve did not start:\n{}",
                process.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }

    async fn stream_messages(&self) -> Vec<ReceivedMessage> {
        common::read_nats_stream(&self.stream).await
    }

    async fn cleanup(self) {
        common::delete_nats_stream(&self.stream).await;
    }
}

/// The service's HTTP API, as a client that survives the server being killed.
#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Self { base, http }
    }

    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Retries while the server is down or restarting (connection errors, 5xx): what a
    /// producer or consumer does during an outage.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_call(method.clone(), path, Some(token), body).await {
                Ok((status, value)) if status < 500 => return (status, value),
                outcome => assert!(
                    Instant::now() < deadline,
                    "{method} {path} kept failing: {outcome:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Prometheus text of `GET /metrics`.
    async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    async fn post(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, None).await
    }

    /// Prepares message `id` (the producer's own id, so a retry after a crash is safe).
    async fn prepare(&self, id: Uuid, aggregate_id: &str, check_url: &str) {
        let body = json!({
            "id": id,
            "aggregate_type": "account",
            "aggregate_id": aggregate_id,
            "event_type": "account.changed",
            "payload": {"account": aggregate_id, "id": id},
            "check_url": check_url,
        });
        let (status, answer) = self
            .call(reqwest::Method::POST, "/v1/messages", PRODUCER, Some(&body))
            .await;
        assert!(
            status == 201 || status == 200,
            "prepare {id}: {status} {answer}"
        );
    }

    async fn status(&self, id: Uuid) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/messages/{id}"),
                ADMIN,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["status"].as_str().unwrap().to_owned()
    }

    /// Waits until message `id` satisfies `condition`; returns it.
    async fn wait_until(
        &self,
        id: Uuid,
        timeout: Duration,
        condition: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/messages/{id}"),
                    ADMIN,
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            if condition(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} never got there: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every id in `expected` has its status.
    async fn wait_statuses(&self, expected: &HashMap<Uuid, &str>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (id, want) in expected {
            loop {
                let status = self.status(*id).await;
                if status == *want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "message {id} is {status}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The producers' check_url: answers what each producer's local transaction did.
#[derive(Clone, Default)]
struct Producers {
    outcomes: Arc<Mutex<HashMap<Uuid, bool>>>,
    bearer_seen: Arc<Mutex<HashSet<Option<String>>>>,
}

impl Producers {
    /// Records that the transaction behind `id` committed (or rolled back).
    fn decide(&self, id: Uuid, committed: bool) {
        self.outcomes.lock().unwrap().insert(id, committed);
    }

    async fn serve(self) -> String {
        async fn answer(
            State(producers): State<Producers>,
            headers: axum::http::HeaderMap,
            RawQuery(query): RawQuery,
        ) -> axum::Json<Value> {
            producers.bearer_seen.lock().unwrap().insert(
                headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            let id = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "id")
                .and_then(|(_, v)| v.parse::<Uuid>().ok());
            let outcome = id.and_then(|id| producers.outcomes.lock().unwrap().get(&id).copied());
            let status = match outcome {
                Some(true) => "committed",
                Some(false) => "rolled_back",
                None => "unknown",
            };
            axum::Json(json!({ "status": status }))
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route("/check", axum::routing::get(answer))
            .with_state(self);
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }
}

/// A consumer: a durable JetStream consumer whose messages go through ferry's inbox (the
/// handler records each application, once, in the same transaction) and are then acked
/// to the service and to JetStream.
struct Consumer {
    db: SqliteOutbox,
    _dir: tempfile::TempDir,
}

impl Consumer {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("consumer.db").display());
        let db = SqliteOutbox::connect(&url, 4, Default::default())
            .await
            .unwrap();
        db.migrate(1).await.unwrap();
        sqlx::query("CREATE TABLE applied (id BLOB PRIMARY KEY) STRICT")
            .execute(db.pool())
            .await
            .unwrap();
        Self { db, _dir: dir }
    }

    /// Processes one received message: inbox, then the service ack unless `crash_before_ack`
    /// (a consumer dying after its commit). Returns whether it applied.
    async fn handle(
        &self,
        inbox: &SqliteInbox,
        api: &Api,
        message: &ReceivedMessage,
        crash_before_ack: bool,
    ) -> bool {
        // `admit` and the effect by hand rather than `process` with a closure: this runs
        // in a spawned task, where async closures' lifetimes do not yet prove `Send`.
        let mut tx = self.db.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
        let admission = inbox.admit(&mut tx, message).await.unwrap();
        let applied = matches!(admission, Admission::Apply { .. });
        if applied {
            sqlx::query("INSERT INTO applied (id) VALUES (?1)")
                .bind(message.id)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        if crash_before_ack {
            return applied;
        }
        let (status, body) = api
            .post(&format!("/v1/messages/{}/ack", message.id), CONSUMER)
            .await;
        assert_eq!(status, 200, "ack of {}: {body}", message.id);
        applied
    }

    /// Consumes `stream` until `stop`; returns how many deliveries it handled. The first
    /// delivery of every seventh message is dropped after the inbox commit, unacked (as if
    /// the consumer crashed there): the service redelivers it.
    async fn run(&self, stream: &str, api: &Api, stop: CancellationToken) -> usize {
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        let client = async_nats::connect(services::nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        // The stream appears when the relay first connects.
        let stream = loop {
            if let Ok(stream) = js.get_stream(stream).await {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let consumer = stream
            .get_or_create_consumer(
                "service-consumer",
                pull::Config {
                    durable_name: Some("service-consumer".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let inbox = SqliteInbox::new("billing", &TablePrefix::default());
        let mut handled = 0;
        let mut dropped = HashSet::new();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return handled,
                next = messages.next() => next,
            };
            let message = next.unwrap().unwrap();
            let received = ferry::nats::decode_message(&message).unwrap();
            handled += 1;
            let crash = received.id.as_u128().is_multiple_of(7) && dropped.insert(received.id);
            self.handle(&inbox, api, &received, crash).await;
            if !crash {
                message.ack().await.unwrap();
            }
        }
    }

    async fn applied(&self) -> HashSet<Uuid> {
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM applied")
            .fetch_all(self.db.pool())
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

/// Producers prepare, run their transaction, confirm or cancel, and some die after
/// prepare (check-back settles those); a consumer applies and acks; `ferry serve` is
/// killed with SIGKILL at random moments throughout. In the end every committed message
/// was applied exactly once, no rolled-back one was ever sent, and all are settled.
async fn kill_nine_at_random_moments_loses_and_doubles_nothing(store: Store) {
    let service = Service::new(store, "");
    let producers = Producers::default();
    let check_url = producers.clone().serve().await;
    let mut serve = service.serve("serve-0", "info").await;
    let consumer = Arc::new(Consumer::new().await);
    let stop = CancellationToken::new();
    let consuming = {
        let (consumer, api, stream, stop) = (
            Arc::clone(&consumer),
            service.api.clone(),
            service.stream.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { consumer.run(&stream, &api, stop).await })
    };
    let producing = {
        let (api, producers) = (service.api.clone(), producers.clone());
        tokio::spawn(async move {
            let mut expected = HashMap::new();
            for n in 0..240u32 {
                let id = Uuid::now_v7();
                let committed = n % 5 != 0;
                // Decided up front: check-backs may ask as soon as the message is prepared.
                producers.decide(id, committed);
                api.prepare(id, &format!("acct-{}", n % 30), &check_url)
                    .await;
                if n % 4 != 1 {
                    let action = if committed { "confirm" } else { "cancel" };
                    let (status, body) = api
                        .post(&format!("/v1/messages/{id}/{action}"), PRODUCER)
                        .await;
                    assert_eq!(status, 200, "{action} {id}: {body}");
                }
                expected.insert(id, if committed { "completed" } else { "cancelled" });
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            expected
        })
    };
    let mut logs = String::new();
    for round in 1..=6 {
        tokio::time::sleep(Duration::from_millis(rand::random_range(500..1500))).await;
        serve.kill_nine();
        logs.push_str(&service.scenario.logs(&format!("serve-{}", round - 1)));
        serve = service.serve(&format!("serve-{round}"), "info").await;
    }
    let expected = producing.await.unwrap();
    service
        .api
        .wait_statuses(&expected, Duration::from_secs(120))
        .await;
    stop.cancel();
    let handled = consuming.await.unwrap();

    let committed: HashSet<Uuid> = expected
        .iter()
        .filter(|(_, s)| **s == "completed")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        consumer.applied().await,
        committed,
        "every committed message applied exactly once, nothing else"
    );
    let stream = service.stream_messages().await;
    let sent: HashSet<Uuid> = stream.iter().map(|m| m.id).collect();
    assert!(
        sent.is_subset(&committed),
        "rolled-back messages were sent: {:?}",
        sent.difference(&committed).collect::<Vec<_>>()
    );
    // Copies of one message come only from deliberate redeliveries, each its own attempt:
    // a re-send of the same attempt (after a kill) is dropped by the broker's dedup.
    let mut attempts: HashMap<(Uuid, String), usize> = HashMap::new();
    for message in &stream {
        let attempt = message
            .headers
            .get(DELIVERY_ATTEMPT_HEADER)
            .cloned()
            .unwrap_or_else(|| "1".into());
        *attempts.entry((message.id, attempt)).or_default() += 1;
    }
    let doubled: Vec<_> = attempts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "the same delivery attempt reached the broker twice: {doubled:?}"
    );
    let redelivered = attempts.keys().filter(|(_, a)| a != "1").count();
    assert!(redelivered > 0, "unacked messages were redelivered");
    let report = Report::of(stream, &committed);
    report.assert_perfect_after_inbox();
    eprintln!(
        "{store:?}: {} messages, {} committed; stream {} ({} redeliveries), consumer handled {handled}",
        expected.len(),
        committed.len(),
        report.received,
        redelivered
    );
    logs.push_str(&serve.logs());
    assert!(
        logs.contains("check-back settled the message"),
        "abandoned prepares were settled by check-back:\n{logs}"
    );
    assert!(
        producers
            .bearer_seen
            .lock()
            .unwrap()
            .iter()
            .all(|auth| auth.as_deref() == Some(&format!("Bearer {CHECK_BEARER}"))),
    );
    assert!(
        serve.terminate(Duration::from_secs(15)).success(),
        "SIGTERM exits cleanly"
    );
    service.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill_nine_at_random_moments_loses_and_doubles_nothing() {
    kill_nine_at_random_moments_loses_and_doubles_nothing(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill_nine_at_random_moments_loses_and_doubles_nothing() {
    kill_nine_at_random_moments_loses_and_doubles_nothing(Store::Sqlite).await;
}

/// SIGKILL after every step of the protocol, one step at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_between_every_two_steps() {
    let service = Service::new(Store::Postgres, "");
    let producers = Producers::default();
    let check_url = producers.clone().serve().await;
    let api = &service.api;
    let restart = |serve: Relay, step: &'static str| {
        let service = &service;
        async move {
            serve.kill_nine();
            service.serve(step, "info").await
        }
    };
    let mut serve = service.serve("start", "info").await;
    let [
        confirmed,
        cancelled,
        abandoned_committed,
        abandoned_rolled_back,
    ] = [0, 1, 2, 3].map(|_| Uuid::now_v7());
    producers.decide(confirmed, true);
    producers.decide(cancelled, false);
    producers.decide(abandoned_committed, true);
    producers.decide(abandoned_rolled_back, false);
    for (n, id) in [
        confirmed,
        cancelled,
        abandoned_committed,
        abandoned_rolled_back,
    ]
    .into_iter()
    .enumerate()
    {
        api.prepare(id, &format!("step-{n}"), &check_url).await;
    }
    serve = restart(serve, "after-prepare").await;
    api.post(&format!("/v1/messages/{confirmed}/confirm"), PRODUCER)
        .await;
    api.post(&format!("/v1/messages/{cancelled}/cancel"), PRODUCER)
        .await;
    serve = restart(serve, "after-confirm").await;
    let settled = HashMap::from([
        (confirmed, "delivered"),
        (cancelled, "cancelled"),
        (abandoned_committed, "delivered"),
        (abandoned_rolled_back, "cancelled"),
    ]);
    api.wait_statuses(&settled, Duration::from_secs(60)).await;
    serve = restart(serve, "after-delivery").await;

    let consumer = Consumer::new().await;
    let inbox = SqliteInbox::new("billing", &TablePrefix::default());
    let stream = service.stream_messages().await;
    let first = stream.iter().find(|m| m.id == confirmed).unwrap();
    assert!(consumer.handle(&inbox, api, first, false).await, "applied");
    serve = restart(serve, "after-ack").await;
    assert_eq!(api.status(confirmed).await, "completed");
    // The other delivered message is never acked: it comes back after the ack timeout.
    api.wait_until(abandoned_committed, Duration::from_secs(30), |m| {
        m["deliveries"].as_u64() >= Some(2)
    })
    .await;
    serve = restart(serve, "after-redelivery").await;
    api.wait_until(abandoned_committed, Duration::from_secs(30), |m| {
        m["status"] == "delivered" && m["deliveries"].as_u64() >= Some(2)
    })
    .await;
    let stream = service.stream_messages().await;
    let copies: Vec<&ReceivedMessage> = stream
        .iter()
        .filter(|m| m.id == abandoned_committed)
        .collect();
    assert!(copies.len() >= 2, "redelivered: {copies:?}");
    let applied: Vec<bool> = {
        let mut applied = Vec::new();
        for copy in &copies {
            applied.push(consumer.handle(&inbox, api, copy, false).await);
        }
        applied
    };
    assert_eq!(
        applied.iter().filter(|a| **a).count(),
        1,
        "applied once: {applied:?}"
    );
    assert_eq!(api.status(abandoned_committed).await, "completed");
    let sent: HashSet<Uuid> = stream.iter().map(|m| m.id).collect();
    assert_eq!(sent, HashSet::from([confirmed, abandoned_committed]));
    assert_eq!(
        consumer.applied().await,
        HashSet::from([confirmed, abandoned_committed])
    );
    assert!(serve.terminate(Duration::from_secs(15)).success());
    service.cleanup().await;
}

/// With the relay in the process, `/metrics` carries its series after the service's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_exports_the_metrics_of_its_relay() {
    let service = Service::new(Store::Sqlite, "");
    let producers = Producers::default();
    let check_url = producers.clone().serve().await;
    let serve = service.serve("serve", "info").await;
    let id = Uuid::now_v7();
    service.api.prepare(id, "m1", &check_url).await;
    service
        .api
        .post(&format!("/v1/messages/{id}/confirm"), PRODUCER)
        .await;
    service
        .api
        .wait_statuses(&HashMap::from([(id, "delivered")]), Duration::from_secs(30))
        .await;
    let metrics = service.api.metrics().await;
    for series in [
        "ferry_relay_published_total 1\n",
        "ferry_relay_marked_total 1\n",
        "ferry_relay_commit_to_ack_seconds_count 1\n",
        "ferry_service_delivered_total 1\n",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    assert!(serve.terminate(Duration::from_secs(15)).success());
    service.cleanup().await;
}

/// With `run_relay = false` a separate `ferry relay` moves the service's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_without_relay_works_with_a_separate_relay() {
    let service = Service::new(Store::Postgres, "run_relay = false");
    let producers = Producers::default();
    let check_url = producers.clone().serve().await;
    let serve = service.serve("serve", "info").await;
    let id = Uuid::now_v7();
    service.api.prepare(id, "r1", &check_url).await;
    service
        .api
        .post(&format!("/v1/messages/{id}/confirm"), PRODUCER)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(service.api.status(id).await, "confirmed", "no relay yet");
    let relay = service.scenario.relay("relay");
    service
        .api
        .wait_statuses(&HashMap::from([(id, "delivered")]), Duration::from_secs(30))
        .await;
    let metrics = service.api.metrics().await;
    assert!(
        !metrics.contains("ferry_relay_published_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_service_delivered_total 1"),
        "{metrics}"
    );
    assert!(serve.terminate(Duration::from_secs(15)).success());
    assert!(relay.terminate(Duration::from_secs(15)).success());
    service.cleanup().await;
}

/// At debug level, the log carries no payload, header value, check_url query, bearer
/// token or check-back token, whatever the requests (valid, refused, failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_carry_no_payload_and_no_token() {
    let service = Service::new(Store::Sqlite, "");
    let serve = service.serve("serve", "debug").await;
    let api = &service.api;
    let secrets = [
        "PAYLOAD-SECRET-7f3a",
        "HEADER-SECRET-91c2",
        "URLQUERY-SECRET-44d1",
        "WRONG-TOKEN-SECRET-0123456789",
    ];
    let dead_port = free_port();
    let prepare = |aggregate: &str| {
        json!({
            "aggregate_type": "account",
            "aggregate_id": aggregate,
            "event_type": "account.changed",
            "payload": {"card": secrets[0]},
            "headers": {"x-customer": secrets[1]},
            "check_url": format!("http://127.0.0.1:{dead_port}/check?key={}", secrets[2]),
        })
    };
    // Confirmed, delivered and acked.
    let (_, body) = api
        .call(
            reqwest::Method::POST,
            "/v1/messages",
            PRODUCER,
            Some(&prepare("1")),
        )
        .await;
    let delivered: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    api.post(&format!("/v1/messages/{delivered}/confirm"), PRODUCER)
        .await;
    // Left prepared: its check-backs fail (nobody listens) and are logged.
    let (_, body) = api
        .call(
            reqwest::Method::POST,
            "/v1/messages",
            PRODUCER,
            Some(&prepare("2")),
        )
        .await;
    let abandoned: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    // Refused requests: unknown token, wrong scope, bad body.
    let (status, _) = api
        .try_call(
            reqwest::Method::GET,
            &format!("/v1/messages/{delivered}"),
            Some(secrets[3]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/messages",
            CONSUMER,
            Some(&prepare("3")),
        )
        .await;
    assert_eq!(status, 403);
    let mut bad = prepare("4");
    bad["payload_base64"] = json!(secrets[0]);
    let (status, _) = api
        .call(reqwest::Method::POST, "/v1/messages", PRODUCER, Some(&bad))
        .await;
    assert_eq!(status, 400);
    api.wait_statuses(
        &HashMap::from([(delivered, "delivered")]),
        Duration::from_secs(30),
    )
    .await;
    api.post(&format!("/v1/messages/{delivered}/ack"), CONSUMER)
        .await;
    // At least two failed check-backs of the abandoned message.
    api.wait_until(abandoned, Duration::from_secs(30), |m| {
        m["checks"].as_u64() >= Some(2)
    })
    .await;
    assert!(serve.terminate(Duration::from_secs(15)).success());
    let logs = service.scenario.logs("serve");
    assert!(logs.contains("DEBUG"), "the log is at debug level");
    assert!(
        logs.contains(&delivered.to_string()),
        "message ids are logged"
    );
    assert!(
        logs.contains("request refused: unknown bearer token"),
        "{logs}"
    );
    assert!(
        logs.contains("request failed") || logs.contains("check-back inconclusive"),
        "{logs}"
    );
    for secret in secrets
        .iter()
        .chain(&[PRODUCER, CONSUMER, ADMIN, CHECK_BEARER])
    {
        assert!(
            !logs.contains(secret),
            "{secret} appears in the log:\n{logs}"
        );
    }
    service.cleanup().await;
}

/// `examples/service-producer.sh` (curl) against a real `ferry serve`: a committed local
/// transaction confirms, a failed one cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_script_example_confirms_or_cancels() {
    let service = Service::new(Store::Sqlite, "");
    let serve = service.serve("serve", "info").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/service-producer.sh"
    );
    for (local_transaction, verb, settled) in [
        ("true", "confirmed", "delivered"),
        ("exit 1", "cancelled", "cancelled"),
    ] {
        let output = tokio::process::Command::new("bash")
            .arg(script)
            .arg("77")
            .env("FERRY_URL", &service.api.base)
            .env("FERRY_PRODUCER_TOKEN", PRODUCER)
            .env("CHECK_URL", "http://127.0.0.1:9/check")
            .env("LOCAL_TRANSACTION", local_transaction)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let id: Uuid = stdout
            .trim()
            .strip_prefix(&format!("{verb} "))
            .unwrap_or_else(|| panic!("unexpected output: {stdout}"))
            .parse()
            .unwrap();
        service
            .api
            .wait_statuses(&HashMap::from([(id, settled)]), Duration::from_secs(30))
            .await;
    }
    assert!(serve.terminate(Duration::from_secs(15)).success());
    service.cleanup().await;
}
