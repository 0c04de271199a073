//! The NATS JetStream sink (DESIGN.md §3, §6).
//!
//! Each message is published to a subject rendered from `subject_template`, with
//! `Nats-Msg-Id` = message id so that the stream drops a re-send within its duplicate
//! window. In binary content mode (the default) the CloudEvents attributes travel as `ce-*`
//! headers beside `content-type` and the user headers, and the payload is the body; in
//! structured mode (`content_mode = "structured"`) the body is the whole event as JSON
//! under `content-type: application/cloudevents+json`, and those two are the only headers
//! (for consumers that read bodies only). [`decode_message`] reads either.
//!
//! A batch is sent whole before any ack is awaited (acks pipelined; JetStream is fast only
//! with many in flight), and each ack's stream sequence becomes the message's
//! [`Delivery::position`], which the relay records as the partition checkpoint.
//!
//! After an unclean takeover, [`Sink::reconcile`] reads the stream's tail beyond that
//! checkpoint and returns the ids of the partition's messages already stored, so that a
//! re-send never depends on the dedup window alone (G4).
//!
//! Fencing (G5), when the subjects are exclusive to a partition (`fencing`): in each
//! batch, the first message on each subject carries `Nats-Expected-Last-Subject-Sequence`
//! = the sequence this owner last stored on that subject (looked up once per lease), and
//! nothing after it is sent until JetStream accepted it. A relay that lost the partition
//! while paused has its next such message refused by the server, whatever its clock says:
//! the check costs one round trip per subject per batch, not per message, so the rest of
//! the batch stays pipelined. What it cannot stop is the rest of a subject's run that a
//! relay was already sending when it was paused; the relay's own lease deadline, the
//! fenced mark, `Nats-Msg-Id` dedup and the consumer's inbox cover that.

mod config;
mod subject;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::header::{
    HeaderName, HeaderValue, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use uuid::Uuid;

use ferry_core::cloudevents::{
    ContentMode, DecodeError, STRUCTURED_CONTENT_TYPE, Source, binary_attributes, ext,
    is_structured_content_type, to_structured_json, user_headers,
};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::{
    Delivery, Lease, Message, ReceivedMessage, ReconcileRequest, Sink, SinkError, report_unsent,
};

pub use config::{InvalidNatsConfig, MAX_ACKS_IN_FLIGHT_LIMIT, NatsSinkConfig};
use subject::SubjectTemplate;

/// Above this many stream messages beyond the checkpoint, reconciliation leans on the
/// broker's dedup window when it still covers the re-sends, instead of reading them all.
pub const RECONCILE_SCAN_THRESHOLD: u64 = 100_000;

/// Margin between the previous owner's lease expiry and the new owner's first re-send:
/// the dedup window must outlast both for re-sends to be dropped by the broker.
pub const RECONCILE_DEDUP_MARGIN: Duration = Duration::from_secs(10);

/// Header carrying the partition key: what reconciliation selects a partition's messages by.
const PARTITION_KEY_HEADER: &str = "ce-partitionkey";

/// Header carrying the CloudEvents id: the fallback when a message has no `Nats-Msg-Id`.
const ID_HEADER: &str = "ce-id";

/// Publishes to a NATS JetStream stream; see the module docs.
pub struct NatsSink {
    client: Client,
    jetstream: jetstream::Context,
    stream: String,
    template: SubjectTemplate,
    source: Source,
    content_mode: ContentMode,
    /// Acks awaited at once, across concurrent batches; a batch takes its permits
    /// all at once per window, so batches never deadlock holding part of what they need.
    in_flight: Semaphore,
    window: usize,
    ack_timeout: Duration,
    /// The servers, without credentials, for messages.
    servers: String,
    /// Set when `fencing` is on.
    fence: Option<SubjectFence>,
}

/// The last stream sequence this relay stored on each subject, per partition it owns:
/// what the first message on that subject in the next batch expects.
#[derive(Debug, Default)]
struct SubjectFence {
    last: Mutex<HashMap<u32, HashMap<String, u64>>>,
}

impl SubjectFence {
    fn get(&self, partition: u32, subject: &str) -> Option<u64> {
        self.lock().get(&partition)?.get(subject).copied()
    }

    fn set(&self, partition: u32, subject: String, sequence: u64) {
        self.lock()
            .entry(partition)
            .or_default()
            .insert(subject, sequence);
    }

