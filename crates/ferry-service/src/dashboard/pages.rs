//! The pages. Each renders its `<main>` section from the stores at request time; a
//! request with `X-Ferry-Fragment: 1` (the page's own refresh) gets that section alone.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use tracing::warn;

use ferry::{ErrorChain, ParkedQuery, StoreError};

use super::history::{backlog_trend, publish_rate};
use super::session::{self, Operator};
use super::{DashboardState, metrics_text};
use crate::state::Status;
use crate::store::ListQuery;

pub(super) mod figures;

use figures::{age, duration_since, rate, sparkline, time};

/// Parked messages and service messages listed per page.
const LIST_LIMIT: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Partitions,
    Problems,
    Transactions,
    Metrics,
    Replay,
}

impl Page {
    const ALL: [Page; 5] = [
        Page::Partitions,
        Page::Problems,
        Page::Transactions,
        Page::Metrics,
        Page::Replay,
    ];

    fn path(self) -> &'static str {
        match self {
            Page::Partitions => "/dashboard",
            Page::Problems => "/dashboard/problems",
            Page::Transactions => "/dashboard/transactions",
            Page::Metrics => "/dashboard/metrics",
            Page::Replay => "/dashboard/replay",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Page::Partitions => "Partitions",
            Page::Problems => "Blocked & parked",
            Page::Transactions => "Transactions",
            Page::Metrics => "Metrics",
            Page::Replay => "Replay",
        }
    }
}

pub(super) async fn partitions(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    page(&d, &headers, Page::Partitions).await
}

pub(super) async fn problems(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    page(&d, &headers, Page::Problems).await
}

pub(super) async fn transactions(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    page(&d, &headers, Page::Transactions).await
}

pub(super) async fn metrics(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    page(&d, &headers, Page::Metrics).await
}

pub(super) async fn replay(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    page(&d, &headers, Page::Replay).await
}

async fn page(dashboard: &DashboardState, headers: &HeaderMap, page: Page) -> Response {
    let operator = session::operator(dashboard, headers);
    if operator.is_none() && !dashboard.settings.public_read {
        return session::sign_in_required(None);
    }
    let operator = operator.as_ref();
    let section = match page {
        Page::Partitions => partitions_section(dashboard, operator).await,
        Page::Problems => problems_section(dashboard, operator).await,
        Page::Transactions => transactions_section(dashboard).await,
        Page::Metrics => metrics_section(dashboard).await,
        Page::Replay => super::replay::section(dashboard, operator),
    };
    if headers.contains_key("x-ferry-fragment") {
        return secured(document(section));
    }
    let flash = session::take_flash(headers);
    let markup = layout(
        dashboard,
        page,
        operator,
        flash.as_ref().map(|(m, _)| m.as_str()),
        section,
    );
    let mut response = secured(document(markup));
    if let Some((_, clear)) = flash {
        response.headers_mut().append(header::SET_COOKIE, clear);
    }
    response
}

fn document(markup: Markup) -> Response {
    Html(markup.into_string()).into_response()
}

/// Headers of every page: scripts and styles from this origin only, no framing, no caching.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn layout(
    dashboard: &DashboardState,
    current: Page,
    operator: Option<&Operator<'_>>,
    flash: Option<&str>,
    section: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "ferry · " (current.title()) }
                link rel="stylesheet" href="/dashboard/assets/dashboard.css";
                script src="/dashboard/assets/dashboard.js" defer {}
            }
            body data-refresh-ms=(dashboard.settings.refresh.as_millis()) {
                header {
                    span.brand { "ferry" }
                    nav {
                        @for page in Page::ALL {
                            a href=(page.path()) class=[(page == current).then_some("current")] { (page.title()) }
                        }
                    }
                    @if let Some(operator) = operator {
                        form.signout method="post" action="/dashboard/logout" {
                            span { "signed in as " (operator.principal.name) }
                            button type="submit" { "Sign out" }
                        }
                    } @else {
                        a.signin href="/dashboard/login" { "Sign in to act" }
                    }
                }
                @if let Some(message) = flash {
                    p.flash id="flash" { (message) }
                }
                main id="live" { (section) }
                footer { "refreshed " span id="refreshed" { "now" } " · " a href="/metrics" { "/metrics" } }
            }
        }
    }
}

