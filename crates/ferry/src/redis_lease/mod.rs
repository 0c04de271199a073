//! Partition leases in Redis, for outboxes whose own database should not hold them (or
//! cannot, e.g. a read-mostly replica set-up), fenced by the outbox store itself.
//!
//! # Why a Redis lock alone is not enough
//!
//! A lock in Redis (`SET NX PX`, or Redlock over several servers) says who *should* own a
//! partition; it cannot stop a former owner from acting. A relay can pause (GC, swap, a
//! stopped VM, SIGSTOP) for longer than its lease, or the clock that times the lease can
//! jump; when it resumes it still believes it owns the partition, while Redis has already
//! handed it to another relay. Its next mark would then land after the new owner's, and
//! both would publish: duplicates and reordering. Checking "am I still the owner?" first
//! does not help, because the pause can fall between the check and the write. Martin
//! Kleppmann's analysis of Redlock ("How to do distributed locking", 2016) makes this
//! argument: safety needs a **fencing token**, a number that grows with every grant and
//! that the *resource* checks on every write, refusing writes carrying an older one.
//!
//! # What ferry does
//!
//! - Every grant takes its epoch from `INCR` on one counter: the fencing token. It is
//!   stored with the owner in the partition's ownership key (`SET NX PX`, so the key
//!   vanishes when the lease is not renewed).
//! - Before touching the partition, the new owner has the outbox store adopt its lease
//!   ([`OutboxStore::adopt`]): the store raises the partition's epoch, and from then on
//!   refuses every mark made under an older one, in the same statement as the mark. A
//!   paused relay that resumes after a takeover can at worst re-publish its in-flight
//!   batch (dropped by the broker's dedup or the consumer inbox); it can never mark.
//! - Renewals and releases are scripts that compare owner and epoch atomically, on the
//!   Redis server's clock; a relay stops using a lease at its own deadline (the instant
//!   before its last successful renewal was sent, plus the TTL), which is never after the
//!   key's expiry unless Redis's clock jumps forward, the case fencing covers.
//! - A release records whether the owner left cleanly in the partition's state hash; the
//!   next grant reads it to decide whether to reconcile ([`Takeover`]). The checkpoint
//!   that bounds reconciliation is recorded by the outbox store on every mark and returned
//!   by `adopt`.
//! - Epochs must stay above every epoch the store has adopted, even if Redis loses the
//!   counter (a restart without persistence): the counter is raised to a floor, taken from
//!   the store at start-up ([`RedisLeases::connect`]) and then from every epoch granted.
//!   Run Redis with persistence (`appendonly yes`) where you can.
//!
//! Keys (all under the configured prefix, which may carry a `{hash tag}` for Redis
//! Cluster): `epoch` (the counter), `owner:<partition>` (`<epoch>:<relay>`, with the lease
//! TTL), `state:<partition>` (hash: `epoch`, `owner`, `expires_ms`, `clean`), `relays`
//! (sorted set of live relays scored by expiry).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, ErrorKind, RedisError, RetryMethod, Script};
use tracing::debug;

use ferry_core::partition::fnv1a_32;
use ferry_core::{Lease, LeaseStore, StoreError, Takeover};

/// How long a connection attempt or a command may take before it counts as an outage.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

const ACQUIRE: &str = concat!(include_str!("prelude.lua"), include_str!("acquire.lua"));
const RENEW: &str = concat!(include_str!("prelude.lua"), include_str!("renew.lua"));
const RELEASE: &str = concat!(include_str!("prelude.lua"), include_str!("release.lua"));
const HEARTBEAT: &str = concat!(include_str!("prelude.lua"), include_str!("heartbeat.lua"));

/// Partition leases held in Redis. Cheap to share; one per relay process.
pub struct RedisLeases {
    connection: ConnectionManager,
    prefix: String,
    epoch_key: String,
    relays_key: String,
    partitions: u32,
    /// Every grant's epoch is above this: the highest epoch the outbox store had adopted
    /// at start-up, then the highest this backend granted.
    epoch_floor: AtomicI64,
    acquire: Script,
    renew: Script,
    release: Script,
    heartbeat: Script,
}

