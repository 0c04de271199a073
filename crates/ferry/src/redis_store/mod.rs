//! The Redis outbox: a producer script that writes the business keys and the outbox entry
//! in one atomic step, one stream per partition read in order, blocking reads for wake-ups,
//! fenced marks and leases inside Lua scripts on Redis's clock, and a consumer inbox.
//!
//! Keys, under the key prefix (`ferry:` by default):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `meta` | hash | `partitions`, `schema_version`, `enqueue_script`, `enqueue_sha` |
//! | `p:<n>` | stream | unpublished messages of partition n, in sequence order |
//! | `done:<n>` | stream | published messages kept for the retention |
//! | `ids` | hash | message id → `<partition> <stream entry id>`, unpublished only |
//! | `versions` | hash | aggregate → last version |
//! | `seq` | string | the last sequence handed out |
//! | `lease:<n>` | hash | `owner`, `epoch`, `expires_at` (ms), `clean`, `checkpoint`, `blocked_reason` |
//! | `relays` | sorted set | live relays, scored by heartbeat expiry (ms) |
//! | `wake` | stream | one entry per enqueue call naming its partitions (capped) |
//! | `inbox:<consumer>:…` | | the consumer inbox, see [`RedisInbox`] |
//!
//! Every script computes the keys it touches from the prefix, so all keys of one outbox must
//! live on one server: on Redis Cluster, put a hash tag in the prefix (`{ferry}:`).
//! Scripts need Redis 7.0 or later (they carry a `#!lua` line).

mod inbox;
mod scripts;
mod stream;
mod writes;

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, RedisError, ScriptInvocation,
    ServerErrorKind, ToRedisArgs, Value,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::partition::fnv1a_32;
use ferry_core::{
    EnqueueError, Enqueued, Lease, LeaseStore, Message, NewMessage, OutboxStore, PartitionStatus,
    StoreError, Takeover, Wakers,
};

use scripts::SCRIPTS;

pub use inbox::RedisInbox;
pub use writes::RedisWrites;

/// The layout of keys and scripts this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Most partitions an outbox may have (as for the SQL stores).
pub const MAX_PARTITIONS: u32 = 4096;

/// Most messages one enqueue call takes.
pub const MAX_MESSAGES_PER_CALL: usize = 10_000;

/// How long the watcher's `XREAD` blocks before it asks again.
const WAKE_BLOCK: Duration = Duration::from_secs(5);

/// Wake-up entries read at once; a full read may mean some were trimmed unseen.
const WAKE_READ: usize = 1024;

/// A validated key prefix (`ferry:` by default): every key of one outbox starts with it,
/// so several outboxes (and the application's own keys) can share one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

/// Longest key prefix accepted.
pub const MAX_KEY_PREFIX_LEN: usize = 64;

impl KeyPrefix {
    /// Accepts ASCII letters, digits and `_ : . - / { }`, 1 to [`MAX_KEY_PREFIX_LEN`]
    /// characters: no glob characters, so that `SCAN MATCH <prefix>*` finds exactly its keys.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidKeyPrefix> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_KEY_PREFIX_LEN
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:.-/{}".contains(c));
        if valid {
            Ok(Self(prefix))
        } else {
            Err(InvalidKeyPrefix(prefix))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("ferry:".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key_prefix {0:?} is not valid: use 1 to {MAX_KEY_PREFIX_LEN} ASCII letters, digits and '_', ':', '.', '-', '/', '{{', '}}' (e.g. \"ferry:\")"
)]
pub struct InvalidKeyPrefix(pub String);

/// Settings of a Redis outbox. Every default is what `RedisSettings::default` sets.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Defaults to `ferry:`.
    pub key_prefix: KeyPrefix,
    /// Largest payload `enqueue` accepts. Defaults to 1 MiB.
    pub max_payload_bytes: usize,
    /// Keep published messages this long (in `done:<n>` streams) instead of deleting them
    /// when marked. Defaults to zero: delete at once.
    pub retention: Duration,
    /// Leases are granted outside the store (Redis or etcd leases) and adopted by it:
    /// marks then check the adopted epoch and owner instead of the store's own expiry.
    pub external_leases: bool,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            key_prefix: KeyPrefix::default(),
            max_payload_bytes: 1024 * 1024,
            retention: Duration::ZERO,
            external_leases: false,
        }
    }
}

