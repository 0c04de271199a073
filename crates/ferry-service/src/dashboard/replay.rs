//! "Start a replay and watch its progress": the page's form selects retained messages (a
//! partition, a sequence or time range, an aggregate, or all), counts them (dry run) or
//! replays them through the same core replay as `ferry replay`
//! (`ferry_core::relay::replay`) to the process's sink, opened anew under the replay's
//! name. One replay at a time per process; its figures (sent, rate, ETA, how it ended) are
//! read by the page's refresh, and a stop button ends it after the page in flight.
//!
//! Unlike `ferry replay`, nothing is written to resume from: a stopped replay is started
//! again (consumers' inboxes drop what they already applied).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::Utc;
use maud::{Markup, html};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use ferry::{
    ErrorChain, Replay, ReplayEnd, ReplayOptions, ReplayProgress, RetainedFilter, RetainedSummary,
    Sink, parse_time_or_ago,
};

use super::DashboardState;
use super::actions::{authorized, done};
use super::pages::csrf;
use super::pages::figures::{age, rate};
use super::session::{Operator, Refused, form_field};
use crate::api::error::ApiError;

/// Opens the sink a replay publishes to, under the replay's name (which some sinks put
/// in their producer ids, so that it fences only an earlier run of the same replay).
#[async_trait]
pub trait ReplaySink: Send + Sync + 'static {
    async fn open(&self, name: &str) -> Result<Arc<dyn Sink>, String>;
}

/// The replay of this process: the one running, or the last one and how it ended.
#[derive(Default)]
pub(super) struct Replays {
    current: Mutex<Option<Arc<Run>>>,
}

/// How a replay stands.
#[derive(Debug, Clone)]
enum Outcome {
    Running,
    Finished,
    Stopped,
    Failed(String),
}

struct Run {
    name: String,
    total: u64,
    started: Instant,
    progress: Arc<ReplayProgress>,
    stop: CancellationToken,
    /// The outcome, and how long the replay ran once it ended.
    ended: Mutex<(Outcome, Option<Duration>)>,
}

impl Run {
    fn sent(&self) -> u64 {
        self.progress.sent()
    }

    fn outcome(&self) -> (Outcome, Duration) {
        let ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        (
            ended.0.clone(),
            ended.1.unwrap_or_else(|| self.started.elapsed()),
        )
    }

    fn end(&self, outcome: Outcome) {
        *self.ended.lock().unwrap_or_else(PoisonError::into_inner) =
            (outcome, Some(self.started.elapsed()));
    }
}

impl Replays {
    fn current(&self) -> Option<Arc<Run>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why no replay may start now: one is running.
    fn busy(current: Option<&Arc<Run>>) -> Result<(), String> {
        match current {
            Some(run) if matches!(run.outcome().0, Outcome::Running) => Err(format!(
                "replay {} is running: stop it or wait for it to end",
                run.name
            )),
            _ => Ok(()),
        }
    }

    /// Runs `replay` of `total` messages to `sink` in a task of its own, unless one is
    /// running (then the caller shuts `sink` down).
    fn start(
        &self,
        shutdown: &CancellationToken,
        replay: Replay,
        sink: Arc<dyn Sink>,
        total: u64,
    ) -> Result<(), String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        Self::busy(current.as_ref())?;
        let run = Arc::new(Run {
            name: replay.name().to_owned(),
            total,
            started: Instant::now(),
            progress: replay.progress(),
            stop: shutdown.child_token(),
            ended: Mutex::new((Outcome::Running, None)),
        });
        *current = Some(Arc::clone(&run));
        tokio::spawn(run_to_the_end(replay, sink, run));
        Ok(())
    }
}

async fn run_to_the_end(replay: Replay, sink: Arc<dyn Sink>, run: Arc<Run>) {
    let outcome = match replay.run(None, &mut |_| Ok(()), &run.stop).await {
        Ok(ReplayEnd::Finished { .. }) => Outcome::Finished,
        Ok(ReplayEnd::Stopped { .. }) => Outcome::Stopped,
        Err(err) => Outcome::Failed(ErrorChain(&err).to_string()),
    };
    sink.shutdown().await;
    match &outcome {
        Outcome::Failed(reason) => warn!(name = %run.name, %reason, "dashboard replay failed"),
        _ => {
            info!(name = %run.name, sent = run.sent(), outcome = ?outcome, "dashboard replay ended")
        }
    }
    run.end(outcome);
}

