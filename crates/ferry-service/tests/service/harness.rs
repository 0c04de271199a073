//! A service on a real store with a real relay to a real NATS stream, served over real
//! HTTP on 127.0.0.1:0; a producer's check_url server; helpers to read the stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::nats::{NatsSink, NatsSinkConfig};
use ferry::postgres::PgOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::sqlite::SqliteOutbox;
use ferry::{LeaseStore, OutboxAdmin, OutboxStore, ReceivedMessage, Relay, RelayConfig};
use ferry_core::testing::services;
use ferry_service::auth::Scope;
use ferry_service::store::AckPolicy;
use ferry_service::{
    PgServiceStore, Service, ServiceSettings, ServiceStore, SqliteServiceStore, Status, Tokens,
};

pub(crate) const PRODUCER: &str = "producer-token-0123456789";
pub(crate) const CONSUMER: &str = "consumer-token-0123456789";
pub(crate) const ADMIN: &str = "admin-token-0123456789";

pub(crate) const PARTITIONS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

pub(crate) fn tokens() -> Tokens {
    Tokens::new([
        (
            "producer".to_owned(),
            PRODUCER.to_owned().into(),
            vec![Scope::Producer],
        ),
        (
            "consumer".to_owned(),
            CONSUMER.to_owned().into(),
            vec![Scope::Consumer],
        ),
        (
            "admin".to_owned(),
            ADMIN.to_owned().into(),
            vec![Scope::Admin],
        ),
    ])
}

/// Settings that make every loop quick: 50 ms polls, short timeouts.
pub(crate) fn fast_settings() -> ServiceSettings {
    ServiceSettings {
        max_payload_bytes: 64 * 1024,
        prepare_timeout: Duration::from_secs(30),
        check_timeout: Duration::from_secs(2),
        max_checks: 3,
        check_backoff_initial: Duration::from_millis(50),
        check_backoff_max: Duration::from_millis(200),
        check_concurrency: 8,
        check_bearer_token: None,
        ack: AckPolicy {
            ack_timeout: Duration::from_secs(30),
            ack_timeout_max: Duration::from_secs(60),
            max_deliveries: 3,
        },
        poll_interval: Duration::from_millis(50),
        finished_retention: Duration::from_secs(3600),
    }
}

/// The test's database: ferry's outbox, which is also the lease store and the service's.
enum Db {
    Postgres(Arc<PgOutbox>),
    Sqlite(Arc<SqliteOutbox>),
}

/// One store seen through each of the contracts the service and its relay use.
struct Parts {
    store: Arc<dyn ServiceStore>,
    outbox: Arc<dyn OutboxStore>,
    leases: Arc<dyn LeaseStore>,
    admin: Arc<dyn OutboxAdmin>,
}

impl Db {
    fn parts(&self) -> Parts {
        match self {
            Db::Postgres(pg) => Parts {
                store: Arc::new(PgServiceStore::new(Arc::clone(pg))),
                outbox: pg.clone(),
                leases: pg.clone(),
                admin: pg.clone(),
            },
            Db::Sqlite(sqlite) => Parts {
                store: Arc::new(SqliteServiceStore::new(Arc::clone(sqlite))),
                outbox: sqlite.clone(),
                leases: sqlite.clone(),
                admin: sqlite.clone(),
            },
        }
    }
}