/// Opens a connection manager (one multiplexed connection, re-established after errors) to
/// `url` (`redis://[user:password@]host:port[/db]`). Fails at once, naming the cause, if the
/// server cannot be reached, refuses the credentials, or is older than Redis 7.0.
pub async fn connect(url: &str) -> Result<(Client, ConnectionManager), StoreError> {
    let client = Client::open(url)
        .map_err(|e| StoreError::Other(format!("invalid Redis url: {e}").into()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let mut conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(store_error)?;
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(store_error)?;
    check_server_version(&info)?;
    Ok((client, conn))
}

/// Refuses servers whose `redis_version` is below 7.0 (Valkey reports a compatible one).
fn check_server_version(info: &str) -> Result<(), StoreError> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major >= 7 {
        Ok(())
    } else {
        Err(StoreError::Other(
            format!("Redis {version} is too old: ferry's scripts need Redis 7.0 or later").into(),
        ))
    }
}

/// An outbox in Redis. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct RedisOutbox {
    client: Client,
    conn: ConnectionManager,
    settings: Arc<RedisSettings>,
}

impl std::fmt::Debug for RedisOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOutbox")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisOutbox {
    /// Connects to `url`; see [`connect`].
    pub async fn connect(url: &str, settings: RedisSettings) -> Result<Self, StoreError> {
        let (client, conn) = connect(url).await?;
        Ok(Self::new(client, conn, settings))
    }

    /// Uses an existing connection (e.g. the application's own); `client` opens the
    /// watcher's dedicated connection for blocking reads.
    pub fn new(client: Client, conn: ConnectionManager, settings: RedisSettings) -> Self {
        Self {
            client,
            conn,
            settings: Arc::new(settings),
        }
    }

    /// The connection, shared by every clone.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn key_prefix(&self) -> &KeyPrefix {
        &self.settings.key_prefix
    }

    /// SHA1 of the enqueue script, for `EVALSHA` from other languages.
    pub fn enqueue_script_sha() -> &'static str {
        SCRIPTS.enqueue.get_hash()
    }

    /// The enqueue script's text (also stored in the outbox's `meta` hash by `migrate`).
    pub fn enqueue_script() -> &'static str {
        scripts::ENQUEUE_SOURCE
    }

    /// Creates or upgrades the outbox's keys, idempotently (one script, so concurrent runs
    /// do not race), and loads the enqueue script. `partitions` is fixed the first time; a
    /// different value later is refused.
    pub async fn migrate(&self, partitions: u32) -> Result<(), StoreError> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(StoreError::Other(
                format!("partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")
                    .into(),
            ));
        }
        let mut conn = self.conn.clone();
        let _: Value = SCRIPTS
            .migrate
            .arg(self.prefix())
            .arg(partitions)
            .arg(SCHEMA_VERSION)
            .arg(scripts::ENQUEUE_SOURCE)
            .arg(SCRIPTS.enqueue.get_hash())
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        SCRIPTS
            .enqueue
            .load_async(&mut conn)
            .await
            .map_err(store_error)?;
        tracing::info!(partitions, prefix = self.prefix(), "redis outbox ready");
        Ok(())
    }

    /// Appends `message` to the outbox and applies `writes`, all or nothing, in one script
    /// run: the aggregate's next version, the sequence and the partition are assigned there,
    /// so version order is the order in which the calls reach Redis (G3).
    ///
    /// An invalid message is refused before anything is sent. An error can leave the
    /// outcome unknown (a timeout, a lost connection): to retry without a second copy, set
    /// `NewMessage::id` yourself and retry with the same id; while the message is
    /// unpublished the script refuses the id as already in the outbox, and after that the
    /// copy carries the same id, which the broker's dedup and the inbox drop.
    pub async fn enqueue(
        &self,
        writes: &RedisWrites,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        self.enqueue_all(writes, vec![message])
            .await?
            .pop()
            .ok_or_else(|| {
                EnqueueError::Store(StoreError::Other("enqueue returned nothing".into()))
            })
    }

    /// Like [`enqueue`](Self::enqueue) for several messages (1 to
    /// [`MAX_MESSAGES_PER_CALL`]), appended in order in one atomic step.
    pub async fn enqueue_all(
        &self,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Enqueued>, EnqueueError> {
        self.check_messages(&messages)?;
        let mut invocation = SCRIPTS.enqueue.prepare_invoke();
        for key in writes.keys() {
            invocation.key(key.as_slice());
        }
        self.enqueue_args(&mut invocation, writes, messages);
        let mut conn = self.conn.clone();
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(parse_enqueued(reply)?)
    }

    /// The enqueue as an `EVAL` command, for a transaction of the caller's own: on a
    /// dedicated connection, `WATCH` the keys the business change was computed from, then
    /// send this command alone in `MULTI`/`EXEC` (a `redis::pipe().atomic()`). If a watched
    /// key changed, `EXEC` returns nil and nothing is written; otherwise decode its single
    /// reply with [`parse_enqueued`].
    ///
    /// Why the business writes still go inside the script rather than as separate commands
    /// of the `MULTI`: Redis runs every queued command even if one fails at run time (a
    /// `WRONGTYPE`, say), so a failing business write would not stop the outbox entry, and
    /// the version number cannot be read and used within one `MULTI`. The script checks
    /// everything first and then writes all or nothing; `MULTI` adds only the `WATCH`.
    pub fn enqueue_command(
        &self,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) -> Result<Cmd, EnqueueError> {
        self.check_messages(&messages)?;
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(scripts::ENQUEUE_SOURCE)
            .arg(writes.keys().len())
            .arg(writes.keys());
        self.enqueue_args(&mut cmd, writes, messages);
        Ok(cmd)
    }

    fn check_messages(&self, messages: &[NewMessage]) -> Result<(), EnqueueError> {
        if messages.is_empty() || messages.len() > MAX_MESSAGES_PER_CALL {
            return Err(EnqueueError::Store(StoreError::Other(
                format!(
                    "an enqueue call takes 1 to {MAX_MESSAGES_PER_CALL} messages, got {}",
                    messages.len()
                )
                .into(),
            )));
        }
        for message in messages {
            message.validate(self.settings.max_payload_bytes)?;
        }
        Ok(())
    }

    /// The enqueue script's ARGV (see `lua/enqueue.lua`).
    fn enqueue_args(
        &self,
        sink: &mut impl ArgSink,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) {
        sink.push(self.prefix());
        sink.push(messages.len());
        sink.push(writes.len());
        for message in messages {
            let headers = if message.headers.is_empty() {
                String::new()
            } else {
                serde_json::Value::from_iter(
                    message
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))),
                )
                .to_string()
            };
            sink.push(message.id.unwrap_or_else(Uuid::now_v7).to_string());
            sink.push(&message.aggregate_type);
            sink.push(&message.aggregate_id);
            sink.push(&message.event_type);
            sink.push(message.payload.as_ref());
            sink.push(headers);
            sink.push(message.partition_key.as_deref().unwrap_or(""));
        }
        writes.write_args(sink);
    }

    /// Deletes every key under the prefix (the outbox, its published messages, inboxes kept
    /// under it); returns how many. Irreversible: for tests and the bench's clean-up.
    pub async fn remove(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", self.prefix());
        let mut cursor = 0u64;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if !keys.is_empty() {
                let unlinked: u64 = ::redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(store_error)?;
                removed += unlinked;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// The highest fencing epoch of any partition, above which a lease backend outside the
    /// store must grant.
    pub async fn highest_epoch(&self) -> Result<i64, StoreError> {
        let partitions = self.partitions().await?;
        let mut pipeline = ::redis::pipe();
        for partition in 0..partitions {
            pipeline
                .cmd("HGET")
                .arg(self.settings.key_prefix.key(&format!("lease:{partition}")))
                .arg("epoch");
        }
        let mut conn = self.conn.clone();
        let epochs: Vec<Option<i64>> =
            pipeline.query_async(&mut conn).await.map_err(store_error)?;
        Ok(epochs.into_iter().flatten().max().unwrap_or(0))
    }

    fn prefix(&self) -> &str {
        self.settings.key_prefix.as_str()
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)
    }
}

