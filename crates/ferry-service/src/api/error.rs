//! Every error the API returns: `{"error": {"code": …, "message": …}}`, plus
//! `current_status` on a 409 for a transition the message's status does not allow.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::{error, warn};

use ferry::ErrorChain;
use ferry::StoreError;

use crate::state::{Status, Transition};

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    current_status: Option<Status>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_status: Option<Status>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            current_status: None,
        }
    }

    /// What went wrong, as the API tells it (the dashboard shows the same words).
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 409: `transition` is not allowed from `current`; nothing changed.
    pub(crate) fn illegal_transition(
        id: uuid::Uuid,
        transition: Transition,
        current: Status,
    ) -> Self {
        let hint = match (transition, current) {
            (Transition::Confirm, Status::Cancelled) => {
                " (it was cancelled: by the producer, or by a check-back answered rolled_back)"
            }
            (Transition::Cancel, Status::Confirmed | Status::Delivered | Status::Completed) => {
                " (it was confirmed and is sent or being sent: it cannot be taken back)"
            }
            (Transition::Ack, Status::Prepared | Status::CheckFailed | Status::Cancelled) => {
                " (it was never sent)"
            }
            (Transition::RetryCheck | Transition::RetryDelivery, _) => {
                " (only check_failed and dead_lettered messages can be retried)"
            }
            _ => "",
        };
        Self {
            current_status: Some(current),
            ..Self::new(
                StatusCode::CONFLICT,
                "illegal_transition",
                format!(
                    "message {id} is {current}; it cannot be {}{hint}",
                    transition.verb()
                ),
            )
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        if err.is_retryable() {
            warn!(error = %ErrorChain(&err), "store unavailable");
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store is unavailable; retry later",
            )
        } else {
            error!(error = %ErrorChain(&err), "store error");
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the service's log",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                current_status: self.current_status,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry\""),
            );
        }
        response
    }
}
