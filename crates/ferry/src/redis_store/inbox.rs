//! The consumer inbox on Redis, for consumers whose effects are not in SQL.

use std::time::Duration;

use ::redis::ScriptInvocation;
use ::redis::aio::ConnectionManager;

use ferry_core::inbox::{Admission, ProcessError, Processed};
use ferry_core::{ReceivedMessage, StoreError};

use super::error::store_error;
use super::scripts::{INBOX_SOURCE, SCRIPTS};
use super::{KeyPrefix, RedisWrites, millis};

/// Records processed ids (each for `id_ttl`) and the last applied version per aggregate
/// (kept for good) for one named consumer, in one script per message:
/// `{prefix}inbox:{consumer}:id:{id}` (a string with a TTL) and
/// `{prefix}inbox:{consumer}:versions` (a hash).
///
/// Redis has no transaction a handler can run inside, so the order differs from the SQL
/// inboxes: [`process`](Self::process) first asks (writing nothing) whether the message is
/// new and current, runs the handler, which returns its effects as [`RedisWrites`], then
/// records the message and applies those writes in one atomic step that checks again. A
/// handler whose effects live outside Redis (an e-mail, an HTTP call) may run again if the
/// consumer crashes between its effect and the record: make such effects idempotent.
///
/// Why ids expire and versions do not: the id record stops redeliveries of a message within
/// `id_ttl`; after that, the aggregate's last version still refuses it as stale, so the id
/// set stays bounded without ever applying an old message twice.
#[derive(Clone)]
pub struct RedisInbox {
    conn: ConnectionManager,
    prefix: KeyPrefix,
    consumer: String,
    id_ttl: Duration,
}

impl std::fmt::Debug for RedisInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisInbox")
            .field("prefix", &self.prefix)
            .field("consumer", &self.consumer)
            .field("id_ttl", &self.id_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisInbox {
    /// `consumer` names the subscriber (1 to 100 letters, digits, `_`, `.`, `-`): consumers
    /// sharing a Redis keep separate records. `id_ttl` is how long a processed id is
    /// remembered (at least 1 ms); make it longer than the broker's redelivery horizon.
    pub fn new(
        conn: ConnectionManager,
        prefix: KeyPrefix,
        consumer: impl Into<String>,
        id_ttl: Duration,
    ) -> Result<Self, StoreError> {
        let consumer = consumer.into();
        let valid = (1..=100).contains(&consumer.len())
            && consumer
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(StoreError::Other(
                format!(
                    "inbox consumer {consumer:?} must be 1 to 100 letters, digits, '_', '.' or '-'"
                )
                .into(),
            ));
        }
        Ok(Self {
            conn,
            prefix,
            consumer,
            id_ttl: id_ttl.max(Duration::from_millis(1)),
        })
    }

    /// The inbox script's text, for consumers in other languages (README, "Inbox on Redis").
    pub fn script() -> &'static str {
        INBOX_SOURCE
    }

    /// Says whether `message` would be applied, writing nothing.
    pub async fn check(&self, message: &ReceivedMessage) -> Result<Admission, StoreError> {
        self.run("check", message, &RedisWrites::new()).await
    }

    /// Records `message` and says whether to apply it; `writes` are applied in the same
    /// atomic step, and only if the verdict is [`Admission::Apply`].
    pub async fn admit(
        &self,
        message: &ReceivedMessage,
        writes: &RedisWrites,
    ) -> Result<Admission, StoreError> {
        self.run("admit", message, writes).await
    }

    /// Runs `handler` for `message` if it is new and current, then records it and applies
    /// the writes the handler added, atomically. If another instance of this consumer
    /// recorded the message (or a newer version) meanwhile, the writes are dropped and the
    /// verdict says why.
    pub async fn process<T, E>(
        &self,
        message: &ReceivedMessage,
        handler: impl AsyncFnOnce(&ReceivedMessage, &mut RedisWrites) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        if let skip @ (Admission::Duplicate | Admission::Stale { .. }) = self.check(message).await?
        {
            return Ok(not_applied(skip));
        }
        let mut writes = RedisWrites::new();
        let output = handler(message, &mut writes)
            .await
            .map_err(ProcessError::Handler)?;
        Ok(match self.admit(message, &writes).await? {
            Admission::Apply { previous_version } => Processed::Applied {
                output,
                previous_version,
            },
            skip => not_applied(skip),
        })
    }

    async fn run(
        &self,
        mode: &str,
        message: &ReceivedMessage,
        writes: &RedisWrites,
    ) -> Result<Admission, StoreError> {
        let mut invocation: ScriptInvocation<'_> = SCRIPTS.inbox.prepare_invoke();
        for key in writes.keys() {
            invocation.key(key.as_slice());
        }
        invocation
            .arg(self.prefix.as_str())
            .arg(&self.consumer)
            .arg(mode)
            .arg(message.id.to_string())
            .arg(&message.aggregate_type)
            .arg(&message.aggregate_id)
            .arg(message.version)
            .arg(millis(self.id_ttl))
            .arg(writes.len());
        writes.write_args(&mut invocation);
        let mut conn = self.conn.clone();
        let (verdict, last): (String, u64) = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        match verdict.as_str() {
            "apply" => Ok(Admission::Apply {
                previous_version: last,
            }),
            "duplicate" => Ok(Admission::Duplicate),
            "stale" => Ok(Admission::Stale {
                last_applied_version: last,
            }),
            other => Err(StoreError::Other(
                format!("the inbox script answered {other:?}").into(),
            )),
        }
    }
}

/// What `process` returns when the verdict is not to apply (`Apply` never reaches here).
fn not_applied<T>(verdict: Admission) -> Processed<T> {
    match verdict {
        Admission::Stale {
            last_applied_version,
        } => Processed::Stale {
            last_applied_version,
        },
        Admission::Duplicate | Admission::Apply { .. } => Processed::Duplicate,
    }
}