    fn forget_subject(&self, partition: u32, subject: &str) {
        if let Some(subjects) = self.lock().get_mut(&partition) {
            subjects.remove(subject);
        }
    }

    fn forget_partition(&self, partition: u32) {
        self.lock().remove(&partition);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, HashMap<String, u64>>> {
        // The map holds plain numbers; one left by a panicking thread is still consistent.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A sent message whose ack is awaited later, or, for a fenced head, already was.
enum PendingAck {
    InFlight(PublishAckFuture),
    Received(Result<PublishAck, PublishError>),
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("servers", &self.servers)
            .field("stream", &self.stream)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Validates `config`, connects once (no retry loop: an unreachable server is a
    /// retryable error naming it, for the caller to back off on), and gets or creates the
    /// stream with the configured name, subjects and duplicate window.
    pub async fn connect(config: &NatsSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let servers = checked
            .servers
            .iter()
            .map(|s| format!("{}://{}:{}", s.scheme(), s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",");

        let mut options = ConnectOptions::new()
            .name("ferry-relay")
            .event_callback(|event| async move { log_event(event) });
        if let Some(token) = &config.token {
            options = options.token(secrecy::ExposeSecret::expose_secret(token).to_owned());
        }
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|err| {
                SinkError::permanent(format!(
                    "cannot load nats credentials from {}",
                    path.display()
                ))
                .with_source(err)
            })?;
        }
        let client = options
            .connect(checked.servers)
            .await
            .map_err(|err| match err.kind() {
                ConnectErrorKind::Io
                | ConnectErrorKind::TimedOut
                | ConnectErrorKind::Dns
                | ConnectErrorKind::MaxReconnects => {
                    SinkError::retryable(format!("cannot reach nats at {servers}")).with_source(err)
                }
                _ => SinkError::permanent(format!("nats at {servers} refused the connection"))
                    .with_source(err),
            })?;

        let jetstream = jetstream::ContextBuilder::new()
            .timeout(checked.ack_timeout)
            .ack_timeout(checked.ack_timeout)
            .max_ack_inflight(config.max_acks_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        ensure_stream(
            &jetstream,
            config,
            &checked.template,
            checked.duplicate_window,
        )
        .await?;
        info!(servers = %servers, stream = %config.stream, max_payload = client.max_payload(), "nats sink connected");

        Ok(Self {
            client,
            jetstream,
            stream: config.stream.clone(),
            template: checked.template,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            content_mode: config.content_mode,
            in_flight: Semaphore::new(config.max_acks_in_flight),
            window: config.max_acks_in_flight,
            ack_timeout: checked.ack_timeout,
            servers,
            fence: checked.fencing.then(SubjectFence::default),
        })
    }

    /// Publishes one window of a batch: all of it sent, then the acks awaited in order
    /// (a fenced subject's first message in the batch excepted: see the module docs).
    /// Appends one outcome per message sent or refused; returns whether all succeeded, so
    /// that the caller sends nothing after a failure (which would reorder the stream).
    async fn publish_window(
        &self,
        window: &[Message],
        fenced_subjects: &mut HashSet<String>,
        outcomes: &mut Vec<Result<Delivery, SinkError>>,
    ) -> bool {
        // A window is at most `max_acks_in_flight` long, which validation caps far below
        // u32::MAX, so the cast is exact.
        let Ok(_permits) = self.in_flight.acquire_many(window.len() as u32).await else {
            outcomes.push(Err(SinkError::retryable("the nats sink is shut down")));
            return false;
        };
        // The subject of each message sent, kept only when fencing needs it.
        let mut sent: Vec<(Option<String>, PendingAck)> = Vec::with_capacity(window.len());
        // The relay hands over one partition's messages per batch.
        let partition = window[0].partition;
        let mut refused = None;
        for message in window {
            let subject = self.template.render(message);
            let expected = match &self.fence {
                Some(fence) if !fenced_subjects.contains(&subject) => {
                    match self.expected_sequence(fence, partition, &subject).await {
                        Ok(sequence) => Some(sequence),
                        Err(err) => {
                            refused = Some(err);
                            break;
                        }
                    }
                }
                _ => None,
            };
            let kept = self.fence.is_some().then(|| subject.clone());
            let ack = match self.send(message, subject, expected).await {
                Ok(ack) => ack,
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            };
            if expected.is_none() {
                sent.push((kept, PendingAck::InFlight(ack)));
                continue;
            }
            let result = ack.await;
            let accepted = result.is_ok();
            if let (true, Some(subject)) = (accepted, &kept) {
                fenced_subjects.insert(subject.clone());
            }
            sent.push((kept, PendingAck::Received(result)));
            if !accepted {
                break;
            }
        }
        // Each ack's timeout starts when it is awaited, so after one timeout the rest are
        // only checked for an ack already received: a stuck connection costs one
        // ack_timeout per window, not one per message.
        let mut all_ok = true;
        let mut stalled = false;
        for (subject, pending) in sent {
            let result = match pending {
                PendingAck::Received(result) => Some(result),
                PendingAck::InFlight(ack) if stalled => ack.into_future().now_or_never(),
                PendingAck::InFlight(ack) => Some(ack.await),
            };
            let outcome = match result {
                Some(Ok(ack)) => {
                    // A sequence of another stream (the subject was captured elsewhere)
                    // must not become this stream's checkpoint.
                    let ours = ack.stream == self.stream;
                    if let (Some(fence), Some(subject), true, false) =
                        (&self.fence, subject, ours, ack.duplicate)
                    {
                        fence.set(partition, subject, ack.sequence);
                    }
                    Ok(Delivery {
                        position: ours.then_some(ack.sequence),
                    })
                }
                Some(Err(err)) => {
                    stalled |= err.kind() == PublishErrorKind::TimedOut;
                    if let (Some(fence), Some(subject), PublishErrorKind::WrongLastSequence) =
                        (&self.fence, &subject, err.kind())
                    {
                        // Another relay wrote here. Should this one still own the partition
                        // (the other was a zombie), it reacquires it, reconciles and looks
                        // the sequence up again.
                        fence.forget_subject(partition, subject);
                    }
                    Err(ack_error(err))
                }
                None => Err(SinkError::retryable(
                    "no ack from jetstream in time (an earlier ack timed out)",
                )),
            };
            all_ok &= outcome.is_ok();
            outcomes.push(outcome);
        }
        match refused {
            Some(err) => {
                outcomes.push(Err(err));
                false
            }
            None => all_ok,
        }
    }

    /// The sequence the next fenced message on `subject` must find there: what this owner
    /// stored last, or, first in a lease, what the stream holds now (0: nothing yet).
    async fn expected_sequence(
        &self,
        fence: &SubjectFence,
        partition: u32,
        subject: &str,
    ) -> Result<u64, SinkError> {
        if let Some(sequence) = fence.get(partition, subject) {
            return Ok(sequence);
        }
        let stream = self
            .jetstream
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|err| {
                SinkError::retryable(format!("cannot reach stream {}", self.stream))
                    .with_source(err)
            })?;
        let sequence = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(last) => last.sequence,
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
            Err(err) => {
                return Err(SinkError::retryable(format!(
                    "cannot read the last sequence of subject {subject} for fencing"
                ))
                .with_source(err));
            }
        };
        fence.set(partition, subject.to_owned(), sequence);
        Ok(sequence)
    }

    /// Sends one message without waiting for its ack, expecting `expected_last` as the
    /// subject's last sequence when given. Fails before anything is sent when the message
    /// cannot be encoded or exceeds the server's `max_payload`.
    async fn send(
        &self,
        message: &Message,
        subject: String,
        expected_last: Option<u64>,
    ) -> Result<PublishAckFuture, SinkError> {
        let (mut headers, body) = self.encode(message)?;
        if let Some(sequence) = expected_last {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, sequence.to_string());
        }
        self.jetstream
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|err| match err.kind() {
                PublishErrorKind::MaxPayloadExceeded => SinkError::permanent(format!(
                    "message is larger than the nats server's max_payload of {} bytes (headers \
                     included); raise max_payload in nats-server or publish a reference to the data",
                    self.client.max_payload()
                ))
                .with_source(err),
                _ => SinkError::retryable("sending to nats failed").with_source(err),
            })
    }