/// The selection and the rate the form asks for, or why it cannot be used.
fn selection(form: &[(String, String)]) -> Result<(RetainedFilter, Option<NonZeroU32>), String> {
    fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
        form_field(form, name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }
    fn number<T: std::str::FromStr>(
        form: &[(String, String)],
        name: &str,
    ) -> Result<Option<T>, String> {
        field(form, name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{name} {v:?} is not a number"))
            })
            .transpose()
    }
    let time = |name| field(form, name).map(parse_time_or_ago).transpose();
    let aggregate = match (field(form, "aggregate_type"), field(form, "aggregate_id")) {
        (Some(kind), Some(id)) => Some((kind.to_owned(), id.to_owned())),
        (None, None) => None,
        _ => return Err("an aggregate needs both its type and its id".into()),
    };
    let filter = RetainedFilter {
        partition: number(form, "partition")?,
        from_sequence: number(form, "from_sequence")?,
        to_sequence: number(form, "to_sequence")?,
        since: time("since")?,
        until: time("until")?,
        aggregate,
    };
    filter.check(field(form, "all").is_some())?;
    Ok((filter, number(form, "rate")?))
}

fn refused(reason: String) -> ApiError {
    ApiError::bad_request("replay_refused", reason)
}

fn describe(summary: &RetainedSummary) -> String {
    let mut text = format!("{} retained message(s) selected", summary.count);
    if let (Some(first), Some(last)) = (summary.first_sequence, summary.last_sequence) {
        text.push_str(&format!(", sequences {first}..={last}"));
    }
    if let (Some(first), Some(last)) = (summary.first_created_at, summary.last_created_at) {
        text.push_str(&format!(
            ", created {} ..= {}",
            first.to_rfc3339(),
            last.to_rfc3339()
        ));
    }
    text
}

/// `POST /dashboard/replay`: a dry run (`action=dry_run`) or the start of a replay.
pub(super) async fn start(
    State(dashboard): State<DashboardState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    let (operator, form) = authorized(&dashboard, &headers, body).await?;
    let outcome = start_or_count(&dashboard, &form, &operator.principal.name).await;
    Ok(done("/dashboard/replay", outcome.map_err(refused)))
}

async fn start_or_count(
    dashboard: &DashboardState,
    form: &[(String, String)],
    who: &str,
) -> Result<String, String> {
    let Some(opener) = dashboard.replay_sink.clone() else {
        return Err("this process has no sink to replay to".into());
    };
    let (filter, rate) = selection(form)?;
    let summary = dashboard
        .admin
        .retained_summary(&filter)
        .await
        .map_err(|err| format!("counting the retained messages: {}", ErrorChain(&err)))?;
    if form_field(form, "action") == Some("dry_run") {
        return Ok(format!("Dry run: {}.", describe(&summary)));
    }
    Replays::busy(dashboard.replays.current().as_ref())?;
    let name = form_field(form, "name").unwrap_or("").trim().to_owned();
    let sink = opener
        .open(&name)
        .await
        .map_err(|reason| format!("opening the sink: {reason}"))?;
    let mut options = ReplayOptions::new(name.clone(), filter);
    options.rate = rate;
    let started = match Replay::new(Arc::clone(&dashboard.admin), Arc::clone(&sink), options) {
        Ok(replay) => dashboard.replays.start(
            &dashboard.shutdown,
            replay,
            Arc::clone(&sink),
            summary.count,
        ),
        Err(err) => Err(ErrorChain(&err).to_string()),
    };
    if let Err(reason) = started {
        sink.shutdown().await;
        return Err(reason);
    }
    info!(
        name,
        by = who,
        count = summary.count,
        "dashboard replay started"
    );
    Ok(format!("Replay {name} started: {}.", describe(&summary)))
}

