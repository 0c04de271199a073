//! The operators' actions from the pages' forms, through the same functions as the
//! `/v1/ops` routes: retry a blocked partition now, skip (park) a message, requeue an
//! aggregate's parked messages. Each answers 303 back to a page, with what happened as a
//! one-time message.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::DashboardState;
use super::session::{self, Operator, Refused, check_post, flash, form_field, read_form, redirect};
use crate::api::error::ApiError;
use crate::api::messages::parse_id;
use crate::api::ops::{requeue_aggregate, retry_partition_now, skip_message};

/// The signed-in admin and the checked form, or the answer refusing the request.
pub(super) async fn authorized<'a>(
    dashboard: &'a DashboardState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Operator<'a>, Vec<(String, String)>), Refused> {
    let Some(operator) = session::operator(dashboard, headers) else {
        return Err(Refused::SignIn("sign in with an admin token to act"));
    };
    let form = read_form(headers, body).await?;
    check_post(&operator, headers, form_field(&form, "csrf"))?;
    Ok((operator, form))
}

/// 303 to `to` with `outcome` (or the error, in the API's words) for the next page.
pub(super) fn done(to: &'static str, outcome: Result<String, ApiError>) -> Response {
    let message = outcome.unwrap_or_else(|err| format!("Refused: {}", err.message()));
    redirect(to, Some(flash(&message)))
}

pub(super) async fn retry(
    State(dashboard): State<DashboardState>,
    Path(partition): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    let (operator, form) = authorized(&dashboard, &headers, body).await?;
    let back = match form_field(&form, "back") {
        Some("partitions") => "/dashboard",
        _ => "/dashboard/problems",
    };
    let outcome = match partition.parse::<u32>() {
        Ok(partition) => retry_partition_now(dashboard.admin.as_ref(), partition, &operator.principal.name)
            .await
            .map(|()| format!("Partition {partition}: retry requested; the relay owning it tries its head message now.")),
        Err(_) => Err(ApiError::bad_request("invalid_partition", format!("{partition:?} is not a partition number"))),
    };
    Ok(done(back, outcome))
}

pub(super) async fn skip(
    State(dashboard): State<DashboardState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    let (operator, form) = authorized(&dashboard, &headers, body).await?;
    let outcome = match parse_id(&id) {
        Ok(id) => skip_message(
            dashboard.admin.as_ref(),
            id,
            &operator.principal.name,
            form_field(&form, "reason").unwrap_or(""),
        )
        .await
        .map(|parked| {
            format!(
                "Message {} parked; its partition goes on.",
                parked.message.id
            )
        }),
        Err(err) => Err(err),
    };
    Ok(done("/dashboard/problems", outcome))
}

pub(super) async fn requeue(
    State(dashboard): State<DashboardState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    let (operator, form) = authorized(&dashboard, &headers, body).await?;
    let kind = form_field(&form, "aggregate_type").unwrap_or("");
    let id = form_field(&form, "aggregate_id").unwrap_or("");
    let outcome = requeue_aggregate(dashboard.admin.as_ref(), kind, id, &operator.principal.name)
        .await
        .map(|n| format!("{n} parked message(s) of {kind}/{id} requeued."));
    Ok(done("/dashboard/problems", outcome))
}
