//! Reconciliation after an unclean takeover: the stream's tail beyond the checkpoint is
//! read for the partition's messages, unless it is long and the dedup window covers it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, ErrorCode};
use futures::StreamExt as _;
use tracing::{debug, info, warn};
use uuid::Uuid;

use ferry_core::cloudevents::ContentMode;
use ferry_core::{ReconcileRequest, SinkError};

use super::NatsSink;
use super::wire::{ID_HEADER, partition_key};

/// Above this many stream messages beyond the checkpoint, reconciliation leans on the
/// broker's dedup window when it still covers the re-sends, instead of reading them all.
pub const RECONCILE_SCAN_THRESHOLD: u64 = 100_000;

/// Margin between the previous owner's lease expiry and the new owner's first re-send:
/// the dedup window must outlast both for re-sends to be dropped by the broker.
pub const RECONCILE_DEDUP_MARGIN: Duration = Duration::from_secs(10);

impl NatsSink {
    /// Implements [`Sink::reconcile`](ferry_core::Sink::reconcile); see its doc on the impl.
    pub(super) async fn reconcile_tail(
        &self,
        request: ReconcileRequest<'_>,
    ) -> Result<Vec<Uuid>, SinkError> {
        let stream = match self.jetstream.get_stream(&self.stream).await {
            Ok(stream) => stream,
            Err(err) => {
                return match err.kind() {
                    jetstream::context::GetStreamErrorKind::JetStream(js)
                        if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                    {
                        warn!(stream = %self.stream, "stream not found while reconciling: nothing to reconcile");
                        Ok(Vec::new())
                    }
                    _ => Err(SinkError::retryable(format!(
                        "cannot read the state of stream {}",
                        self.stream
                    ))
                    .with_source(err)),
                };
            }
        };
        let info = stream.cached_info();
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let Some(start) = scan_start(request.checkpoint, first, last, info.state.messages) else {
            return Ok(Vec::new());
        };
        if request
            .checkpoint
            .is_some_and(|checkpoint| checkpoint > last)
        {
            warn!(
                partition = request.partition,
                checkpoint = request.checkpoint,
                last_sequence = last,
                "checkpoint beyond the stream's end: the stream was recreated; scanning all of it"
            );
        }
        let beyond = last - start + 1;
        let window = info.config.duplicate_window;
        if beyond > RECONCILE_SCAN_THRESHOLD && dedup_covers(request.since_expiry, window) {
            info!(
                partition = request.partition,
                beyond,
                duplicate_window_secs = window.as_secs(),
                "tail too long to scan; the dedup window drops re-sends"
            );
            return Ok(Vec::new());
        }
        self.scan(&stream, start, last, request.owns_key).await
    }

    /// Reads the stream from `start` to `last` and collects the ids of messages whose
    /// partition key `owns_key` accepts. In binary mode the headers hold the key and the
    /// bodies are not fetched; in structured mode the key is in the body. Messages written
    /// in the other mode before a mode change are read as far as they carry their key.
    async fn scan(
        &self,
        stream: &jetstream::stream::Stream,
        start: u64,
        last: u64,
        owns_key: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Uuid>, SinkError> {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                headers_only: self.content_mode == ContentMode::Binary,
                ..Default::default()
            })
            .await
            .map_err(|err| {
                SinkError::retryable("cannot create the reconciliation consumer").with_source(err)
            })?;
        let mut messages = consumer.messages().await.map_err(|err| {
            SinkError::retryable("cannot read the stream for reconciliation").with_source(err)
        })?;
        let mut ids = Vec::new();
        let mut scanned = 0u64;
        loop {
            let next = tokio::time::timeout(self.ack_timeout, messages.next())
                .await
                .map_err(|_| {
                    SinkError::retryable(format!(
                        "reconciliation scan of stream {} stalled after {scanned} messages",
                        self.stream
                    ))
                })?;
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    return Err(SinkError::retryable("reconciliation scan failed").with_source(err));
                }
                None => break,
            };
            let (sequence, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(err) => {
                    return Err(SinkError::retryable(
                        "unreadable reply subject in reconciliation scan",
                    )
                    .with_source(err));
                }
            };
            if sequence > last {
                break;
            }
            scanned += 1;
            if let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| owned_id(h, &message.payload, owns_key))
            {
                ids.push(id);
            }
            // `pending` reaching 0 before `last` means the rest was deleted meanwhile.
            if sequence == last || pending == 0 {
                break;
            }
        }
        debug!(stream = %self.stream, start, last, scanned, found = ids.len(), "reconciliation scan finished");
        Ok(ids)
    }
}

