//! Partition leases in etcd v3, fenced by the outbox store.
//!
//! - Each granted partition gets an etcd lease of the relay's lease TTL, kept alive by
//!   renewals, and an ownership key `<prefix>owner/<partition>` (value: the relay) attached
//!   to it, created in a transaction only if absent. When renewals stop, etcd deletes the
//!   key at the lease's expiry, on etcd's clock.
//! - The epoch (fencing token) is the ownership key's create revision: etcd's revisions
//!   grow with every write to the cluster, so every grant gets a higher one. Before touching
//!   the partition, the new owner has the outbox store adopt it ([`OutboxStore::adopt`]),
//!   and the store then refuses marks made under older epochs; see the `redis_lease` module
//!   for why the lock alone is not enough.
//! - Revisions start again at 1 if the etcd cluster is rebuilt from scratch, while the
//!   outbox keeps the epochs it adopted. Epochs are therefore `create revision + base`,
//!   where the base is written once per key prefix (`<prefix>epoch_base`), from the
//!   highest epoch the outbox store held when the first relay connected; it never changes
//!   afterwards, so every relay computes the same epochs.
//! - A release records in `<prefix>state/<partition>` whether the owner left cleanly; the
//!   grant transaction reads it to decide whether the new owner reconciles ([`Takeover`]).
//!   The checkpoint that bounds reconciliation is recorded by the outbox store on every
//!   mark and returned by `adopt`.
//! - Live relays keep `<prefix>relays/<relay>` under an etcd lease of their own, kept alive
//!   by heartbeats, for the fair share.
//!
//! [`OutboxStore::adopt`]: ferry_core::OutboxStore::adopt

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::Mutex;
use tracing::debug;

use ferry_core::partition::fnv1a_32;
use ferry_core::{Lease, LeaseStore, StoreError, Takeover};

/// How long a connection attempt or a request may take before it counts as an outage.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd keeps no clock the relays can read, so how long ago an uncleanly left lease ran
/// out is unknown. Takeovers report the longest duration: sinks that would lean on a
/// broker's dedup window for a recent takeover reconcile in full instead.
pub const UNKNOWN_SINCE_EXPIRY: Duration = Duration::MAX;

/// What `<prefix>state/<partition>` holds after a clean release.
const CLEAN: &str = "clean";
/// What it holds while the partition is granted, and after an unclean release.
const UNCLEAN: &str = "unclean";

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConnection<'a> {
    /// `http://host:port` (or `https://`) of one or more cluster members.
    pub endpoints: &'a [String],
    /// With `https://` endpoints: a PEM file of the CA that issued the members'
    /// certificates, trusted instead of the public roots.
    pub tls_ca_file: Option<&'a std::path::Path>,
    /// User name and password when the cluster has authentication on.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Every key of this outbox's leases starts with it (one prefix per outbox).
    pub key_prefix: &'a str,
}

/// Partition leases held in etcd. Cheap to share; one per relay process.
pub struct EtcdLeases {
    client: Client,
    prefix: String,
    partitions: u32,
    /// Added to an ownership key's create revision to make its epoch.
    epoch_base: i64,
    /// The etcd lease under which each relay's live key is kept, by relay.
    relay_leases: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for EtcdLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLeases")
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("epoch_base", &self.epoch_base)
            .finish_non_exhaustive()
    }
}

impl EtcdLeases {
    /// Connects for the leases of an outbox with `partitions` partitions. `epoch_floor` is
    /// the highest epoch the outbox store holds (`highest_epoch()` of the SQL stores):
    /// epochs granted here must be above it. Fails at once, naming the cause, if no member
    /// can be reached, and without retry if this prefix's epochs are not above the floor
    /// (the prefix outlived a switch to another lease backend).
    pub async fn connect(
        connection: EtcdConnection<'_>,
        partitions: u32,
        epoch_floor: i64,
    ) -> Result<Self, StoreError> {
        if connection.key_prefix.is_empty() {
            return Err(StoreError::Other(
                "the etcd lease key prefix must not be empty (e.g. \"ferry/orders/\")".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(ETCD_TIMEOUT)
            .with_timeout(ETCD_TIMEOUT);
        if let Some((user, password)) = connection.credentials {
            options = options.with_user(user, password);
        }
        if let Some(path) = connection.tls_ca_file {
            let pem = crate::tls::read_ca_file(path).map_err(|reason| {
                StoreError::Other(format!("leases.tls_ca_file: {reason}").into())
            })?;
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem)),
            );
        }
        let endpoints = connection.endpoints.join(",");
        let tls_refused = |err: StoreError| {
            if crate::tls::is_certificate_failure(&err) {
                let message =
                    crate::tls::certificate_failure("etcd", &endpoints, "leases.tls_ca_file");
                StoreError::Other(format!("{message}: {}", ferry_core::ErrorChain(&err)).into())
            } else {
                err
            }
        };
        let client = Client::connect(connection.endpoints, Some(options))
            .await
            .map_err(etcd_error)
            .map_err(tls_refused)?;
        let mut leases = Self {
            client,
            prefix: connection.key_prefix.to_owned(),
            partitions,
            epoch_base: 0,
            relay_leases: Mutex::new(HashMap::new()),
        };
        leases.epoch_base = leases.epoch_base(epoch_floor).await.map_err(tls_refused)?;
        debug!(prefix = %leases.prefix, partitions, epoch_base = leases.epoch_base, "etcd leases connected");
        Ok(leases)
    }

