//! Publishing a batch window: every message sent before any ack is awaited, and the
//! subject sequence fencing that checks the first message on each subject per batch.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::FutureExt as _;

use ferry_core::{Delivery, Message, SinkError};

use super::NatsSink;
use super::error::ack_error;

/// The last stream sequence this relay stored on each subject, per partition it owns:
/// what the first message on that subject in the next batch expects.
#[derive(Debug, Default)]
pub(super) struct SubjectFence {
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

    pub(super) fn forget_partition(&self, partition: u32) {
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

impl NatsSink {
    /// Publishes one window of a batch: all of it sent, then the acks awaited in order
    /// (a fenced subject's first message in the batch excepted: see the module docs).
    /// Appends one outcome per message sent or refused; returns whether all succeeded, so
    /// that the caller sends nothing after a failure (which would reorder the stream).
    pub(super) async fn publish_window(
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
}