    /// The headers and body of `message` in the configured content mode. In binary mode the
    /// user headers go first, so that ferry's own headers win on a name clash; in structured
    /// mode they are inside the event.
    fn encode(&self, message: &Message) -> Result<(HeaderMap, Bytes), SinkError> {
        let mut headers = HeaderMap::new();
        let (content_type, body) = match self.content_mode {
            ContentMode::Binary => {
                for (name, value) in user_headers(message) {
                    let header = HeaderName::from_str(name).map_err(|_| {
                        SinkError::permanent(format!(
                            "header name {name:?} cannot be sent in nats: use visible ASCII \
                             without ':'"
                        ))
                    })?;
                    headers.insert(header, header_value(name, Cow::Borrowed(value))?);
                }
                for (attribute, value) in binary_attributes(message, &self.source) {
                    let name = ce_header(attribute)?;
                    let value = header_value(name.as_ref(), value)?;
                    headers.insert(name, value);
                }
                (message.content_type(), message.payload.clone())
            }
            ContentMode::Structured => (
                STRUCTURED_CONTENT_TYPE,
                Bytes::from(to_structured_json(message, &self.source)),
            ),
        };
        // The broker's dedup key: the message id (`ce-id`), suffixed on a deliberate
        // redelivery so that the duplicate window does not drop it (`Message::dedup_id`).
        headers.insert(
            NATS_MESSAGE_ID,
            header_value("Nats-Msg-Id", Cow::Owned(message.dedup_id()))?,
        );
        headers.insert(
            HeaderName::from_static(CONTENT_TYPE_HEADER),
            header_value(CONTENT_TYPE_HEADER, Cow::Borrowed(content_type))?,
        );
        Ok((headers, body))
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

#[async_trait]
impl Sink for NatsSink {
    /// Sends the batch in windows of at most `max_acks_in_flight` messages; each window is
    /// sent whole before its acks are awaited. Once a message fails, nothing after it is
    /// sent: those messages are reported retryable ("not sent").
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut fenced_subjects = HashSet::new();
        for window in batch.chunks(self.window) {
            if !self
                .publish_window(window, &mut fenced_subjects, &mut outcomes)
                .await
            {
                break;
            }
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// A new lease: what this relay knew of the partition's subjects may be stale.
    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        if let Some(fence) = &self.fence {
            fence.forget_partition(lease.partition);
        }
        Ok(())
    }

    /// Returns nothing when the dedup window still covers re-sends and the tail is too
    /// long to read quickly; otherwise scans the stream from the checkpoint to the last
    /// sequence seen at the start (the whole stream when the checkpoint is unknown or lies
    /// beyond the end, i.e. the stream was recreated).
    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
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

    async fn shutdown(&self) {
        self.in_flight.close();
        if let Err(err) = self.client.flush().await {
            warn!(servers = %self.servers, error = %err, "final flush to nats failed");
        }
    }
}

/// Gets or creates the stream, and brings an existing stream's duplicate window to the
/// configured one (reconciliation skips scans only when that window covers the re-sends).
async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: &NatsSinkConfig,
    template: &SubjectTemplate,
    duplicate_window: Duration,
) -> Result<(), SinkError> {
    let wanted = jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: config.subjects.clone(),
        duplicate_window,
        ..Default::default()
    };
    let stream = jetstream
        .get_or_create_stream(wanted)
        .await
        .map_err(|err| {
            let retryable = match err.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(js) => is_transient(&js),
                jetstream::context::CreateStreamErrorKind::TimedOut
                | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable
                | jetstream::context::CreateStreamErrorKind::Response => true,
                _ => false,
            };
            let message = format!("cannot get or create the nats stream {}", config.stream);
            if retryable {
                SinkError::retryable(message).with_source(err)
            } else {
                SinkError::permanent(message).with_source(err)
            }
        })?;
    let existing = stream.cached_info().config.clone();
    if existing.subjects != config.subjects {
        warn!(stream = %config.stream, existing = ?existing.subjects, configured = ?config.subjects, "the stream exists with other subjects; keeping them");
    }
    if !existing.subjects.iter().any(|s| template.may_match(s)) {
        warn!(stream = %config.stream, subjects = ?existing.subjects, template = %config.subject_template, "the stream's subjects do not match subject_template: publishes will find no stream");
    }
    if existing.duplicate_window != duplicate_window {
        let updated = jetstream::stream::Config {
            duplicate_window,
            ..existing.clone()
        };
        match jetstream.update_stream(&updated).await {
            Ok(_) => {
                info!(stream = %config.stream, from_secs = existing.duplicate_window.as_secs(), to_secs = duplicate_window.as_secs(), "stream duplicate window updated")
            }
            Err(err) => {
                warn!(stream = %config.stream, existing_secs = existing.duplicate_window.as_secs(), configured_secs = duplicate_window.as_secs(), error = %err, "cannot update the stream's duplicate window; dedup covers only the existing one")
            }
        }
    }
    Ok(())
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

/// The partition key of a stored message: its `ce-partitionkey` header in binary mode, the
/// `partitionkey` attribute of the event in the body in structured mode.
fn partition_key<'m>(headers: &'m HeaderMap, body: &[u8]) -> Option<Cow<'m, str>> {
    if let Some(key) = headers.get(HeaderName::from_static(PARTITION_KEY_HEADER)) {
        return Some(Cow::Borrowed(key.as_str()));
    }
    let content_type = headers.get(HeaderName::from_static(CONTENT_TYPE_HEADER))?;
    if !is_structured_content_type(content_type.as_str()) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Keyed {
        partitionkey: String,
    }
    let event: Keyed = serde_json::from_slice(body).ok()?;
    Some(Cow::Owned(event.partitionkey))
}

