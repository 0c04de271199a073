//! How Redis's errors and error replies map to retryable and permanent sink errors.

use redis::RedisError;

use ferry_core::SinkError;

pub(super) fn connect_error(server: &str, err: RedisError) -> SinkError {
    if crate::tls::is_certificate_failure(&err) {
        let message = crate::tls::certificate_failure("redis", server, "sink.tls_ca_file");
        SinkError::permanent(message).with_source(err)
    } else if err.is_io_error() || err.is_timeout() || err.is_connection_refusal() {
        SinkError::retryable(format!("cannot reach redis at {server}")).with_source(err)
    } else {
        SinkError::permanent(format!("redis at {server} refused the connection")).with_source(err)
    }
}

/// A failed round trip: the scripts may or may not have run, which a retry sorts out (it
/// finds what they appended as present).
pub(super) fn request_error(server: &str, err: RedisError) -> SinkError {
    let message = if err.is_timeout() {
        format!("no reply from redis at {server} in time")
    } else if err.is_io_error() || err.is_connection_dropped() {
        format!("connection to redis at {server} lost")
    } else {
        format!("redis at {server} failed the append")
    };
    SinkError::retryable(message).with_source(err)
}

/// Classifies an error reply to an append: a key of another type or a missing permission
/// stays until an operator acts; anything else (out of memory, a replica, loading) may pass.
pub(super) fn classify_reply(stream: &str, reply: &str) -> SinkError {
    let code = reply.split_whitespace().next().unwrap_or_default();
    match code {
        "WRONGTYPE" => SinkError::permanent(format!(
            "key {stream} exists and is not a stream ({reply}); point stream_template elsewhere \
             or remove the key"
        )),
        "NOPERM" => SinkError::permanent(format!(
            "the redis user may not append to {stream} ({reply}); grant it XADD, XRANGE, \
             XREVRANGE, XINFO and EVALSHA on these keys"
        )),
        _ => SinkError::retryable(format!("redis refused the append to {stream}: {reply}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_carry_the_retry_decision() {
        assert!(!classify_reply("s", "WRONGTYPE Operation against a key").is_retryable());
        assert!(!classify_reply("s", "NOPERM this user has no permissions").is_retryable());
        assert!(classify_reply("s", "OOM command not allowed").is_retryable());
        assert!(classify_reply("s", "READONLY You can't write against a replica").is_retryable());
    }
}