/// Decodes the enqueue script's reply: one `{id, version, partition, sequence}` per message.
pub fn parse_enqueued(reply: Value) -> Result<Vec<Enqueued>, StoreError> {
    let rows: Vec<(String, u64, u32, i64)> = FromRedisValue::from_redis_value(reply)
        .map_err(|e| StoreError::Other(format!("unexpected enqueue reply: {e}").into()))?;
    rows.into_iter()
        .map(|(id, version, partition, sequence)| {
            Ok(Enqueued {
                id: Uuid::parse_str(&id).map_err(|e| {
                    StoreError::Other(format!("enqueue replied with id {id:?}: {e}").into())
                })?,
                version,
                partition,
                sequence,
            })
        })
        .collect()
}

/// Where script arguments go: a [`ScriptInvocation`] (EVALSHA) or a [`Cmd`] (EVAL).
pub(crate) trait ArgSink {
    fn push<T: ToRedisArgs>(&mut self, arg: T);
}

impl ArgSink for ScriptInvocation<'_> {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}

impl ArgSink for Cmd {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timestamp(millis: &str) -> Option<DateTime<Utc>> {
    millis
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_millis)
}

#[async_trait]
impl OutboxStore for RedisOutbox {
    async fn partitions(&self) -> Result<u32, StoreError> {
        let mut conn = self.conn.clone();
        let (partitions, version): (Option<u32>, Option<u32>) = ::redis::cmd("HMGET")
            .arg(self.settings.key_prefix.key("meta"))
            .arg("partitions")
            .arg("schema_version")
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        match (partitions, version) {
            (Some(_), Some(version)) if version > SCHEMA_VERSION => {
                Err(StoreError::Schema(format!(
                    "the outbox under the key prefix {:?} has ferry schema version {version}, newer than this ferry ({SCHEMA_VERSION}); upgrade ferry",
                    self.prefix()
                )))
            }
            (Some(partitions), _) => Ok(partitions),
            (None, _) => Err(StoreError::Schema(format!(
                "there is no ferry outbox under the key prefix {:?} in this Redis",
                self.prefix()
            ))),
        }
    }

    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Value = ::redis::cmd("XRANGE")
            .arg(self.settings.key_prefix.key(&format!("p:{partition}")))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        stream::messages(reply, partition)
    }

    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut invocation = SCRIPTS.mark.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(u8::from(!self.settings.retention.is_zero()))
            .arg(checkpoint.map(|c| c.to_string()).unwrap_or_default())
            .arg(if self.settings.external_leases {
                lease.owner.as_str()
            } else {
                ""
            });
        for id in ids {
            invocation.arg(id.to_string());
        }
        let marked: i64 = self.invoke(&invocation).await?;
        u64::try_from(marked).map_err(|_| StoreError::fenced(lease))
    }

    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError> {
        let mut invocation = SCRIPTS.set_blocked.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch);
        if let Some(reason) = reason {
            invocation.arg(reason);
        }
        let recorded: i64 = self.invoke(&invocation).await?;
        if recorded == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let mut invocation = SCRIPTS.adopt.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(&lease.owner);
        match self.invoke::<Value>(&invocation).await? {
            Value::Int(_) => Err(StoreError::fenced(lease)),
            reply => {
                let checkpoint: String = FromRedisValue::from_redis_value(reply).map_err(|e| {
                    StoreError::Other(format!("unexpected adopt reply: {e}").into())
                })?;
                Ok(checkpoint.parse().ok())
            }
        }
    }

    /// Blocks in `XREAD` on the wake-up stream (on a connection of its own, so that the
    /// blocking read holds up no other command) and wakes the partitions each entry names.
    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(WAKE_BLOCK + Duration::from_secs(10)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(store_error)?;
        let key = self.settings.key_prefix.key("wake");
        // Start after the newest entry; anything enqueued before is found by the wake below.
        let newest: Vec<(String, Value)> = ::redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut last = newest
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id);
        wakers.wake_all();
        loop {
            let reply: Value = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(WAKE_READ)
                .arg("BLOCK")
                .arg(millis(WAKE_BLOCK))
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if let Some((newest, partitions, read)) = stream::wake_ups(reply)? {
                last = newest;
                if read >= WAKE_READ {
                    // Behind by a full read: entries may have been trimmed unseen.
                    wakers.wake_all();
                }
                for partition in partitions {
                    wakers.wake(partition);
                }
            }
        }
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let mut invocation = SCRIPTS.status.prepare_invoke();
        invocation.arg(self.prefix());
        type Row = (String, i64, String, String, u64, String);
        let (now, rows): (String, Vec<Row>) = self.invoke(&invocation).await?;
        let now = timestamp(&now).ok_or_else(|| corrupt_reply("status without a clock"))?;
        Ok(rows
            .into_iter()
            .enumerate()
            .map(
                |(partition, (owner, epoch, expires_at, blocked, backlog, oldest))| {
                    let expires_at =
                        timestamp(&expires_at).filter(|at| *at > now && !owner.is_empty());
                    PartitionStatus {
                        partition: partition as u32,
                        owner: expires_at.map(|_| owner),
                        epoch,
                        lease_expires_at: expires_at,
                        backlog,
                        oldest_unpublished_age_secs: timestamp(&oldest)
                            .map(|created| (now - created).as_seconds_f64().max(0.0)),
                        blocked_reason: Some(blocked).filter(|b| !b.is_empty()),
                    }
                },
            )
            .collect())
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        if self.settings.retention.is_zero() {
            return Ok(0);
        }
        let mut invocation = SCRIPTS.purge.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(millis(self.settings.retention));
        self.invoke(&invocation).await
    }

    fn retention(&self) -> Duration {
        self.settings.retention
    }
}