/// The login page (no script: nothing to refresh).
pub(super) fn login(error: Option<&str>) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "ferry · sign in" }
                link rel="stylesheet" href="/dashboard/assets/dashboard.css";
            }
            body {
                header { span.brand { "ferry" } }
                main.login {
                    h1 { "Sign in" }
                    p { "Paste a token with the " code { "admin" } " scope from " code { "[[service.tokens]]" } "." }
                    @if let Some(error) = error { p.error id="login-error" { (error) } }
                    form method="post" action="/dashboard/login" {
                        input type="password" name="token" id="token" autocomplete="current-password" required placeholder="admin token";
                        button type="submit" id="sign-in" { "Sign in" }
                    }
                }
            }
        }
    };
    secured(document(markup))
}

fn store_trouble(what: &str, err: &StoreError) -> Markup {
    warn!(error = %ErrorChain(err), "dashboard: {what} unreadable");
    html! { p.error { "The " (what) " could not be read (" (if err.is_retryable() { "store unavailable, retrying" } else { "see the log" }) ")." } }
}

/// The CSRF field every action form carries (empty for a bearer session: not needed).
pub(super) fn csrf(operator: &Operator<'_>) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf()); }
}

async fn partitions_section(dashboard: &DashboardState, operator: Option<&Operator<'_>>) -> Markup {
    let status = match dashboard.outbox.status().await {
        Ok(status) => status,
        Err(err) => return store_trouble("outbox status", &err),
    };
    let samples = dashboard.history.snapshot();
    let backlog: u64 = status.iter().map(|p| p.backlog).sum();
    let blocked = status.iter().filter(|p| p.blocked_reason.is_some()).count();
    let owned = status.iter().filter(|p| p.owner.is_some()).count();
    let oldest = status
        .iter()
        .filter_map(|p| p.oldest_unpublished_age_secs)
        .fold(None, |max: Option<f64>, a| {
            Some(max.map_or(a, |m| m.max(a)))
        });
    let minute = std::time::Duration::from_secs(60);
    let history_totals: Vec<u64> = samples.iter().map(|s| s.total_backlog()).collect();
    html! {
        section.cards {
            div.card { h2 { "Backlog" } p.figure id="total-backlog" { (backlog) } (sparkline(&history_totals)) }
            div.card { h2 { "Oldest unpublished" } p.figure id="oldest" { (oldest.map_or_else(|| "none".to_owned(), age)) } }
            div.card.(if blocked > 0 { "bad" } else { "" }) { h2 { "Blocked partitions" } p.figure id="blocked-count" { (blocked) } }
            div.card { h2 { "Owned partitions" } p.figure { (owned) " / " (status.len()) } }
            div.card {
                h2 { "Publish rate" }
                @if dashboard.relay.is_some() {
                    p.figure id="publish-rate" { (publish_rate(&samples, minute).map_or_else(|| "…".to_owned(), rate)) }
                    p.note { "last minute · " (publish_rate(&samples, dashboard.settings.history).map_or_else(|| "…".to_owned(), rate)) " over " (dashboard.settings.history.as_secs() / 60) " min" }
                } @else {
                    p.figure { "—" }
                    p.note { "no relay in this process" }
                }
            }
        }
        table.partitions {
            thead { tr { th { "Partition" } th { "Owner" } th { "Epoch" } th { "Lease" } th.num { "Backlog" } th { "Oldest" } th { "Backlog trend" } th { "State" } } }
            tbody {
                @for p in &status {
                    tr id={ "partition-" (p.partition) } class=[p.blocked_reason.as_ref().map(|_| "blocked")] {
                        td { (p.partition) }
                        td { (p.owner.as_deref().unwrap_or("—")) }
                        td.num { (p.epoch) }
                        td { (p.lease_expires_at.map_or_else(|| "—".to_owned(), |at| format!("expires in {}", duration_since(at)))) }
                        td.num.backlog { (p.backlog) }
                        td { (p.oldest_unpublished_age_secs.map_or_else(|| "—".to_owned(), age)) }
                        td {
                            (sparkline(&samples.iter().filter_map(|s| s.backlog.get(p.partition as usize).copied()).collect::<Vec<_>>()))
                            " " (backlog_trend(&samples, p.partition as usize).map_or_else(String::new, |t| format!("{t:+.0}/min")))
                        }
                        td {
                            @if let Some(reason) = &p.blocked_reason {
                                span.badge.bad { "blocked" } " " span.reason { (reason) }
                                @if let Some(operator) = operator {
                                    form.inline method="post" action={ "/dashboard/partitions/" (p.partition) "/retry" } {
                                        (csrf(operator))
                                        input type="hidden" name="back" value="partitions";
                                        button type="submit" class="retry" { "Retry now" }
                                    }
                                }
                            } @else {
                                span.badge.ok { "flowing" }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn problems_section(dashboard: &DashboardState, operator: Option<&Operator<'_>>) -> Markup {
    let blocked = dashboard.admin.blocked().await;
    let parked = dashboard
        .admin
        .parked(&ParkedQuery {
            limit: LIST_LIMIT,
            ..ParkedQuery::default()
        })
        .await;
    html! {
        h1 { "Blocked partitions" }
        @match &blocked {
            Err(err) => (store_trouble("blocked partitions", err)),
            Ok(blocked) if blocked.is_empty() => p.empty id="no-blocked" { "No partition is blocked." },
            Ok(blocked) => table id="blocked" {
                thead { tr { th { "Partition" } th { "Since" } th { "Reason" } th { "Head message" } th { "Actions" } } }
                tbody {
                    @for b in blocked {
                        tr id={ "blocked-" (b.partition) } {
                            td { (b.partition) }
                            td { (b.since.map_or_else(|| "—".to_owned(), time)) }
                            td.reason { (b.reason) }
                            td {
                                @if let Some(m) = &b.head {
                                    code { (m.id) } br; (m.aggregate_type) "/" (m.aggregate_id) " v" (m.version) " · " (m.event_type)
                                } @else { "published or parked since" }
                            }
                            td {
                                @if let Some(operator) = operator {
                                    form.inline method="post" action={ "/dashboard/partitions/" (b.partition) "/retry" } {
                                        (csrf(operator))
                                        input type="hidden" name="back" value="problems";
                                        button type="submit" class="retry" { "Retry now" }
                                    }
                                    @if let Some(m) = &b.head {
                                        form.inline method="post" action={ "/dashboard/messages/" (m.id) "/skip" } {
                                            (csrf(operator))
                                            input type="text" name="reason" required maxlength="1000" placeholder="why skip it";
                                            button type="submit" class="skip" { "Skip (park)" }
                                        }
                                    }
                                } @else { span.note { "sign in to act" } }
                            }
                        }
                    }
                }
            },
        }
        h1 { "Parked messages" }
        @match &parked {
            Err(err) => (store_trouble("parked messages", err)),
            Ok(parked) if parked.is_empty() => p.empty id="no-parked" { "No message is parked." },
            Ok(parked) => table id="parked" {
                thead { tr { th { "Message" } th { "Aggregate" } th { "Parked" } th { "By" } th { "Reason" } th { "Actions" } } }
                tbody {
                    @for p in parked {
                        tr {
                            td { code { (p.message.id) } br; "v" (p.message.version) " · " (p.message.event_type) " · partition " (p.message.partition) }
                            td { (p.message.aggregate_type) "/" (p.message.aggregate_id) @if p.holds_aggregate { " " span.badge.bad title="later messages of this aggregate wait for it" { "holds" } } }
                            td { (time(p.parked_at)) }
                            td { (p.parked_by) }
                            td.reason { (p.reason) }
                            td {
                                @if let Some(operator) = operator {
                                    form.inline method="post" action="/dashboard/parked/requeue" {
                                        (csrf(operator))
                                        input type="hidden" name="aggregate_type" value=(p.message.aggregate_type);
                                        input type="hidden" name="aggregate_id" value=(p.message.aggregate_id);
                                        button type="submit" class="requeue" { "Requeue aggregate" }
                                    }
                                } @else { span.note { "sign in to act" } }
                            }
                        }
                    }
                }
            },
        }
    }
}

/// The service's statuses as the operators name them.
const STATES: [(Status, &str); 7] = [
    (Status::Prepared, "prepared"),
    (Status::Confirmed, "confirmed"),
    (Status::Delivered, "delivered"),
    (Status::Completed, "completed (acked)"),
    (Status::Cancelled, "cancelled"),
    (Status::CheckFailed, "check failed"),
    (Status::DeadLettered, "dead"),
];

async fn transactions_section(dashboard: &DashboardState) -> Markup {
    let Some(store) = &dashboard.service else {
        return html! { p.empty { "This process runs no reliable message service." } };
    };
    let stats = match store.stats().await {
        Ok(stats) => stats,
        Err(err) => return store_trouble("service's transactions", &err),
    };
    let open = store
        .list(&ListQuery {
            statuses: vec![
                Status::Prepared,
                Status::CheckFailed,
                Status::Confirmed,
                Status::Delivered,
                Status::DeadLettered,
            ],
            after: None,
            limit: LIST_LIMIT,
        })
        .await;
    let now = chrono::Utc::now();
    let checking = |r: &crate::store::Record| {
        r.status == Status::Prepared
            && (r.checks > 0 || r.next_check_at.is_some_and(|at| at <= now))
    };
    html! {
        section.cards {
            @for (status, label) in STATES {
                div.card.(if matches!(status, Status::CheckFailed | Status::DeadLettered) && stats.counts.get(&status).copied().unwrap_or(0) > 0 { "bad" } else { "" }) {
                    h2 { (label) }
                    p.figure id={ "tx-" (status) } { (stats.counts.get(&status).copied().unwrap_or(0)) }
                }
            }
            @if let Ok(open) = &open {
                div.card { h2 { "checking back" } p.figure id="tx-checking" { (open.iter().filter(|r| checking(r)).count()) } p.note { "of the prepared listed below" } }
            }
        }
        p.note {
            "Oldest prepared: " (stats.oldest_prepared_age_secs.map_or_else(|| "none".to_owned(), age))
            " · oldest unacknowledged: " (stats.oldest_unacked_age_secs.map_or_else(|| "none".to_owned(), age))
        }
        h1 { "Open transactions" }
        @match &open {
            Err(err) => (store_trouble("service's transactions", err)),
            Ok(open) if open.is_empty() => p.empty { "No open transaction." },
            Ok(open) => table id="transactions" {
                thead { tr { th { "Message" } th { "State" } th { "Aggregate" } th.num { "Checks" } th.num { "Deliveries" } th { "Updated" } th { "Reason" } } }
                tbody {
                    @for r in open {
                        tr {
                            td { code { (r.id) } br; (r.event_type) }
                            td { span.badge.(r.status) { (if checking(r) { "checking back" } else { r.status.as_str() }) } }
                            td { (r.aggregate_type) "/" (r.aggregate_id) }
                            td.num { (r.checks) }
                            td.num { (r.deliveries) }
                            td { (time(r.updated_at)) }
                            td.reason { (r.reason.as_deref().unwrap_or("")) }
                        }
                    }
                }
            },
        }
    }
}

async fn metrics_section(dashboard: &DashboardState) -> Markup {
    let Some(source) = &dashboard.metrics else {
        return html! { p.empty { "This process exposes no metrics." } };
    };
    let families = metrics_text::parse(&source.render().await);
    html! {
        table.metrics {
            thead { tr { th { "Metric" } th { "Series" } th.num { "Value" } } }
            tbody {
                @for family in &families {
                    @for (i, (labels, value)) in family.samples.iter().enumerate() {
                        tr {
                            @if i == 0 {
                                td rowspan=(family.samples.len()) {
                                    code { (family.name) } " " span.note { (family.kind) } br; span.note { (family.help) }
                                }
                            }
                            td { code { (labels) } }
                            td.num { (value) }
                        }
                    }
                }
            }
        }
    }
}