/// The tables and the stream of one test, and the relay moving between them.
pub(crate) struct Backing {
    pub(crate) store: Arc<dyn ServiceStore>,
    pub(crate) outbox: Arc<dyn OutboxStore>,
    pub(crate) admin: Arc<dyn OutboxAdmin>,
    pub(crate) stream: String,
    prefix: TablePrefix,
    db: Db,
    relay_stop: CancellationToken,
    relay: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Backing {
    /// Fresh tables (PostgreSQL: a unique prefix; SQLite: a new file), migrated, with a
    /// relay publishing to a stream of the test's own.
    pub(crate) async fn new(backend: Backend) -> Self {
        let tag = Uuid::now_v7().simple().to_string()[18..].to_owned();
        let prefix = TablePrefix::new(format!("s{tag}_")).expect("valid prefix");
        let settings = StoreSettings {
            table_prefix: prefix.clone(),
            max_payload_bytes: 1024 * 1024,
            ..StoreSettings::default()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let db = match backend {
            Backend::Postgres => {
                let outbox = PgOutbox::connect(&services::postgres_url(), 16, settings)
                    .await
                    .expect("connect to PostgreSQL");
                outbox.migrate(PARTITIONS).await.expect("migrate outbox");
                Db::Postgres(Arc::new(outbox))
            }
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
                let outbox = SqliteOutbox::connect(&url, 4, settings)
                    .await
                    .expect("open SQLite");
                outbox.migrate(PARTITIONS).await.expect("migrate outbox");
                Db::Sqlite(Arc::new(outbox))
            }
        };
        let Parts {
            store,
            outbox,
            leases,
            admin,
        } = db.parts();
        store.migrate().await.expect("migrate service");
        store.migrate().await.expect("migrate is idempotent");
        let stream = format!("SVC_{tag}");
        let sink = NatsSink::connect(&NatsSinkConfig {
            url: services::nats_url(),
            stream: stream.clone(),
            subjects: vec![format!("svc{tag}.>")],
            subject_template: format!("svc{tag}.{{aggregate_type}}.{{event_type}}"),
            ..NatsSinkConfig::default()
        })
        .await
        .expect("connect to NATS");
        let mut config = RelayConfig::new(format!("relay-{tag}"));
        config.poll_interval = Duration::from_millis(50);
        config.lease_ttl = Duration::from_secs(3);
        config.retry_initial = Duration::from_millis(20);
        config.retry_max = Duration::from_millis(500);
        let relay = Relay::new(Arc::clone(&outbox), leases, Arc::new(sink), config);
        let relay_stop = CancellationToken::new();
        let stop = relay_stop.clone();
        let relay = tokio::spawn(async move {
            relay.run(stop).await.expect("relay runs");
        });
        Self {
            store,
            outbox,
            admin,
            stream,
            prefix,
            db,
            relay_stop,
            relay: Some(relay),
            _dir: dir,
        }
    }

    /// Rows of the outbox holding message `id` (published or not).
    pub(crate) async fn outbox_rows(&self, id: Uuid) -> i64 {
        let sql = self
            .prefix
            .render("SELECT count(*) FROM {p}outbox WHERE id = $1");
        match &self.db {
            Db::Postgres(pg) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_one(pg.pool())
                .await
                .expect("count outbox rows"),
            Db::Sqlite(sqlite) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_one(sqlite.pool())
                .await
                .expect("count outbox rows"),
        }
    }

    /// Waits until the relay has published everything in the outbox.
    pub(crate) async fn wait_drained(&self) {
        wait_for("outbox drained", Duration::from_secs(30), || async {
            let status = self.outbox.status().await.expect("status");
            status.iter().all(|p| p.backlog == 0)
        })
        .await;
    }

    /// Every message in the stream, oldest first, with its NATS headers.
    pub(crate) async fn stream_messages(&self) -> Vec<StreamMessage> {
        read_stream(&self.stream).await
    }

    pub(crate) async fn status(&self, id: Uuid) -> Status {
        self.store
            .get(id)
            .await
            .expect("get")
            .expect("message exists")
            .status
    }

    /// Stops the relay: confirmed messages stay in the outbox, unpublished.
    pub(crate) async fn stop_relay(&mut self) {
        self.relay_stop.cancel();
        if let Some(relay) = self.relay.take() {
            relay.await.expect("relay stops");
        }
    }

    pub(crate) async fn stop(mut self) {
        self.stop_relay().await;
        let client = async_nats::connect(services::nats_url())
            .await
            .expect("nats");
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&self.stream)
            .await;
    }
}

/// A message read back from the stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamMessage {
    pub(crate) received: ReceivedMessage,
    pub(crate) headers: HashMap<String, String>,
}

pub(crate) async fn read_stream(stream: &str) -> Vec<StreamMessage> {
    let client = async_nats::connect(services::nats_url())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.expect("stream exists");
    let total = stream.get_info().await.expect("info").state.messages;
    if total == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read in time")
            .expect("a message")
            .expect("readable");
        let headers: HashMap<String, String> = message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| (k.to_string(), v.as_str().to_owned()))
            })
            .collect();
        let received = ReceivedMessage::from_binary(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            message.payload.clone(),
        )
        .expect("a CloudEvent");
        out.push(StreamMessage { received, headers });
    }
    out
}