    /// Reads this prefix's epoch base, writing `floor` if there is none yet; refuses a base
    /// under which the next epoch would not be above `floor`.
    async fn epoch_base(&self, floor: i64) -> Result<i64, StoreError> {
        let key = format!("{}epoch_base", self.prefix);
        let response = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), floor.to_string(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await
            .map_err(etcd_error)?;
        let revision = response.header().map_or(0, |h| h.revision());
        if response.succeeded() {
            return Ok(floor);
        }
        let base = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .and_then(|value| String::from_utf8(value).ok()?.parse::<i64>().ok())
            .ok_or_else(|| {
                StoreError::Other(
                    format!("{key} does not hold a number; delete it with the relays stopped")
                        .into(),
                )
            })?;
        if revision + base < floor {
            return Err(StoreError::Other(
                format!(
                    "etcd epochs under {prefix} (revision {revision} + base {base}) are below the outbox's highest epoch {floor}, so the outbox would refuse every grant: with every relay stopped, delete the prefix (etcdctl del --prefix {prefix}) and start again",
                    prefix = self.prefix
                )
                .into(),
            ));
        }
        Ok(base)
    }

    /// The relay holding each partition's unexpired lease, for `status`.
    pub async fn owners(&self) -> Result<BTreeMap<u32, String>, StoreError> {
        Ok(self
            .held()
            .await?
            .into_iter()
            .map(|(partition, held)| (partition, held.owner))
            .collect())
    }

    /// The ownership keys there are, by partition.
    async fn held(&self) -> Result<HashMap<u32, Held>, StoreError> {
        let owners = self.owner_key_prefix();
        let response = self
            .client
            .clone()
            .get(owners.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_error)?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let partition = kv.key_str().ok()?.strip_prefix(&owners)?.parse().ok()?;
                let held = Held {
                    owner: kv.value_str().ok()?.to_owned(),
                    epoch: kv.create_revision() + self.epoch_base,
                    etcd_lease: kv.lease(),
                };
                Some((partition, held))
            })
            .collect())
    }

    fn owner_key_prefix(&self) -> String {
        format!("{}owner/", self.prefix)
    }

    fn owner_key(&self, partition: u32) -> String {
        format!("{}owner/{partition}", self.prefix)
    }

    fn state_key(&self, partition: u32) -> String {
        format!("{}state/{partition}", self.prefix)
    }

    /// Grants `partition` to `relay` under a new etcd lease if no one holds it.
    async fn grant(
        &self,
        relay: &str,
        partition: u32,
        ttl_secs: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let mut client = self.client.clone();
        let etcd_lease = client
            .lease_grant(ttl_secs, None)
            .await
            .map_err(etcd_error)?
            .id();
        let owner = self.owner_key(partition);
        let state = self.state_key(partition);
        let response = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(
                        owner.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([
                        TxnOp::get(state.as_str(), None),
                        TxnOp::put(
                            owner.as_str(),
                            relay,
                            Some(PutOptions::new().with_lease(etcd_lease)),
                        ),
                        TxnOp::put(state.as_str(), UNCLEAN, None),
                    ]),
            )
            .await
            .map_err(etcd_error)?;
        if !response.succeeded() {
            // Taken meanwhile; the unused etcd lease would expire on its own.
            client.lease_revoke(etcd_lease).await.map_err(etcd_error)?;
            return Ok(None);
        }
        let revision = response.header().map(|h| h.revision()).ok_or_else(|| {
            StoreError::Other("etcd sent a transaction reply without a header".into())
        })?;
        let previous = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => {
                Some(get.kvs().first().map(|kv| kv.value() == CLEAN.as_bytes()))
            }
            _ => None,
        });
        // Never granted (no state yet), or released cleanly.
        let clean = previous.flatten().is_none_or(|clean| clean);
        Ok(Some(Lease {
            partition,
            epoch: revision + self.epoch_base,
            owner: relay.to_owned(),
            takeover: if clean {
                Takeover::Clean
            } else {
                Takeover::Unclean {
                    since_expiry: UNKNOWN_SINCE_EXPIRY,
                    // Recorded by the outbox store; `adopt` returns it.
                    checkpoint: None,
                }
            },
        }))
    }

    /// Sends one keep-alive for `etcd_lease`; false if the lease is gone (it ran out, or
    /// was revoked). Opening the keep-alive stream sends the first keep-alive and waits for
    /// its answer, which is all a renewal needs.
    async fn keep_alive(&self, etcd_lease: i64) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        match tokio::time::timeout(ETCD_TIMEOUT, client.lease_keep_alive(etcd_lease)).await {
            Ok(Ok(_keeper_and_stream)) => Ok(true),
            // How etcd-client reports a keep-alive answered with a TTL of zero.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(message)))
                if message.contains("not found") =>
            {
                Ok(false)
            }
            Ok(Err(err)) => Err(etcd_error(err)),
            Err(_) => Err(StoreError::Unavailable(
                format!("etcd did not answer a lease keep-alive within {ETCD_TIMEOUT:?}").into(),
            )),
        }
    }
}

