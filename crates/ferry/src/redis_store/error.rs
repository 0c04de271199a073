//! How Redis's errors and replies map to store errors.

use ::redis::{ErrorKind, RedisError, ServerErrorKind};

use ferry_core::StoreError;

pub(super) fn corrupt_reply(what: &str) -> StoreError {
    StoreError::Other(format!("unexpected reply from Redis: {what}").into())
}

/// Maps a driver error: ferry's script codes become schema or input errors, connection
/// failures and a server that is loading, busy or failing over are retryable, refused
/// credentials say so.
pub(crate) fn store_error(err: RedisError) -> StoreError {
    let detail = err.detail().unwrap_or_default().to_owned();
    match err.code() {
        Some("FERRY_SCHEMA") => return StoreError::Schema(detail),
        Some("FERRY_INVALID") => {
            return StoreError::Other(format!("refused by ferry's script: {detail}").into());
        }
        Some("NOAUTH" | "WRONGPASS") => {
            return StoreError::Other(
                format!(
                    "Redis refused the credentials (check the user and password in the url): {err}"
                )
                .into(),
            );
        }
        Some("BUSY" | "OOM") => return StoreError::Unavailable(err.into()),
        _ => {}
    }
    let transient = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        );
    if transient {
        StoreError::Unavailable(err.into())
    } else if err.kind() == ErrorKind::AuthenticationFailed {
        StoreError::Other(
            format!(
                "Redis refused the credentials (check the user and password in the url): {err}"
            )
            .into(),
        )
    } else {
        StoreError::Other(err.into())
    }
}