impl std::fmt::Debug for RedisLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLeases")
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl RedisLeases {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`) for the leases of an outbox with `partitions` partitions, keeping its
    /// keys under `key_prefix` (one prefix per outbox). `epoch_floor` is the highest epoch
    /// the outbox store holds (`highest_epoch()` of the SQL stores): every grant gets a
    /// higher one. Fails at once, naming the cause, if the server cannot be reached.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        partitions: u32,
        epoch_floor: i64,
    ) -> Result<Self, StoreError> {
        let client = crate::tls::redis_client(url, None)
            .map_err(|err| StoreError::Other(format!("leases: {err}").into()))?;
        Self::connect_client(client, key_prefix, partitions, epoch_floor).await
    }

    /// [`RedisLeases::connect`] with `client`, e.g. one that trusts a CA of its own
    /// ([`crate::tls::redis_client`]).
    pub async fn connect_client(
        client: redis::Client,
        key_prefix: &str,
        partitions: u32,
        epoch_floor: i64,
    ) -> Result<Self, StoreError> {
        if key_prefix.is_empty() {
            return Err(StoreError::Other(
                "the Redis lease key prefix must not be empty (e.g. \"ferry:orders:\")".into(),
            ));
        }
        let server = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| {
                crate::tls::redis_store_error(err, &server, "leases.tls_ca_file", redis_error)
            })?;
        debug!(
            prefix = key_prefix,
            partitions, epoch_floor, "redis leases connected"
        );
        Ok(Self {
            connection,
            prefix: key_prefix.to_owned(),
            epoch_key: format!("{key_prefix}epoch"),
            relays_key: format!("{key_prefix}relays"),
            partitions,
            epoch_floor: AtomicI64::new(epoch_floor),
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            heartbeat: Script::new(HEARTBEAT),
        })
    }

    /// The relay holding each partition's unexpired lease, for `status`.
    pub async fn owners(&self) -> Result<BTreeMap<u32, String>, StoreError> {
        let keys: Vec<String> = (0..self.partitions).map(|p| self.owner_key(p)).collect();
        let values: Vec<Option<String>> = self
            .connection
            .clone()
            .mget(&keys)
            .await
            .map_err(redis_error)?;
        Ok((0..self.partitions)
            .zip(values)
            .filter_map(|(partition, value)| {
                let value = value?;
                let (_epoch, owner) = value.split_once(':')?;
                Some((partition, owner.to_owned()))
            })
            .collect())
    }

    fn owner_key(&self, partition: u32) -> String {
        format!("{}owner:{partition}", self.prefix)
    }
}

/// What an ownership key holds: the lease's epoch and owner, compared as one string.
fn ownership(lease: &Lease) -> String {
    format!("{}:{}", lease.epoch, lease.owner)
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl LeaseStore for RedisLeases {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let live: usize = self
            .heartbeat
            .key(&self.relays_key)
            .arg(relay)
            .arg(ttl_ms(ttl))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(redis_error)?;
        Ok(live.max(1))
    }

    /// Tries the partitions in turn from one that depends on the relay's name, so that
    /// relays starting together do not all reach for the same ones first.
    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let first = fnv1a_32(relay.as_bytes()) % self.partitions.max(1);
        let granted: Vec<(u32, i64, u8, u64)> = self
            .acquire
            .key(&self.epoch_key)
            .arg(&self.prefix)
            .arg(relay)
            .arg(max)
            .arg(ttl_ms(ttl))
            .arg(self.partitions)
            .arg(first)
            .arg(self.epoch_floor.load(Ordering::Acquire))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(redis_error)?;
        let leases: Vec<Lease> = granted
            .into_iter()
            .map(|(partition, epoch, clean, since_expiry_ms)| Lease {
                partition,
                epoch,
                owner: relay.to_owned(),
                takeover: if clean == 1 {
                    Takeover::Clean
                } else {
                    Takeover::Unclean {
                        since_expiry: Duration::from_millis(since_expiry_ms),
                        // Recorded by the outbox store; `adopt` returns it.
                        checkpoint: None,
                    }
                },
            })
            .collect();
        if let Some(highest) = leases.iter().map(|l| l.epoch).max() {
            self.epoch_floor.fetch_max(highest, Ordering::AcqRel);
        }
        Ok(leases)
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.renew.key(&self.epoch_key);
        call.arg(&self.prefix).arg(ttl_ms(ttl));
        for lease in leases {
            call.arg(lease.partition).arg(ownership(lease));
        }
        call.invoke_async(&mut self.connection.clone())
            .await
            .map_err(redis_error)
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let released: u8 = self
            .release
            .key(&self.epoch_key)
            .arg(&self.prefix)
            .arg(lease.partition)
            .arg(ownership(lease))
            .arg(lease.epoch)
            .arg(u8::from(clean))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(redis_error)?;
        if released == 0 {
            debug!(
                partition = lease.partition,
                epoch = lease.epoch,
                "lease already taken over; nothing to release"
            );
        }
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        let _: u64 = self
            .connection
            .clone()
            .zrem(&self.relays_key, relay)
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}

/// Connection trouble and servers that are busy, loading or failing over are outages to
/// retry; wrong credentials, a bad url and script errors are not.
fn redis_error(err: RedisError) -> StoreError {
    let permanent = matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || matches!(err.retry_method(), RetryMethod::NoRetry);
    if permanent {
        StoreError::Other(Box::new(err))
    } else {
        StoreError::Unavailable(Box::new(err))
    }
}
