//! Appending a batch window: the messages grouped by stream, one `append.lua` call per
//! stream, all in one pipeline, and each script's reply turned into outcomes.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{RedisResult, Script, ScriptInvocation};
use tracing::{debug, info, warn};

use ferry_core::cloudevents::binary_attributes;
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::{Delivery, Message, SinkError};

use super::RedisStreamSink;
use super::error::{classify_reply, request_error};
use super::wire::{DATA_FIELD, field_name, is_reserved};

/// The append script; see `append.lua` and the module docs.
pub(super) static APPEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("append.lua")));

/// The messages of one batch that go to one stream, as batch indices in batch order.
#[derive(Debug)]
struct StreamGroup {
    stream: String,
    indices: Vec<usize>,
}

impl RedisStreamSink {
    /// Splits `batch` by stream. A message whose sequence cannot be an entry id gets its
    /// error, and nothing after it in its stream is sent.
    fn group(
        &self,
        batch: &[Message],
        outcomes: &mut [Option<Result<Delivery, SinkError>>],
    ) -> Vec<StreamGroup> {
        let mut groups: Vec<StreamGroup> = Vec::new();
        let mut by_stream: HashMap<String, usize> = HashMap::new();
        let mut stopped: Vec<String> = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            let stream = self.stream_of(message);
            if stopped.contains(&stream) {
                continue;
            }
            if message.sequence < 1 {
                outcomes[index] = Some(Err(SinkError::permanent(format!(
                    "sequence {} cannot be a redis stream entry id (ids start at 1-0)",
                    message.sequence
                ))));
                stopped.push(stream);
                continue;
            }
            match by_stream.get(&stream) {
                Some(&at) => groups[at].indices.push(index),
                None => {
                    by_stream.insert(stream.clone(), groups.len());
                    groups.push(StreamGroup {
                        stream,
                        indices: vec![index],
                    });
                }
            }
        }
        groups
    }

    /// The script call appending `group`'s messages.
    fn invocation<'a>(&self, group: &StreamGroup, batch: &[Message]) -> ScriptInvocation<'a> {
        let mut invocation = APPEND.prepare_invoke();
        invocation
            .key(&group.stream)
            .arg(self.max_len)
            .arg(self.dedup_scan_entries);
        for &index in &group.indices {
            let message = &batch[index];
            let user: Vec<(&str, &str)> = message
                .headers
                .iter()
                .filter(|(name, _)| !is_reserved(name))
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            let attributes = binary_attributes(message, &self.source);
            // The attributes, content-type, the user headers and data.
            let fields = attributes.len() + 1 + user.len() + 1;
            invocation
                .arg(message.sequence)
                .arg(message.id.to_string())
                .arg(fields);
            for (attribute, value) in attributes {
                invocation
                    .arg(field_name(attribute).as_ref())
                    .arg(value.as_ref());
            }
            invocation
                .arg(CONTENT_TYPE_HEADER)
                .arg(message.content_type());
            for (name, value) in user {
                invocation.arg(name).arg(value);
            }
            invocation.arg(DATA_FIELD).arg(&message.payload[..]);
        }
        invocation
    }

    /// Runs the scripts of all groups in one pipeline (one round trip), loading the script
    /// and running them again if Redis lost it (a restart, `SCRIPT FLUSH`): a second run
    /// finds what the first appended as present.
    async fn run(
        &self,
        invocations: &[ScriptInvocation<'_>],
    ) -> RedisResult<Vec<RedisResult<Vec<String>>>> {
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors();
        for invocation in invocations {
            pipeline.invoke_script(invocation);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<RedisResult<Vec<String>>> = pipeline.query_async(&mut connection).await?;
        let lost_script = replies.iter().any(|reply| {
            matches!(reply, Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        });
        if !lost_script {
            return Ok(replies);
        }
        info!(server = %self.server, "redis lost the append script; loading it again");
        APPEND.prepare_invoke().load_async(&mut connection).await?;
        pipeline.query_async(&mut connection).await
    }

    /// Turns one group's script reply into outcomes.
    fn settle(
        &self,
        group: &StreamGroup,
        batch: &[Message],
        reply: RedisResult<Vec<String>>,
        outcomes: &mut [Option<Result<Delivery, SinkError>>],
    ) {
        let stream = &group.stream;
        let statuses = match reply {
            Ok(statuses) => statuses,
            Err(err) => {
                let error = classify_reply(stream, &err.to_string()).with_source(err);
                outcomes[group.indices[0]] = Some(Err(error));
                return;
            }
        };
        for (pair, &index) in statuses.chunks(2).zip(&group.indices) {
            let [status, detail] = pair else {
                outcomes[index] = Some(Err(SinkError::retryable(format!(
                    "unreadable reply from the append script on stream {stream}"
                ))));
                return;
            };
            let message = &batch[index];
            let outcome = match status.as_str() {
                "added" | "present" => Ok(Delivery::default()),
                "late" => {
                    debug!(stream = %stream, message_id = %message.id, sequence = message.sequence, entry = %detail, "late commit appended after the stream's top");
                    Ok(Delivery::default())
                }
                "late_unverified" => {
                    warn!(stream = %stream, message_id = %message.id, sequence = message.sequence, entry = %detail, scanned = self.dedup_scan_entries, "late commit appended without a full duplicate check: more than dedup_scan_entries entries lie above its sequence");
                    Ok(Delivery::default())
                }
                "conflict" => Err(SinkError::permanent(format!(
                    "stream {stream} already holds another message at entry {detail}: another \
                     outbox writes this stream, or the outbox was recreated; point \
                     stream_template elsewhere or delete the stream"
                ))),
                "error" => Err(classify_reply(stream, detail)),
                other => Err(SinkError::retryable(format!(
                    "unexpected status {other:?} from the append script on stream {stream}"
                ))),
            };
            let failed = outcome.is_err();
            outcomes[index] = Some(outcome);
            if failed {
                return;
            }
        }
    }

    /// Appends one window of a batch with one script call per stream, all in one pipeline.
    /// Within a stream, nothing after a failed message is appended; those messages are
    /// reported retryable ("not sent").
    pub(super) async fn publish_window(
        &self,
        window: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes: Vec<Option<Result<Delivery, SinkError>>> =
            std::iter::repeat_with(|| None).take(window.len()).collect();
        let groups = self.group(window, &mut outcomes);
        let invocations: Vec<ScriptInvocation<'_>> = groups
            .iter()
            .map(|group| self.invocation(group, window))
            .collect();
        if !invocations.is_empty() {
            match self.run(&invocations).await {
                Ok(replies) => {
                    for (group, reply) in groups.iter().zip(replies) {
                        self.settle(group, window, reply, &mut outcomes);
                    }
                }
                Err(err) => {
                    let error = request_error(&self.server, err);
                    let first = groups.iter().map(|g| g.indices[0]).min().unwrap_or(0);
                    outcomes[first] = Some(Err(error));
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(SinkError::retryable(
                        "not sent: an earlier message of its stream failed",
                    ))
                })
            })
            .collect()
    }
}
