//! How lapin's errors map to retryable and permanent sink errors.

use ferry_core::SinkError;

/// AMQP reply codes that repeat for the same message until an operator acts.
const NO_ROUTE: u16 = 312;
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;

pub(super) fn connect_error(server: &str, err: lapin::Error) -> SinkError {
    if crate::tls::is_certificate_failure(&err) {
        let message = crate::tls::certificate_failure("amqp broker", server, "sink.tls_ca_file");
        return SinkError::permanent(message).with_source(err);
    }
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == ACCESS_REFUSED => {
            SinkError::permanent(format!(
                "amqp broker at {server} refused the login or the virtual host"
            ))
            .with_source(err)
        }
        _ => SinkError::retryable(format!("cannot reach amqp broker at {server}")).with_source(err),
    }
}

/// Classifies a lapin error: the broker's refusals that repeat for the same message
/// (not found, access refused, precondition failed, e.g. too large) are permanent;
/// connection trouble and everything else may pass on retry.
pub(super) fn broker_error(context: &str, err: lapin::Error) -> SinkError {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.get_id(),
                NO_ROUTE | ACCESS_REFUSED | NOT_FOUND | PRECONDITION_FAILED
            ) =>
        {
            SinkError::permanent(format!("{context}: {}", amqp.get_message())).with_source(err)
        }
        _ => SinkError::retryable(context.to_owned()).with_source(err),
    }
}
