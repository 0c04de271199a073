//! The operators' routes (admin scope): blocked partitions, retrying one now, skipping a
//! rejected message, parked messages and requeueing them: the HTTP face of the outbox's
//! [`OutboxAdmin`]. The views here are also what `ferry blocked` and `ferry parked` print
//! with `--json`.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::info;
use uuid::Uuid;

use ferry::{BlockedPartition, Message, OutboxAdmin, ParkedMessage, ParkedQuery};

use super::error::ApiError;
use super::{AppState, authorize, json, path_id, read_body, require_json};
use crate::auth::Scope;

/// Default and largest page of `GET /v1/ops/parked`.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// The largest request body of these routes (a reason, two names).
const BODY_LIMIT: usize = 16 * 1024;

/// The longest reason recorded with a skipped message.
const MAX_REASON_CHARS: usize = 1000;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/ops/blocked", get(blocked))
        .route(
            "/v1/ops/partitions/{partition}/retry",
            post(retry_partition),
        )
        .route("/v1/ops/messages/{id}/skip", post(skip))
        .route("/v1/ops/parked", get(parked))
        .route("/v1/ops/parked/requeue", post(requeue))
}

/// An outbox message as operators see it: everything but the payload, which is only sized.
#[derive(Debug, Serialize)]
pub struct OutboxMessageView {
    pub id: Uuid,
    pub partition: u32,
    pub sequence: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub event_type: String,
    pub partition_key: String,
    pub created_at: DateTime<Utc>,
    pub payload_bytes: usize,
}

impl From<&Message> for OutboxMessageView {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id,
            partition: m.partition,
            sequence: m.sequence,
            aggregate_type: m.aggregate_type.clone(),
            aggregate_id: m.aggregate_id.clone(),
            version: m.version,
            event_type: m.event_type.clone(),
            partition_key: m.partition_key.clone(),
            created_at: m.created_at,
            payload_bytes: m.payload.len(),
        }
    }
}

/// A blocked partition and the message at its head.
#[derive(Debug, Serialize)]
pub struct BlockedView {
    pub partition: u32,
    pub reason: String,
    pub since: Option<DateTime<Utc>>,
    pub head: Option<OutboxMessageView>,
}

impl From<&BlockedPartition> for BlockedView {
    fn from(b: &BlockedPartition) -> Self {
        Self {
            partition: b.partition,
            reason: b.reason.clone(),
            since: b.since,
            head: b.head.as_ref().map(OutboxMessageView::from),
        }
    }
}

/// A parked message.
#[derive(Debug, Serialize)]
pub struct ParkedView {
    pub message: OutboxMessageView,
    pub parked_at: DateTime<Utc>,
    pub parked_by: String,
    pub reason: String,
    pub holds_aggregate: bool,
}

impl From<&ParkedMessage> for ParkedView {
    fn from(p: &ParkedMessage) -> Self {
        Self {
            message: OutboxMessageView::from(&p.message),
            parked_at: p.parked_at,
            parked_by: p.parked_by.clone(),
            reason: p.reason.clone(),
            holds_aggregate: p.holds_aggregate,
        }
    }
}

/// The outbox's operations, or a 501 when this service was started without them.
fn admin(shared: &AppState) -> Result<&dyn OutboxAdmin, ApiError> {
    shared.admin.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_available",
            "this service runs without the outbox's operations",
        )
    })
}

async fn blocked(State(shared): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&shared, &headers, &[Scope::Admin])?;
    let blocked = admin(&shared)?.blocked().await?;
    let views: Vec<BlockedView> = blocked.iter().map(BlockedView::from).collect();
    Ok(json(StatusCode::OK, &views))
}

#[derive(Debug, Serialize)]
struct RetryRequested {
    partition: u32,
}

/// Asks for a retry of blocked `partition` now: `/v1/ops` and the dashboard.
pub(crate) async fn retry_partition_now(
    admin: &dyn OutboxAdmin,
    partition: u32,
    by: &str,
) -> Result<(), ApiError> {
    if !admin.request_retry(partition).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_blocked",
            format!("partition {partition} is not blocked"),
        ));
    }
    info!(partition, by, "retry of a blocked partition requested");
    Ok(())
}