/// Polls `condition` every 25 ms until it holds; fails the test after `timeout`.
pub(crate) async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A running service (HTTP API and loops) over a [`Backing`].
pub(crate) struct Server {
    pub(crate) base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) async fn start(backing: &Backing, settings: ServiceSettings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let service = Service::new(Arc::clone(&backing.store), settings, tokens())
            .with_outbox_metrics(Arc::clone(&backing.outbox))
            .with_operations(Arc::clone(&backing.admin));
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            service.run(listener, token).await.expect("service runs");
        });
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop,
            task: Some(task),
        }
    }

    /// A request with an optional bearer token and JSON body; the status and JSON answer
    /// (`Value::Null` when the body is not JSON).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(serde_json::to_vec(body).expect("serialises"));
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    pub(crate) async fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, None).await
    }

    pub(crate) async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
            .text()
            .await
            .expect("text")
    }

    /// Prepares a message for aggregate `aggregate_id`; returns its id.
    pub(crate) async fn prepare(&self, aggregate_id: &str, check_url: &str) -> Uuid {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/messages",
                Some(PRODUCER),
                Some(&prepare_body(aggregate_id, check_url)),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").parse().expect("a UUID")
    }

    pub(crate) async fn message(&self, id: Uuid) -> Value {
        let (status, body) = self.get(&format!("/v1/messages/{id}"), Some(ADMIN)).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub(crate) async fn wait_status(&self, id: Uuid, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let body = self.message(id).await;
            if body["status"] == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} never became {status}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("service stops");
        }
    }
}

pub(crate) fn prepare_body(aggregate_id: &str, check_url: &str) -> Value {
    json!({
        "aggregate_type": "order",
        "aggregate_id": aggregate_id,
        "event_type": "order.paid",
        "payload": {"order": aggregate_id, "total": 10},
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "check_url": check_url,
    })
}

/// What the producer's check_url answers for an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    Committed,
    RolledBack,
    Unknown,
    /// HTTP 500.
    Fail,
}

#[derive(Default)]
struct CheckState {
    replies: HashMap<Uuid, Reply>,
    hits: HashMap<Uuid, u32>,
    authorizations: Vec<Option<String>>,
}

/// A producer's check-back endpoint: answers per id (default `unknown`) and counts hits.
#[derive(Clone)]
pub(crate) struct CheckServer {
    pub(crate) url: String,
    pub(crate) addr: SocketAddr,
    state: Arc<Mutex<CheckState>>,
    stop: CancellationToken,
}

async fn answer(
    State(state): State<Arc<Mutex<CheckState>>>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let Some(id) = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v.parse::<Uuid>().ok())
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let reply = {
        let mut state = state.lock().expect("lock");
        *state.hits.entry(id).or_default() += 1;
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        state.authorizations.push(auth);
        state.replies.get(&id).copied().unwrap_or(Reply::Unknown)
    };
    let status = match reply {
        Reply::Committed => "committed",
        Reply::RolledBack => "rolled_back",
        Reply::Unknown => "unknown",
        Reply::Fail => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    axum::Json(json!({ "status": status })).into_response()
}

impl CheckServer {
    pub(crate) async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address")).await
    }

    /// Listens on `addr` (to bring a producer back on the port it had).
    pub(crate) async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind check server");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(CheckState::default()));
        let router = axum::Router::new()
            .route("/check", axum::routing::get(answer))
            .with_state(Arc::clone(&state));
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Self {
            url: format!("http://{addr}/check"),
            addr,
            state,
            stop,
        }
    }

    pub(crate) fn reply(&self, id: Uuid, reply: Reply) {
        self.state.lock().expect("lock").replies.insert(id, reply);
    }

    pub(crate) fn hits(&self, id: Uuid) -> u32 {
        self.state
            .lock()
            .expect("lock")
            .hits
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn all_hits(&self) -> HashMap<Uuid, u32> {
        self.state.lock().expect("lock").hits.clone()
    }

    pub(crate) fn authorizations(&self) -> Vec<Option<String>> {
        self.state.lock().expect("lock").authorizations.clone()
    }

    /// Stops listening: the producer is down.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}