/// An ownership key as read back.
struct Held {
    owner: String,
    epoch: i64,
    etcd_lease: i64,
}

/// etcd leases last whole seconds: never shorter than asked.
fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_secs_f64().ceil() as i64).max(1)
}

#[async_trait]
impl LeaseStore for EtcdLeases {
    /// Keeps `relay`'s live key alive (granting it a new etcd lease if its last one ran
    /// out), then counts the live keys.
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let mut relay_leases = self.relay_leases.lock().await;
        let alive = match relay_leases.get(relay) {
            Some(&etcd_lease) => self.keep_alive(etcd_lease).await?,
            None => false,
        };
        let mut client = self.client.clone();
        if !alive {
            let etcd_lease = client
                .lease_grant(ttl_secs(ttl), None)
                .await
                .map_err(etcd_error)?
                .id();
            client
                .put(
                    format!("{}relays/{relay}", self.prefix),
                    relay,
                    Some(PutOptions::new().with_lease(etcd_lease)),
                )
                .await
                .map_err(etcd_error)?;
            relay_leases.insert(relay.to_owned(), etcd_lease);
        }
        drop(relay_leases);
        let live = client
            .get(
                format!("{}relays/", self.prefix),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(etcd_error)?
            .count();
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    /// Tries the free partitions in turn from one that depends on the relay's name, so
    /// that relays starting together do not all reach for the same ones first.
    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 || self.partitions == 0 {
            return Ok(Vec::new());
        }
        let held: HashSet<u32> = self.held().await?.into_keys().collect();
        let first = fnv1a_32(relay.as_bytes()) % self.partitions;
        let mut granted = Vec::new();
        for offset in 0..self.partitions {
            if granted.len() >= max {
                break;
            }
            let partition = (first + offset) % self.partitions;
            if held.contains(&partition) {
                continue;
            }
            if let Some(lease) = self.grant(relay, partition, ttl_secs(ttl)).await? {
                debug!(partition, epoch = lease.epoch, relay, takeover = ?lease.takeover, "lease granted");
                granted.push(lease);
            }
        }
        Ok(granted)
    }

    /// Keeps alive the etcd lease of each ownership key still held as granted. `ttl` was
    /// fixed when the etcd lease was granted.
    async fn renew(&self, leases: &[Lease], _ttl: Duration) -> Result<Vec<u32>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let held = self.held().await?;
        let renewals = leases.iter().filter_map(|lease| {
            let current = held.get(&lease.partition)?;
            (current.epoch == lease.epoch && current.owner == lease.owner).then_some(async move {
                self.keep_alive(current.etcd_lease)
                    .await
                    .map(|alive| alive.then_some(lease.partition))
            })
        });
        let renewed = futures::future::join_all(renewals).await;
        renewed.into_iter().filter_map(Result::transpose).collect()
    }

    /// Deletes the ownership key and records how the owner left, in one transaction that
    /// changes nothing once the partition was granted again (every grant rewrites the
    /// state key, moving its mod revision past the grant's).
    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let state = self.state_key(lease.partition);
        let grant_revision = lease.epoch - self.epoch_base;
        let response = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        state.as_str(),
                        CompareOp::Equal,
                        grant_revision,
                    )])
                    .and_then([
                        TxnOp::delete(self.owner_key(lease.partition), None),
                        TxnOp::put(state.as_str(), if clean { CLEAN } else { UNCLEAN }, None),
                    ]),
            )
            .await
            .map_err(etcd_error)?;
        if !response.succeeded() {
            debug!(
                partition = lease.partition,
                epoch = lease.epoch,
                "lease already taken over; nothing to release"
            );
        }
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        let Some(etcd_lease) = self.relay_leases.lock().await.remove(relay) else {
            return Ok(());
        };
        self.client
            .clone()
            .lease_revoke(etcd_lease)
            .await
            .map_err(etcd_error)?;
        Ok(())
    }
}

/// gRPC codes that may pass on retry: cancelled, unknown, deadline exceeded, resource
/// exhausted, aborted, internal, unavailable.
const RETRYABLE_GRPC_CODES: [i32; 7] = [1, 2, 4, 8, 10, 13, 14];

/// Unreachable members, timeouts and leader elections are outages to retry; bad
/// endpoints, wrong credentials and refused requests are not.
fn etcd_error(err: etcd_client::Error) -> StoreError {
    let retryable = match &err {
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::LeaseKeepAliveError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            RETRYABLE_GRPC_CODES.contains(&i32::from(status.code()))
        }
        _ => false,
    };
    if retryable {
        StoreError::Unavailable(Box::new(err))
    } else {
        StoreError::Other(Box::new(err))
    }
}