/// Rebuilds a message this sink published, as a consumer does (e.g. before handing it to
/// an inbox): structured when its `content-type` is a CloudEvents event format, binary
/// otherwise, whichever `content_mode` the relay had.
pub fn decode_message(message: &async_nats::Message) -> Result<ReceivedMessage, DecodeError> {
    let headers = message.headers.as_ref();
    let structured = headers
        .and_then(|h| h.get(HeaderName::from_static(CONTENT_TYPE_HEADER)))
        .is_some_and(|content_type| is_structured_content_type(content_type.as_str()));
    if structured {
        let event = std::str::from_utf8(&message.payload)
            .map_err(|err| DecodeError::Json(format!("the body is not UTF-8: {err}")))?;
        return ReceivedMessage::from_structured_json(event);
    }
    let pairs = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.as_ref(), value.as_str()))
        });
    ReceivedMessage::from_binary(pairs, message.payload.clone())
}

/// `ce-<attribute>`, without allocating for the attributes ferry sends.
fn ce_header(attribute: &'static str) -> Result<HeaderName, SinkError> {
    let name = match attribute {
        "specversion" => "ce-specversion",
        "id" => ID_HEADER,
        "source" => "ce-source",
        "type" => "ce-type",
        "subject" => "ce-subject",
        "time" => "ce-time",
        ext::AGGREGATE_TYPE => "ce-aggregatetype",
        ext::AGGREGATE_VERSION => "ce-aggregateversion",
        ext::PARTITION_KEY => PARTITION_KEY_HEADER,
        ext::SEQUENCE => "ce-sequence",
        other => {
            return HeaderName::from_str(&format!("ce-{other}")).map_err(|_| {
                SinkError::permanent(format!(
                    "CloudEvents attribute {other:?} is not a valid header name"
                ))
            });
        }
    };
    Ok(HeaderName::from_static(name))
}

