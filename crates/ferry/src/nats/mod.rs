//! The NATS JetStream sink (docs/DESIGN.md §3, §6).
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
//!
//! Where things are: `config.rs` has the settings and their validation, `subject.rs` the
//! subject templates, `publish.rs` a batch window's sends, pipelined acks and subject
//! fencing, `reconcile.rs` the stream tail scan, `wire.rs` the CloudEvents headers or
//! structured body and [`decode_message`], `error.rs` the retry decision for JetStream's
//! errors.

mod config;
mod error;
mod publish;
mod reconcile;
mod subject;
mod wire;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use async_trait::async_trait;
use tokio::sync::Semaphore;
use tracing::{info, warn};
use uuid::Uuid;

use ferry_core::ErrorChain;
use ferry_core::cloudevents::{ContentMode, Source};
use ferry_core::{Delivery, Lease, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use config::{InvalidNatsConfig, MAX_ACKS_IN_FLIGHT_LIMIT, NatsSinkConfig};
use error::is_transient;
use publish::SubjectFence;
pub use reconcile::{RECONCILE_DEDUP_MARGIN, RECONCILE_SCAN_THRESHOLD};
use subject::SubjectTemplate;
pub use wire::decode_message;

/// How long `check` waits for the stream's answer. A request sent just as the connection
/// drops, before the client has noticed, waits for the client's own request timeout (10 s);
/// answering sooner keeps the answer named (the readiness check gives up after 5 s with
/// a bare "no answer").
const CHECK_WITHIN: Duration = Duration::from_secs(3);

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
        if let Some((user, password)) = &checked.credentials {
            options = options.user_and_password(
                user.clone(),
                secrecy::ExposeSecret::expose_secret(password).to_owned(),
            );
        }
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
        if let Some(path) = &config.tls_ca_file {
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        let client = options
            .connect(checked.servers)
            .await
            .map_err(|err| match err.kind() {
                _ if crate::tls::is_certificate_failure(&err) => SinkError::permanent(
                    crate::tls::certificate_failure("nats", &servers, "sink.tls_ca_file"),
                )
                .with_source(err),
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
        self.reconcile_tail(request).await
    }

    /// The client's connection state, then one stream info request answered within
    /// [`CHECK_WITHIN`]: the server answers and JetStream holds the stream.
    async fn check(&self) -> Result<(), SinkError> {
        let state = self.client.connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(SinkError::retryable(format!(
                "nats at {} is not connected ({state})",
                self.servers
            )));
        }
        let unanswered = || {
            format!(
                "nats at {} does not answer for stream {}",
                self.servers, self.stream
            )
        };
        match tokio::time::timeout(CHECK_WITHIN, self.jetstream.get_stream(&self.stream)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(SinkError::retryable(unanswered()).with_source(err)),
            Err(_) => Err(SinkError::retryable(format!(
                "{} within {} s",
                unanswered(),
                CHECK_WITHIN.as_secs()
            ))),
        }
    }

    async fn shutdown(&self) {
        self.in_flight.close();
        if let Err(err) = self.client.flush().await {
            warn!(servers = %self.servers, error = %ErrorChain(&err), "final flush to nats failed");
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
                warn!(stream = %config.stream, existing_secs = existing.duplicate_window.as_secs(), configured_secs = duplicate_window.as_secs(), error = %ErrorChain(&err), "cannot update the stream's duplicate window; dedup covers only the existing one")
            }
        }
    }
    Ok(())
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
