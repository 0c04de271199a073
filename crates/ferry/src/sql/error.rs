//! Driver errors as [`StoreError`]s: retryable or not, with what failed and how to fix it.

use ferry_core::StoreError;

use super::dialect::{ConnectOptions, Dialect, Fault};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Maps a driver error of dialect `D`: connection-level failures and the database's
/// transient errors are retryable, missing tables point at `ferry migrate`, the rest is
/// reported as is.
pub fn store_error<D: Dialect>(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(err.into()),
        sqlx::Error::Database(db) => match D::classify(db.as_ref()) {
            Fault::Transient => StoreError::Unavailable(err.into()),
            Fault::MissingSchema => {
                StoreError::Schema(format!("ferry's tables are missing: {}", db.message()))
            }
            Fault::Refused | Fault::UnknownDatabase | Fault::Other => StoreError::Other(err.into()),
        },
        _ => StoreError::Other(err.into()),
    }
}

/// A connection failure with what ferry was doing, keeping the driver's error as the cause.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
struct ConnectFailed {
    context: String,
    #[source]
    source: BoxError,
}

/// Names the server, what it refused and how to fix it; keeps whether retrying can help
/// (a server that is down may come up; a wrong password will not become right).
pub(crate) fn connect_error<D: Dialect>(
    err: sqlx::Error,
    options: &ConnectOptions<D>,
) -> StoreError {
    let (server, user) = D::describe(options);
    let name = D::NAME;
    if crate::tls::is_certificate_failure(&err) {
        let context = crate::tls::certificate_failure(name, &server, D::TLS_CA_SETTING);
        return StoreError::Other(Box::new(ConnectFailed {
            context,
            source: err.into(),
        }));
    }
    let context = match &err {
        sqlx::Error::Database(db) => match D::classify(db.as_ref()) {
            Fault::Refused => format!(
                "{name} at {server} refused user {user:?}: check the user and password in store.url"
            ),
            Fault::UnknownDatabase => format!(
                "{name} at {server}: the database in store.url does not exist or user {user:?} may not use it"
            ),
            _ => format!("{name} at {server} refused the connection"),
        },
        _ => format!(
            "cannot reach {name} at {server}: is the server running, and are store.url's host and port right?"
        ),
    };
    let wrap = |source| {
        Box::new(ConnectFailed {
            context: context.clone(),
            source,
        })
    };
    match store_error::<D>(err) {
        StoreError::Unavailable(source) => StoreError::Unavailable(wrap(source)),
        StoreError::Other(source) => StoreError::Other(wrap(source)),
        other => other,
    }
}

/// An error about a value read from one of ferry's tables.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Other(what.to_string().into())
}