/// The first sequence to read when reconciling, or `None` when nothing lies beyond the
/// checkpoint. A checkpoint beyond the end means the stream was recreated: read it all.
fn scan_start(checkpoint: Option<u64>, first: u64, last: u64, messages: u64) -> Option<u64> {
    if messages == 0 || last < first {
        return None;
    }
    let start = match checkpoint {
        Some(checkpoint) if checkpoint <= last => checkpoint.saturating_add(1).max(first),
        _ => first,
    };
    (start <= last).then_some(start)
}

/// Whether the broker still drops re-sends of what the previous owner published: its last
/// publish was at most `since_expiry` ago, and the re-sends follow within the margin.
fn dedup_covers(since_expiry: Duration, window: Duration) -> bool {
    since_expiry.saturating_add(RECONCILE_DEDUP_MARGIN) < window
}

/// The message id of a stored message of the partition, from its headers. A redelivery's
/// `Nats-Msg-Id` (`<id>:<attempt>`) is not a UUID and yields nothing: it must never mark a
/// pending later attempt as already sent.
fn owned_id(
    headers: &HeaderMap,
    body: &[u8],
    owns_key: &(dyn Fn(&str) -> bool + Sync),
) -> Option<Uuid> {
    if !owns_key(&partition_key(headers, body)?) {
        return None;
    }
    headers
        .get(NATS_MESSAGE_ID)
        .or_else(|| headers.get(HeaderName::from_static(ID_HEADER)))
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
}

#[cfg(test)]
mod tests {
    use ferry_core::cloudevents::STRUCTURED_CONTENT_TYPE;
    use ferry_core::message::CONTENT_TYPE_HEADER;

    use super::*;
    use crate::nats::wire::PARTITION_KEY_HEADER;

    #[test]
    fn scan_start_bounds() {
        // Empty stream, or nothing beyond the checkpoint.
        assert_eq!(scan_start(None, 0, 0, 0), None);
        assert_eq!(scan_start(Some(10), 1, 10, 10), None);
        // From the checkpoint on, or from the first still stored.
        assert_eq!(scan_start(Some(4), 1, 10, 10), Some(5));
        assert_eq!(scan_start(Some(2), 6, 10, 5), Some(6));
        assert_eq!(scan_start(None, 3, 10, 8), Some(3));
        // Checkpoint beyond the end: the stream was recreated.
        assert_eq!(scan_start(Some(50), 1, 10, 10), Some(1));
    }

    #[test]
    fn dedup_window_must_outlast_expiry_plus_margin() {
        let window = Duration::from_secs(120);
        assert!(dedup_covers(Duration::from_secs(5), window));
        assert!(!dedup_covers(Duration::from_secs(110), window));
        assert!(!dedup_covers(
            Duration::from_secs(5),
            Duration::from_secs(1)
        ));
    }

    #[test]
    fn reconciliation_ignores_redelivery_dedup_ids() {
        let id = Uuid::now_v7();
        let mut headers = HeaderMap::new();
        headers.insert(PARTITION_KEY_HEADER, "order/1");
        headers.insert(ID_HEADER, id.to_string().as_str());
        headers.insert(NATS_MESSAGE_ID, id.to_string().as_str());
        assert_eq!(owned_id(&headers, b"", &|_| true), Some(id));
        headers.insert(NATS_MESSAGE_ID, format!("{id}:2").as_str());
        assert_eq!(owned_id(&headers, b"", &|_| true), None);
    }

    #[test]
    fn reconciliation_reads_the_key_of_a_structured_event_from_its_body() {
        let id = Uuid::now_v7();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE_HEADER, STRUCTURED_CONTENT_TYPE);
        headers.insert(NATS_MESSAGE_ID, id.to_string().as_str());
        let body = br#"{"specversion":"1.0","partitionkey":"order/1","data":{"a":[1]}}"#;
        assert_eq!(owned_id(&headers, body, &|key| key == "order/1"), Some(id));
        assert_eq!(owned_id(&headers, body, &|key| key == "order/2"), None);
        assert_eq!(owned_id(&headers, b"not json", &|_| true), None);
        headers.insert(CONTENT_TYPE_HEADER, "application/json");
        assert_eq!(owned_id(&headers, body, &|_| true), None);
    }
}
