//! The capture's errors, each saying what to do: a lost lock (stop, a standby takes over),
//! a missing privilege, a binlog position the server no longer has.

use ferry_core::StoreError;

use super::Capture;
use crate::mysql::MyDialect;
use crate::sql::{Dialect as _, store_error};
use crate::tls::{certificate_failure, is_certificate_failure};

pub(super) fn lost_lock(name: &str, why: &str) -> StoreError {
    StoreError::Unavailable(
        format!(
            "lost the capture lock {name:?} ({why}): stop streaming, another relay may take over"
        )
        .into(),
    )
}

pub(super) fn privilege_error(err: sqlx::Error, privilege: &str) -> StoreError {
    let denied = err
        .as_database_error()
        .and_then(|db| db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|db| matches!(db.number(), 1227 | 1045 | 1044));
    if denied {
        StoreError::Other(format!("log capture needs the {privilege} privilege: GRANT {privilege} ON *.* TO <store user>: {err}").into())
    } else {
        store_error::<MyDialect>(err)
    }
}

/// A binlog connection's error: refused privileges, a refused server certificate and a
/// position the server no longer has are said plainly; I/O errors are retryable.
pub(crate) fn binlog_error(err: mysql_async::Error, capture: &Capture) -> StoreError {
    if is_certificate_failure(&err) {
        let message = certificate_failure(
            "MariaDB's binlog",
            &capture.endpoint,
            MyDialect::TLS_CA_SETTING,
        );
        return StoreError::Other(format!("{message}: {err}").into());
    }
    match &err {
        mysql_async::Error::Server(server) => match server.code {
            1227 | 1045 | 1044 => StoreError::Other(format!(
                "log capture needs the REPLICATION SLAVE privilege: GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO <store user>: {err}"
            ).into()),
            1236 => StoreError::Other(format!(
                "the server no longer has the binlog after the confirmed capture position (purged?): publish what is left with capture.mode = \"poll\", then delete the row of {}.{}capture_position to start log capture afresh: {err}",
                capture.database,
                capture.outbox_table.trim_end_matches("outbox")
            ).into()),
            _ => StoreError::Unavailable(err.into()),
        },
        _ => StoreError::Unavailable(err.into()),
    }
}