/// A header value, refused (permanently: the stored message will not change) when it holds
/// a line break, which would end the NATS header block early.
fn header_value(name: &str, value: Cow<'_, str>) -> Result<HeaderValue, SinkError> {
    if value.contains(['\r', '\n']) {
        return Err(SinkError::permanent(format!(
            "header {name:?} has a line break in its value, which nats headers cannot carry"
        )));
    }
    Ok(match value {
        Cow::Borrowed(value) => HeaderValue::from(value),
        Cow::Owned(value) => HeaderValue::from(value),
    })
}

/// Classifies a failed ack: connection trouble and timeouts may pass on retry (the dedup
/// window makes a re-send of a stored message harmless); a JetStream rejection is
/// permanent unless it is about the server's state rather than the message.
fn ack_error(err: jetstream::context::PublishError) -> SinkError {
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
fn is_transient(err: &jetstream::Error) -> bool {
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

fn log_event(event: Event) {
    match event {
        Event::Connected => info!("nats connection established"),
        Event::Disconnected => warn!("nats connection lost; reconnecting"),
        // Sent when the sink shuts down: the normal end, not a problem.
        Event::Closed => info!("nats connection closed"),
        other => warn!(event = %other, "nats client event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn ce_headers_are_static_and_prefixed() {
        for name in ["specversion", "id", "time", ext::PARTITION_KEY] {
            let header = ce_header(name).expect("valid");
            let text: &str = header.as_ref();
            assert_eq!(text, format!("ce-{name}"));
        }
    }

    #[test]
    fn line_breaks_in_header_values_are_permanent_errors() {
        let err = header_value("ce-type", Cow::Borrowed("a\nb")).expect_err("refused");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("ce-type"));
        assert_eq!(
            header_value("x", Cow::Owned("fine".into()))
                .expect("ok")
                .as_str(),
            "fine"
        );
    }
}
