//! The HTTP API (axum): routes, authentication, request parsing and responses. Every
//! error is JSON (`api::error`); the contract is `openapi.json`, served as is.

pub(crate) mod error;
pub(crate) mod messages;
pub mod ops;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use tracing::{debug, info, warn};
use uuid::Uuid;

use self::error::ApiError;
use self::messages::{
    MessagePage, MessageView, PrepareRequest, decode_cursor, encode_cursor, parse_id,
};
use ferry::ErrorChain;

use crate::Shared;
use crate::auth::{Principal, Scope};
use crate::state::{Status, Transition};
use crate::store::{ListQuery, Moved, Prepared};

/// The OpenAPI document of this API, kept in the repository beside the crate.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// Every route, as `(method, path)`; the OpenAPI document describes exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/messages/{id}"),
    ("POST", "/v1/messages/{id}/confirm"),
    ("POST", "/v1/messages/{id}/cancel"),
    ("POST", "/v1/messages/{id}/ack"),
    ("POST", "/v1/messages/{id}/retry"),
    ("GET", "/v1/ops/blocked"),
    ("POST", "/v1/ops/partitions/{partition}/retry"),
    ("POST", "/v1/ops/messages/{id}/skip"),
    ("GET", "/v1/ops/parked"),
    ("POST", "/v1/ops/parked/requeue"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
];

/// Default and largest page of `GET /v1/messages`.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// Room for the other fields of a prepare request beside its payload.
const BODY_OVERHEAD: usize = 64 * 1024;

/// How much of an over-limit request body is read and dropped so that its sender gets
/// the 413 (see `read_body`); past this the connection is closed unread.
const OVERSIZE_DRAIN_BYTES: usize = 16 * 1024 * 1024;

type AppState = Arc<Shared>;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/messages", post(prepare).get(list))
        .route("/v1/messages/{id}", get(read))
        .route("/v1/messages/{id}/confirm", post(confirm))
        .route("/v1/messages/{id}/cancel", post(cancel))
        .route("/v1/messages/{id}/ack", post(ack))
        .route("/v1/messages/{id}/retry", post(retry))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(ops::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One debug line per request: method, route template (never the payload, headers or
/// query), status and time taken.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(unmatched)".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    debug!(
        %method,
        route,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// The caller, if its bearer token is valid and holds one of `allowed`.
pub(super) fn authorize<'a>(
    shared: &'a Shared,
    headers: &HeaderMap,
    allowed: &[Scope],
) -> Result<&'a Principal, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header: send `Authorization: Bearer <token>`")
    })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
        })?;
    let Some(principal) = shared.tokens.authenticate(token) else {
        warn!("request refused: unknown bearer token");
        return Err(ApiError::unauthorized("invalid bearer token"));
    };
    if !principal.may(allowed) {
        warn!(token = %principal.name, "request refused: missing scope");
        let wanted: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        return Err(ApiError::forbidden(format!(
            "token {:?} may not do this: it needs the {} scope",
            principal.name,
            wanted.join(" or ")
        )));
    }
    Ok(principal)
}

pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request body as JSON with `Content-Type: application/json`",
        ))
    }
}

/// The largest prepare body: a base64 payload at the limit plus the other fields.
fn body_limit(max_payload_bytes: usize) -> usize {
    max_payload_bytes.div_ceil(3) * 4 + BODY_OVERHEAD
}

/// Reads a request body of at most `limit` bytes. An over-limit body is still read to
/// its end (up to [`OVERSIZE_DRAIN_BYTES`] more) and dropped before the 413 goes out:
/// a server that answers and closes with the rest unread resets the connection, and a
/// client still sending sees the reset instead of the 413.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let mut frames = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    let mut received = 0usize;
    while let Some(frame) = frames.next().await {
        let chunk = frame.map_err(|err| {
            ApiError::bad_request(
                "invalid_body",
                format!("cannot read the request body: {err}"),
            )
        })?;
        received = received.saturating_add(chunk.len());
        if received <= limit {
            kept.extend_from_slice(&chunk);
        } else if received > limit.saturating_add(OVERSIZE_DRAIN_BYTES) {
            break;
        }
    }
    if received > limit {
        return Err(ApiError::payload_too_large(format!(
            "the request body exceeds {limit} bytes (service.max_payload_bytes plus the other fields)"
        )));
    }
    Ok(kept.freeze())
}

pub(super) fn path_id(
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Uuid, ApiError> {
    match path {
        Ok(Path(text)) => parse_id(&text),
        Err(err) => Err(ApiError::bad_request("invalid_id", err.body_text())),
    }
}

pub(super) fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    (status, axum::Json(value)).into_response()
}

async fn prepare(
    State(shared): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authorize(&shared, &headers, &[Scope::Producer])?;
    require_json(&headers)?;
    let max = shared.settings.max_payload_bytes;
    let body = read_body(body, body_limit(max)).await?;
    let prepare = PrepareRequest::from_json(&body)?.into_prepare(max)?;
    let (status, record) = match shared
        .store
        .prepare(&prepare, shared.settings.prepare_timeout)
        .await?
    {
        Prepared::Created(record) => {
            info!(message_id = %record.id, by = %principal.name, "message prepared");
            (StatusCode::CREATED, record)
        }
        Prepared::Existing(record) => (StatusCode::OK, record),
        Prepared::Conflict(record) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "id_conflict",
                format!(
                    "message {} was prepared before with other content (it is {}): use a new id for a new message",
                    record.id, record.status
                ),
            ));
        }
    };
    let mut response = json(status, &MessageView::from(record));
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/messages/{}", prepare.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn read(
    State(shared): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers, &[Scope::Producer, Scope::Consumer])?;
    let id = path_id(path)?;
    match shared.store.get(id).await? {
        Some(record) => Ok(json(StatusCode::OK, &MessageView::from(record))),
        None => Err(no_such_message(id)),
    }
}