#[async_trait]
impl LeaseStore for RedisOutbox {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let mut invocation = SCRIPTS.heartbeat.prepare_invoke();
        invocation.arg(self.prefix()).arg(relay).arg(millis(ttl));
        let live: usize = self.invoke(&invocation).await?;
        Ok(live.max(1))
    }

    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // Relays look from different places, so that ones starting together rarely race.
        let mut invocation = SCRIPTS.acquire.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(relay)
            .arg(max)
            .arg(millis(ttl))
            .arg(fnv1a_32(relay.as_bytes()));
        let granted: Vec<(u32, i64, u8, u64, String)> = self.invoke(&invocation).await?;
        Ok(granted
            .into_iter()
            .map(|(partition, epoch, clean, since_expiry_ms, checkpoint)| {
                let takeover = if clean == 1 {
                    Takeover::Clean
                } else {
                    Takeover::Unclean {
                        since_expiry: Duration::from_millis(since_expiry_ms),
                        checkpoint: checkpoint.parse().ok(),
                    }
                };
                tracing::debug!(partition, epoch, relay, ?takeover, "lease granted");
                Lease {
                    partition,
                    epoch,
                    owner: relay.to_owned(),
                    takeover,
                }
            })
            .collect())
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        let Some(owner) = leases.first().map(|l| l.owner.as_str()) else {
            return Ok(Vec::new());
        };
        let mut invocation = SCRIPTS.renew.prepare_invoke();
        invocation.arg(self.prefix()).arg(owner).arg(millis(ttl));
        for lease in leases {
            invocation.arg(lease.partition).arg(lease.epoch);
        }
        self.invoke(&invocation).await
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let mut invocation = SCRIPTS.release.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(u8::from(clean));
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = ::redis::cmd("ZREM")
            .arg(self.settings.key_prefix.key("relays"))
            .arg(relay)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

