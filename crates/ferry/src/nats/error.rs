//! How JetStream's failures map to retryable, permanent and fenced sink errors.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, ErrorCode};

use ferry_core::SinkError;

/// Classifies a failed ack: connection trouble and timeouts may pass on retry (the dedup
/// window makes a re-send of a stored message harmless); a JetStream rejection is
/// permanent unless it is about the server's state rather than the message.
pub(super) fn ack_error(err: jetstream::context::PublishError) -> SinkError {
    let error = match err.kind() {
        PublishErrorKind::TimedOut => SinkError::retryable("no ack from jetstream in time"),
        PublishErrorKind::BrokenPipe => SinkError::retryable("nats connection lost before the ack"),
        PublishErrorKind::StreamNotFound => {
            SinkError::retryable("no stream answered for the subject (no responders)")
        }
        PublishErrorKind::MaxAckPending => SinkError::retryable("too many acks pending"),
        PublishErrorKind::MaxPayloadExceeded => {
            SinkError::permanent("message is larger than the nats server's max_payload")
        }
        PublishErrorKind::WrongLastSequence => SinkError::fenced(
            "fenced by jetstream: another relay stored a message on this subject since this \
             one's last; the partition stops here and its next owner reconciles",
        ),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::Other => {
            match jetstream_error(&err) {
                Some(js) if is_transient(js) => {
                    SinkError::retryable("jetstream cannot store the message now")
                }
                Some(_) => SinkError::permanent("jetstream rejected the message"),
                None => SinkError::retryable("unreadable publish ack"),
            }
        }
    };
    error.with_source(err)
}

fn jetstream_error(err: &jetstream::context::PublishError) -> Option<&jetstream::Error> {
    std::error::Error::source(err)?.downcast_ref::<jetstream::Error>()
}

/// JetStream errors about the server's state (leadership, storage, load), which pass
/// without any change to the message.
pub(super) fn is_transient(err: &jetstream::Error) -> bool {
    const TRANSIENT: [ErrorCode; 16] = [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_INCOMPLETE,
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
        ErrorCode::STORAGE_RESOURCES_EXCEEDED,
        ErrorCode::MEMORY_RESOURCES_EXCEEDED,
        ErrorCode::STREAM_STORE_FAILED,
        ErrorCode::STREAM_OFFLINE,
        ErrorCode::RAFT_GENERAL,
        ErrorCode::STREAM_MAX_STREAM_BYTES_EXCEEDED,
        ErrorCode::STREAM_TOO_MANY_REQUESTS,
        ErrorCode::STREAM_MOVE_IN_PROGRESS,
        ErrorCode::JETSTREAM_NOT_ENABLED,
    ];
    matches!(err.code(), 408 | 429 | 503) || TRANSIENT.contains(&err.error_code())
}