fn no_such_message(id: Uuid) -> ApiError {
    ApiError::not_found(format!(
        "no message {id} (completed and cancelled messages are deleted after service.finished_retention_secs)"
    ))
}

/// Applies `transition` for `principal`; asking again for what was already done succeeds
/// without change (idempotent), anything else the status forbids is a 409.
async fn apply(
    shared: &Shared,
    principal: &Principal,
    id: Uuid,
    transition: Transition,
) -> Result<Response, ApiError> {
    let reason = format!("{} by {}", transition.verb(), principal.name);
    let moved = shared
        .store
        .transition(id, transition, transition.sources(), &reason)
        .await?;
    let moved = match moved {
        // A dead letter is retried by redelivering it.
        Moved::Stayed(record)
            if transition == Transition::RetryCheck && record.status == Status::DeadLettered =>
        {
            return Box::pin(apply(shared, principal, id, Transition::RetryDelivery)).await;
        }
        other => other,
    };
    match moved {
        Moved::Moved(record) => {
            info!(message_id = %id, status = %record.status, by = %principal.name, "message {}", transition.verb());
            Ok(json(StatusCode::OK, &MessageView::from(record)))
        }
        Moved::Stayed(record) if transition.already_done().contains(&record.status) => {
            Ok(json(StatusCode::OK, &MessageView::from(record)))
        }
        Moved::Stayed(record) => Err(ApiError::illegal_transition(id, transition, record.status)),
        Moved::NotFound => Err(no_such_message(id)),
    }
}

macro_rules! transition_handler {
    ($name:ident, $transition:expr, $scope:expr) => {
        async fn $name(
            State(shared): State<AppState>,
            headers: HeaderMap,
            path: Result<Path<String>, axum::extract::rejection::PathRejection>,
        ) -> Result<Response, ApiError> {
            let principal = authorize(&shared, &headers, &[$scope])?;
            let id = path_id(path)?;
            apply(&shared, principal, id, $transition).await
        }
    };
}

transition_handler!(confirm, Transition::Confirm, Scope::Producer);
transition_handler!(cancel, Transition::Cancel, Scope::Producer);
transition_handler!(ack, Transition::Ack, Scope::Consumer);
transition_handler!(retry, Transition::RetryCheck, Scope::Admin);

/// Parses `status`, `limit` and `cursor`.
fn list_query(query: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut list = ListQuery {
        statuses: Vec::new(),
        after: None,
        limit: DEFAULT_LIMIT,
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "status" => {
                for name in value.split(',').filter(|n| !n.is_empty()) {
                    let status = name
                        .parse::<Status>()
                        .map_err(|err| ApiError::bad_request("invalid_status", err.to_string()))?;
                    list.statuses.push(status);
                }
            }
            "limit" => {
                list.limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit must be a number from 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            "cursor" => list.after = Some(decode_cursor(&value)?),
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}: use status, limit and cursor"),
                ));
            }
        }
    }
    Ok(list)
}

async fn list(
    State(shared): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers, &[Scope::Admin])?;
    let query = list_query(query.as_deref())?;
    let records = shared.store.list(&query).await?;
    let full = records.len() == query.limit as usize;
    let next_cursor = full
        .then(|| records.last().map(|r| encode_cursor(r.id)))
        .flatten();
    let page = MessagePage {
        messages: records.into_iter().map(MessageView::from).collect(),
        next_cursor,
    };
    Ok(json(StatusCode::OK, &page))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics(State(shared): State<AppState>) -> Response {
    let text = shared.render_metrics().await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// 200 when the store answers, 503 otherwise.
async fn healthz(State(shared): State<AppState>) -> Response {
    match shared.store.ping().await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
        Err(err) => {
            warn!(error = %ErrorChain(&err), "health check: store unreachable");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "unavailable", "reason": "the store does not answer" }),
            )
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route: see /v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method: see /v1/openapi.json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_are_checked() {
        let query = list_query(Some("status=prepared,check_failed&limit=5")).expect("valid");
        assert_eq!(query.statuses, [Status::Prepared, Status::CheckFailed]);
        assert_eq!(query.limit, 5);
        assert!(list_query(Some("status=shipped")).is_err());
        assert!(list_query(Some("limit=0")).is_err());
        assert!(list_query(Some("limit=1001")).is_err());
        assert!(list_query(Some("cursor=zz")).is_err());
        assert!(list_query(Some("sort=id")).is_err());
        assert_eq!(list_query(None).expect("defaults").limit, DEFAULT_LIMIT);
    }

    #[test]
    fn body_limit_fits_a_base64_payload_at_the_limit() {
        assert!(body_limit(3) >= 4 + BODY_OVERHEAD);
        assert!(body_limit(1_000_000) >= 1_333_336);
    }
}