fn corrupt_reply(what: &str) -> StoreError {
    StoreError::Other(format!("unexpected reply from Redis: {what}").into())
}

/// Maps a driver error: ferry's script codes become schema or input errors, connection
/// failures and a server that is loading, busy or failing over are retryable, refused
/// credentials say so.
pub(crate) fn store_error(err: RedisError) -> StoreError {
    let detail = err.detail().unwrap_or_default().to_owned();
    match err.code() {
        Some("FERRY_SCHEMA") => return StoreError::Schema(detail),
        Some("FERRY_INVALID") => {
            return StoreError::Other(format!("refused by ferry's script: {detail}").into());
        }
        Some("NOAUTH" | "WRONGPASS") => {
            return StoreError::Other(
                format!(
                    "Redis refused the credentials (check the user and password in the url): {err}"
                )
                .into(),
            );
        }
        Some("BUSY" | "OOM") => return StoreError::Unavailable(err.into()),
        _ => {}
    }
    let transient = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        );
    if transient {
        StoreError::Unavailable(err.into())
    } else if err.kind() == ErrorKind::AuthenticationFailed {
        StoreError::Other(
            format!(
                "Redis refused the credentials (check the user and password in the url): {err}"
            )
            .into(),
        )
    } else {
        StoreError::Other(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes_exclude_glob_characters() {
        for good in ["ferry:", "{ferry}:", "app.outbox/1-", "_"] {
            assert!(KeyPrefix::new(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a*", "a?", "a[b]", "a\\b", "a b", "é", &"a".repeat(65)] {
            assert!(KeyPrefix::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn servers_before_7_are_refused_by_name() {
        assert!(check_server_version("# Server\r\nredis_version:7.0.15\r\n").is_ok());
        let err = check_server_version("redis_version:6.2.14\r\n").expect_err("too old");
        assert!(err.to_string().contains("6.2.14"), "{err}");
    }
}
