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
//! | `front:<n>` | stream | requeued messages of partition n, in sequence order; fetches merge them with `p:<n>` |
//! | `done:<n>` | stream | published messages kept for the retention |
//! | `kept` | sorted set | sequence → `<partition> <entry id>` in `done:<n>`, for replay |
//! | `ids` | hash | message id → `<partition> <entry id>` (`f<entry id>` in `front:<n>`), or `parked` |
//! | `parked:<id>` | hash | a parked message: its fields, `partition`, `parked_at`, `parked_by`, `reason`, `holds` |
//! | `parked`, `parked_at`, `parked_of:<aggregate>` | sorted sets | parked ids by sequence, by time parked, by sequence per aggregate |
//! | `holds` | hash | aggregate → how many parked messages hold it (fetches leave its messages out) |
//! | `versions` | hash | aggregate → last version |
//! | `seq` | string | the last sequence handed out |
//! | `lease:<n>` | hash | `owner`, `epoch`, `expires_at` (ms), `clean`, `checkpoint`, `blocked_reason`, `blocked_at`, `retry` |
//! | `relays` | sorted set | live relays, scored by heartbeat expiry (ms) |
//! | `wake` | stream | one entry per enqueue call naming its partitions (capped) |
//! | `inbox:<consumer>:…` | | the consumer inbox, see [`RedisInbox`] |
//!
//! Every script computes the keys it touches from the prefix, so all keys of one outbox must
//! live on one server: on Redis Cluster, put a hash tag in the prefix (`{ferry}:`).
//! Scripts need Redis 7.0 or later (they carry a `#!lua` line).
//!
//! Where things are: `settings.rs` has the key prefix and settings, `connection.rs` the
//! connection and server version check, `enqueue.rs` the enqueue calls, `store.rs` the
//! `OutboxStore` side, `admin.rs` the `OutboxAdmin` side, `lease.rs` the `LeaseStore` side, `inbox.rs` the consumer inbox,
//! `writes.rs` the business writes, `stream.rs` the decoding of stream entries,
//! `scripts.rs` and `lua/` the scripts, `error.rs` the mapping of Redis's errors.

mod admin;
mod connection;
mod enqueue;
mod error;
mod inbox;
mod lease;
mod scripts;
mod settings;
mod store;
mod stream;
mod writes;

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{Client, FromRedisValue, ScriptInvocation, Value};

use ferry_core::{Lease, OutboxStore, StoreError};

use error::store_error;
use scripts::SCRIPTS;

pub use connection::connect;
pub use enqueue::parse_enqueued;
pub use inbox::RedisInbox;
pub use settings::{InvalidKeyPrefix, KeyPrefix, MAX_KEY_PREFIX_LEN, RedisSettings};
pub use writes::RedisWrites;

/// The layout of keys and scripts this code reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Most partitions an outbox may have (as for the SQL stores).
pub const MAX_PARTITIONS: u32 = 4096;

/// Most messages one enqueue call takes.
pub const MAX_MESSAGES_PER_CALL: usize = 10_000;

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
        let client =
            crate::tls::redis_client(url, None).map_err(|e| StoreError::Other(e.into()))?;
        Self::connect_client(client, settings).await
    }

    /// Connects with `client`, e.g. one that trusts a CA of its own
    /// ([`crate::tls::redis_client`]).
    pub async fn connect_client(
        client: Client,
        settings: RedisSettings,
    ) -> Result<Self, StoreError> {
        let (client, conn) = connect(client).await?;
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

    /// The owner fenced scripts check for a lease adopted from an outside backend; empty
    /// for the store's own leases, checked by expiry instead.
    fn adopted_owner<'a>(&self, lease: &'a Lease) -> &'a str {
        if self.settings.external_leases {
            &lease.owner
        } else {
            ""
        }
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