/// `POST /dashboard/replay/stop`: stops the running replay after its page in flight.
pub(super) async fn stop(
    State(dashboard): State<DashboardState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    authorized(&dashboard, &headers, body).await?;
    let outcome = match dashboard.replays.current() {
        Some(run) if matches!(run.outcome().0, Outcome::Running) => {
            run.stop.cancel();
            Ok(format!(
                "Replay {} stopping after its page in flight.",
                run.name
            ))
        }
        _ => Err("no replay is running".to_owned()),
    };
    Ok(done("/dashboard/replay", outcome.map_err(refused)))
}

/// The page's section: the current or last replay's figures, and the form.
pub(super) fn section(dashboard: &DashboardState, operator: Option<&Operator<'_>>) -> Markup {
    let run = dashboard.replays.current();
    html! {
        h1 { "Replay" }
        p.note { "Publishes retained messages again (outbox.retention_secs keeps them) to this process's sink, unchanged, as " code { "ferry replay" } " does; consumers' inboxes drop what they already applied." }
        @if let Some(run) = &run { (progress(run, operator)) } @else { p.empty id="no-replay" { "No replay has run in this process." } }
        @if dashboard.replay_sink.is_none() {
            p.note { "This process has no sink to replay to." }
        } @else if let Some(operator) = operator {
            (form(operator))
        } @else {
            p.note { "Sign in to start a replay." }
        }
    }
}

fn progress(run: &Run, operator: Option<&Operator<'_>>) -> Markup {
    let (outcome, elapsed) = run.outcome();
    let sent = run.sent();
    let per_sec = sent as f64 / elapsed.as_secs_f64().max(0.001);
    let (state, reason) = match &outcome {
        Outcome::Running => ("running", None),
        Outcome::Finished => ("done", None),
        Outcome::Stopped => ("stopped", None),
        Outcome::Failed(reason) => ("failed", Some(reason.as_str())),
    };
    let eta = match outcome {
        Outcome::Running if per_sec > 0.0 => {
            let left = run.total.saturating_sub(sent) as f64 / per_sec;
            age(left)
        }
        Outcome::Running => "…".to_owned(),
        _ => "—".to_owned(),
    };
    html! {
        div.cards id="replay" {
            div.card { h2 { "Replay" } p.figure id="replay-name" { (run.name) } p.note id="replay-state" class=(state) { (state) } }
            div.card { h2 { "Messages" } p.figure { span id="replay-sent" { (sent) } " / " span id="replay-total" { (run.total) } } }
            div.card { h2 { "Rate" } p.figure id="replay-rate" { (rate(per_sec)) } }
            div.card { h2 { "ETA" } p.figure id="replay-eta" { (eta) } }
        }
        @if let Some(reason) = reason { p.error id="replay-error" { (reason) } }
        @if let (Outcome::Running, Some(operator)) = (&outcome, operator) {
            form.inline method="post" action="/dashboard/replay/stop" {
                (csrf(operator))
                button type="submit" id="replay-stop" { "Stop" }
            }
        }
    }
}

fn form(operator: &Operator<'_>) -> Markup {
    let name = format!("dashboard-{}", Utc::now().format("%Y%m%d-%H%M%S"));
    html! {
        form.replay method="post" action="/dashboard/replay" id="replay-form" data-keep {
            (csrf(operator))
            fieldset {
                legend { "What to replay (empty fields leave a bound open)" }
                label { "Partition " input type="number" name="partition" min="0"; }
                label { "Sequences from " input type="number" name="from_sequence"; " to " input type="number" name="to_sequence"; }
                label { "Created since " input type="text" name="since" placeholder="2026-12-04T08:00:00Z or 6h"; " until " input type="text" name="until" placeholder="RFC 3339 or 10m"; }
                label { "Aggregate " input type="text" name="aggregate_type" placeholder="type"; " " input type="text" name="aggregate_id" placeholder="id"; }
                label { input type="checkbox" name="all" id="replay-all"; " all retained messages" }
            }
            label { "Name " input type="text" name="name" value=(name) required maxlength="64" pattern="[A-Za-z0-9_\\-]+"; }
            label { "Rate " input type="number" name="rate" min="1" placeholder="unlimited"; " messages/s" }
            button type="submit" name="action" value="dry_run" id="replay-dry-run" { "Dry run (count)" }
            button type="submit" name="action" value="start" id="replay-start" { "Start replay" }
        }
    }
}
