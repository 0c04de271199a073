//! The web dashboard: server-rendered pages (maud) of the outbox's partitions, its blocked
//! and parked messages, the reliable message service's transactions and the `/metrics`
//! figures, refreshed in place by a few lines of embedded JavaScript; the operators'
//! actions (retry a blocked partition now, skip a message, requeue parked ones) go through
//! the same functions as `/v1/ops`; a replay of retained messages started and watched
//! from its page (`replay.rs`). No web build and nothing fetched at run time: the
//! script and the stylesheet are compiled into the binary.
//!
//! [`Dashboard`] takes the handles it shows (the outbox's admin and status, optionally the
//! relay's counters, the service's store and a `/metrics` renderer) and gives an axum
//! [`Router`] under `/dashboard`, so any process that has them can mount it.

mod actions;
mod config;
mod history;
mod metrics_text;
mod pages;
mod replay;
mod session;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use ferry::{OutboxAdmin, OutboxStore, RelayStats};

pub use self::config::{DashboardConfig, DashboardSettings, InvalidDashboardConfig};
use self::history::History;
pub use self::replay::ReplaySink;
use self::replay::Replays;
use crate::auth::Tokens;
use crate::store::ServiceStore;

/// Where the dashboard reads the figures `/metrics` exposes (Prometheus text).
#[async_trait]
pub trait MetricsSource: Send + Sync + 'static {
    async fn render(&self) -> String;
}

/// The dashboard of one process: what it shows and who may act.
pub struct Dashboard {
    admin: Arc<dyn OutboxAdmin>,
    outbox: Arc<dyn OutboxStore>,
    tokens: Tokens,
    settings: DashboardSettings,
    relay: Option<Arc<RelayStats>>,
    service: Option<Arc<dyn ServiceStore>>,
    metrics: Option<Arc<dyn MetricsSource>>,
    history: History,
    replay_sink: Option<Arc<dyn ReplaySink>>,
    replays: Replays,
    /// Stops what the dashboard started (a replay) with the process.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("settings", &self.settings)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard of the outbox behind `admin` and `outbox`; actions need an admin-scoped
    /// token of `tokens`.
    pub fn new(
        admin: Arc<dyn OutboxAdmin>,
        outbox: Arc<dyn OutboxStore>,
        tokens: Tokens,
        settings: DashboardSettings,
    ) -> Self {
        let history = History::new(settings.history_samples());
        Self {
            admin,
            outbox,
            tokens,
            settings,
            relay: None,
            service: None,
            metrics: None,
            history,
            replay_sink: None,
            replays: Replays::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Shows the publish rate of the relay running in this process.
    pub fn with_relay(mut self, stats: Arc<RelayStats>) -> Self {
        self.relay = Some(stats);
        self
    }

    /// Shows the reliable message service's transactions.
    pub fn with_service(mut self, store: Arc<dyn ServiceStore>) -> Self {
        self.service = Some(store);
        self
    }

    /// Shows what this process's `/metrics` exposes.
    pub fn with_metrics(mut self, source: Arc<dyn MetricsSource>) -> Self {
        self.metrics = Some(source);
        self
    }

    /// Offers replays of retained messages to the sink `sink` opens.
    pub fn with_replay_sink(mut self, sink: Arc<dyn ReplaySink>) -> Self {
        self.replay_sink = Some(sink);
        self
    }

    /// The routes under `/dashboard`, to merge into the process's router; starts the
    /// sampler of the rate and backlog history, which stops with `shutdown`, as does a
    /// replay started from the page.
    pub fn into_router(mut self, shutdown: CancellationToken) -> Router {
        self.shutdown = shutdown.clone();
        let dashboard = Arc::new(self);
        tokio::spawn(history::sample(Arc::clone(&dashboard), shutdown));
        Router::new()
            .route("/dashboard", get(pages::partitions))
            .route("/dashboard/problems", get(pages::problems))
            .route("/dashboard/transactions", get(pages::transactions))
            .route("/dashboard/metrics", get(pages::metrics))
            .route("/dashboard/replay", get(pages::replay).post(replay::start))
            .route("/dashboard/replay/stop", post(replay::stop))
            .route(
                "/dashboard/login",
                get(session::login_page).post(session::login),
            )
            .route("/dashboard/logout", post(session::logout))
            .route("/dashboard/assets/dashboard.js", get(script))
            .route("/dashboard/assets/dashboard.css", get(stylesheet))
            .route(
                "/dashboard/partitions/{partition}/retry",
                post(actions::retry),
            )
            .route("/dashboard/messages/{id}/skip", post(actions::skip))
            .route("/dashboard/parked/requeue", post(actions::requeue))
            .with_state(dashboard)
    }

    fn sample_interval(&self) -> Duration {
        self.settings.sample_interval
    }
}

type DashboardState = Arc<Dashboard>;

async fn script() -> impl axum::response::IntoResponse {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard.js"),
    )
}

async fn stylesheet() -> impl axum::response::IntoResponse {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/dashboard.css"),
    )
}

fn asset(
    content_type: &'static str,
    body: &'static str,
) -> ([(header::HeaderName, HeaderValue); 2], &'static str) {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        body,
    )
}