async fn retry_partition(
    State(shared): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let principal = authorize(&shared, &headers, &[Scope::Admin])?;
    let partition = match path {
        Ok(Path(text)) => text.parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                "invalid_partition",
                format!("{text:?} is not a partition number (0 to the outbox's partitions - 1)"),
            )
        })?,
        Err(err) => return Err(ApiError::bad_request("invalid_partition", err.body_text())),
    };
    retry_partition_now(admin(&shared)?, partition, &principal.name).await?;
    Ok(json(StatusCode::ACCEPTED, &RetryRequested { partition }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipRequest {
    reason: String,
}

/// Parks unpublished message `id` with `reason`, checked: `/v1/ops` and the dashboard.
pub(crate) async fn skip_message(
    admin: &dyn OutboxAdmin,
    id: Uuid,
    by: &str,
    reason: &str,
) -> Result<ParkedMessage, ApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::bad_request(
            "invalid_reason",
            format!("reason must say why, in 1 to {MAX_REASON_CHARS} characters"),
        ));
    }
    let parked = admin
        .skip(id, &format!("token {by}"), reason)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no unpublished message {id} in the outbox (published, parked already, or never there)"
            ))
        })?;
    info!(message_id = %id, by, "message skipped (parked)");
    Ok(parked)
}

async fn skip(
    State(shared): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authorize(&shared, &headers, &[Scope::Admin])?;
    let id = path_id(path)?;
    require_json(&headers)?;
    let request: SkipRequest = parse_body(&read_body(body, BODY_LIMIT).await?)?;
    let parked = skip_message(admin(&shared)?, id, &principal.name, &request.reason).await?;
    Ok(json(StatusCode::OK, &ParkedView::from(&parked)))
}

async fn parked(
    State(shared): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers, &[Scope::Admin])?;
    let query = parked_query(query.as_deref())?;
    let parked = admin(&shared)?.parked(&query).await?;
    let views: Vec<ParkedView> = parked.iter().map(ParkedView::from).collect();
    Ok(json(StatusCode::OK, &views))
}

/// Parses `aggregate_type` with `aggregate_id`, `after` and `limit`.
fn parked_query(query: Option<&str>) -> Result<ParkedQuery, ApiError> {
    let (mut kind, mut id) = (None, None);
    let mut parked = ParkedQuery {
        aggregate: None,
        after_sequence: None,
        limit: DEFAULT_LIMIT,
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "aggregate_type" => kind = Some(value.into_owned()),
            "aggregate_id" => id = Some(value.into_owned()),
            "after" => {
                parked.after_sequence = Some(value.parse().map_err(|_| {
                    ApiError::bad_request("invalid_after", "after must be a sequence number")
                })?)
            }
            "limit" => {
                parked.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit must be 1 to {MAX_LIMIT}"),
                        )
                    })?
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!(
                        "unknown query parameter {other:?}: use aggregate_type, aggregate_id, after, limit"
                    ),
                ));
            }
        }
    }
    parked.aggregate = match (kind, id) {
        (Some(kind), Some(id)) if !kind.is_empty() && !id.is_empty() => Some((kind, id)),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_aggregate",
                "give aggregate_type and aggregate_id together, both non-empty",
            ));
        }
    };
    Ok(parked)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeueRequest {
    aggregate_type: String,
    aggregate_id: String,
}

#[derive(Debug, Serialize)]
struct Requeued {
    aggregate_type: String,
    aggregate_id: String,
    requeued: u64,
}

/// Puts an aggregate's parked messages back: `/v1/ops` and the dashboard.
pub(crate) async fn requeue_aggregate(
    admin: &dyn OutboxAdmin,
    aggregate_type: &str,
    aggregate_id: &str,
    by: &str,
) -> Result<u64, ApiError> {
    if aggregate_type.is_empty() || aggregate_id.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_aggregate",
            "aggregate_type and aggregate_id must not be empty",
        ));
    }
    let requeued = admin.requeue_parked(aggregate_type, aggregate_id).await?;
    if requeued == 0 {
        return Err(ApiError::not_found(format!(
            "no parked message of {aggregate_type}/{aggregate_id}"
        )));
    }
    info!(
        aggregate_type,
        aggregate_id, requeued, by, "parked messages requeued"
    );
    Ok(requeued)
}

async fn requeue(
    State(shared): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authorize(&shared, &headers, &[Scope::Admin])?;
    require_json(&headers)?;
    let request: RequeueRequest = parse_body(&read_body(body, BODY_LIMIT).await?)?;
    let requeued = requeue_aggregate(
        admin(&shared)?,
        &request.aggregate_type,
        &request.aggregate_id,
        &principal.name,
    )
    .await?;
    Ok(json(
        StatusCode::OK,
        &Requeued {
            aggregate_type: request.aggregate_type,
            aggregate_id: request.aggregate_id,
            requeued,
        },
    ))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_body", format!("invalid JSON body: {err}")))
}
