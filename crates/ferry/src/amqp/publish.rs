//! Publishing: a batch in windows of `confirm_window` with confirms pipelined, returned
//! messages matched by `message_id`, and a blocked partition's probe with one message.

use lapin::Confirmation;
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use tokio::time::{Instant, timeout_at};
use tracing::warn;
use uuid::Uuid;

use ferry_core::{Delivery, Message, SinkError, report_unsent};

use super::error::broker_error;
use super::{AmqpSink, lock};

impl AmqpSink {
    /// Implements [`Sink::publish`](ferry_core::Sink::publish); see its doc on the impl.
    pub(super) async fn publish_batch(
        &self,
        batch: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let Some(first) = batch.first() else {
            return Vec::new();
        };
        let partition = first.partition;
        let cautious = lock(&self.cautious).contains(&partition);
        let mut outcomes = if cautious {
            let probe = self.publish_run(partition, &batch[..1]).await;
            if probe.iter().all(Result::is_ok) && batch.len() > 1 {
                let mut outcomes = probe;
                outcomes.extend(self.publish_windows(partition, &batch[1..]).await);
                outcomes
            } else {
                probe
            }
        } else {
            self.publish_windows(partition, batch).await
        };
        let failed = outcomes.len() < batch.len() || outcomes.iter().any(Result::is_err);
        if failed {
            lock(&self.cautious).insert(partition);
        } else if cautious {
            lock(&self.cautious).remove(&partition);
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// Publishes `messages` on the partition's channel and awaits their confirms; one
    /// outcome per message sent or refused, in order, then nothing for the messages not
    /// sent after a refusal.
    async fn publish_run(
        &self,
        partition: u32,
        messages: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(err) => {
                outcomes.push(Err(err));
                return outcomes;
            }
        };
        let channel = match self.channel(&connection, partition).await {
            Ok(channel) => channel,
            Err(err) => {
                outcomes.push(Err(err));
                return outcomes;
            }
        };
        let mut confirms = Vec::with_capacity(messages.len());
        let mut refused = None;
        for message in messages {
            let sent = match self.prepare(message) {
                Ok(prepared) => match self
                    .ensure_exchange(&connection, prepared.exchange.as_str())
                    .await
                {
                    Ok(()) => channel
                        .basic_publish(
                            prepared.exchange,
                            prepared.routing_key,
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &message.payload,
                            prepared.properties,
                        )
                        .await
                        .map_err(|err| broker_error("publishing failed", err)),
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        // One deadline for the batch: a stuck broker costs one timeout, not one per message.
        let deadline = Instant::now() + self.confirm_timeout;
        let mut returned: Vec<BasicReturnMessage> = Vec::new();
        let mut channel_failed = false;
        for confirm in confirms {
            let outcome = match timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(carried))) => {
                    returned.extend(carried);
                    Ok(Delivery::default())
                }
                Ok(Ok(Confirmation::Nack(carried))) => {
                    returned.extend(carried);
                    Err(SinkError::retryable(
                        "the broker refused to take responsibility for the message (basic.nack)",
                    ))
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    channel_failed = true;
                    Err(SinkError::retryable("the channel is not in confirm mode"))
                }
                Ok(Err(err)) => {
                    channel_failed = true;
                    Err(broker_error("no publisher confirm", err))
                }
                Err(_) => {
                    channel_failed = true;
                    Err(SinkError::retryable(format!(
                        "no publisher confirm from {} in time",
                        self.server
                    )))
                }
            };
            outcomes.push(outcome);
        }
        for message in returned {
            self.settle_return(messages, &mut outcomes, message);
        }
        if let Some(err) = refused {
            channel_failed |= err.is_retryable();
            outcomes.push(Err(err));
        }
        if channel_failed || !channel.status().connected() {
            self.discard_channel(partition);
        }
        outcomes
    }

    /// Publishes `messages` in windows of `confirm_window`, each window's confirms awaited
    /// before the next is sent; stops after a window with a failure.
    async fn publish_windows(
        &self,
        partition: u32,
        messages: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for window in messages.chunks(self.confirm_window) {
            let sent = self.publish_run(partition, window).await;
            let failed = sent.len() < window.len() || sent.iter().any(Result::is_err);
            outcomes.extend(sent);
            if failed {
                break;
            }
        }
        outcomes
    }

    /// Marks the message `returned` names as failed: the broker could not route it.
    fn settle_return(
        &self,
        messages: &[Message],
        outcomes: &mut [Result<Delivery, SinkError>],
        returned: BasicReturnMessage,
    ) {
        let id = returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let reason = format!(
            "the broker returned the message as unroutable ({} {}): no queue is bound to \
             exchange {:?} for routing key {:?}; bind one (or an alternate exchange) and the \
             partition resumes",
            returned.reply_code,
            returned.reply_text,
            returned.delivery.exchange.as_str(),
            returned.delivery.routing_key.as_str()
        );
        match messages
            .iter()
            .position(|message| Some(message.id) == id)
            .and_then(|at| outcomes.get_mut(at))
        {
            Some(outcome) => *outcome = Err(SinkError::permanent(reason)),
            // Not ours (cannot happen: every publish carries its id); fail the whole run
            // rather than count an unroutable message as delivered.
            None => {
                warn!(message_id = ?id, "a returned message matches no message of the batch");
                for outcome in outcomes.iter_mut() {
                    *outcome = Err(SinkError::retryable(reason.clone()));
                }
            }
        }
    }
}
