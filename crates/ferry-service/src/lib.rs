//! ferry's reliable message service (`ferry serve`): transactional messages over HTTP for
//! producers that cannot write ferry's outbox in their own database transaction.
//!
//! 1. `POST /v1/messages` stores a **prepared** message; the producer runs its local
//!    transaction, then `POST /v1/messages/{id}/confirm` (or `/cancel`).
//! 2. Confirming moves the message to **confirmed** and enqueues it into ferry's outbox in
//!    the same database transaction, so the relay publishes it like any outbox message
//!    (G1–G6 hold); once published it is **delivered**.
//! 3. A message still prepared after `prepare_timeout_secs` is **checked back** on its
//!    `check_url` ([`checkback`]); inconclusive checks retry with backoff up to
//!    `max_checks`, then the message is **check_failed** until an operator acts.
//! 4. The consumer acks (`POST /v1/messages/{id}/ack`, **completed**); a delivered message
//!    not acked within `ack_timeout_secs` is redelivered with the same id and version,
//!    up to `max_deliveries`, then **dead_lettered**; `POST /v1/messages/{id}/retry` puts
//!    a check_failed or dead-lettered message back.
//!
//! The state machine ([`state`]) is enforced by the store ([`store`]): every transition
//! is a conditional update in one transaction, so concurrent requests, check-backs and
//! redeliveries (also from several `ferry serve` instances) cannot both win. Consumers
//! dedup redeliveries with ferry's inbox: a redelivery keeps the message id and version.

pub mod api;
pub mod auth;
pub mod checkback;
pub mod config;
pub mod dashboard;
mod loops;
pub mod metrics;
pub mod state;
pub mod store;

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use ferry::ErrorChain;
use ferry::{OutboxAdmin, OutboxStore};

pub use api::{OPENAPI_JSON, ROUTES};
pub use auth::{Scope, Tokens};
pub use config::{InvalidServiceConfig, ServiceConfig, ServiceSettings, TokenConfig};
pub use dashboard::{Dashboard, DashboardConfig};
pub use metrics::Metrics;
pub use state::{Status, Transition};
pub use store::{PgServiceStore, ServiceStore, SqliteServiceStore};

/// What the request handlers and the loops share.
struct Shared {
    store: Arc<dyn ServiceStore>,
    settings: ServiceSettings,
    tokens: Tokens,
    metrics: Arc<Metrics>,
    outbox: Option<Arc<dyn OutboxStore>>,
    /// The process's metrics (the in-process relay's), rendered after the service's.
    process_metrics: Option<PrometheusHandle>,
    /// The outbox's operations, for the `/v1/ops` routes.
    admin: Option<Arc<dyn OutboxAdmin>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Shared {
    async fn render_metrics(&self) -> String {
        let stats = match self.store.stats().await {
            Ok(stats) => Some(stats),
            Err(err) => {
                warn!(error = %ErrorChain(&err), "metrics: store unreachable");
                None
            }
        };
        let outbox = match &self.outbox {
            Some(outbox) => outbox.status().await.ok(),
            None => None,
        };
        self.metrics.render(
            stats.as_ref(),
            outbox.as_deref(),
            self.process_metrics.as_ref(),
        )
    }
}

#[async_trait]
impl dashboard::MetricsSource for Shared {
    async fn render(&self) -> String {
        self.render_metrics().await
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("cannot build the check-back HTTP client")]
    CheckClient(#[source] reqwest::Error),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// The HTTP API plus the check-back and maintenance loops over one store.
#[derive(Debug)]
pub struct Service {
    shared: Shared,
    dashboard: Option<Dashboard>,
}

impl Service {
    pub fn new(store: Arc<dyn ServiceStore>, settings: ServiceSettings, tokens: Tokens) -> Self {
        Self {
            shared: Shared {
                store,
                settings,
                tokens,
                metrics: Arc::default(),
                outbox: None,
                process_metrics: None,
                admin: None,
            },
            dashboard: None,
        }
    }

    /// Exports the outbox's per-partition backlog, oldest unpublished age and blocked state.
    pub fn with_outbox_metrics(mut self, outbox: Arc<dyn OutboxStore>) -> Self {
        self.shared.outbox = Some(outbox);
        self
    }

    /// Appends the process's registry to `/metrics`: where the relay records when it runs
    /// in this process.
    pub fn with_process_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.shared.process_metrics = Some(handle);
        self
    }

    /// Serves the outbox's operations (blocked partitions, skip, parked messages) under
    /// `/v1/ops`, to admin tokens.
    pub fn with_operations(mut self, admin: Arc<dyn OutboxAdmin>) -> Self {
        self.shared.admin = Some(admin);
        self
    }

    /// Serves `dashboard` under `/dashboard`, with this service's transactions and metrics.
    pub fn with_dashboard(mut self, dashboard: Dashboard) -> Self {
        self.dashboard = Some(dashboard);
        self
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Serves the API on `listener` and runs the loops until `shutdown` is cancelled; then
    /// finishes in-flight requests and check-backs and returns.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServiceError> {
        let settings = self.shared.settings.clone();
        let client = checkback::CheckClient::new(
            settings.check_timeout,
            settings.check_bearer_token.clone(),
        )
        .map_err(ServiceError::CheckClient)?;
        let store = Arc::clone(&self.shared.store);
        let metrics = self.metrics();
        let checks = tokio::spawn(checkback::run(
            Arc::clone(&store),
            client,
            settings.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
        let maintenance = tokio::spawn(loops::run(store, settings, metrics, shutdown.clone()));
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "service listening");
        }
        let shared = Arc::new(self.shared);
        let mut router: Router = api::router(Arc::clone(&shared));
        if let Some(dashboard) = self.dashboard {
            let dashboard = dashboard
                .with_service(Arc::clone(&shared.store))
                .with_metrics(shared);
            router = router.merge(dashboard.into_router(shutdown.clone()));
        }
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await;
        // Stops the loops if the server failed on its own.
        shutdown.cancel();
        for task in [checks, maintenance] {
            if let Err(err) = task.await {
                warn!(error = %ErrorChain(&err), "a service loop panicked");
            }
        }
        info!("service stopped");
        served.map_err(ServiceError::Serve)
    }
}
