//! Lease backends outside the outbox store, against the real servers: Redis
//! (`FERRY_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) and etcd
//! (`FERRY_TEST_ETCD_URL`, default `http://127.0.0.1:23790`), with the real PostgreSQL
//! outbox (`FERRY_TEST_PG_URL`) as the store that fences. Every test runs once per backend
//! (`redis::…`, `etcd::…`) with its own key prefix and table prefix.
#![cfg(all(
    feature = "postgres",
    feature = "file",
    any(feature = "redis-lease", feature = "etcd-lease")
))]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::file::{FileSink, FileSinkConfig};
use ferry::postgres::PgOutbox;
use ferry::sql::{Dialect, SqlOutbox, StoreSettings, TablePrefix};
use ferry::{
    Lease, LeaseStore, NewMessage, OutboxStore, ReceivedMessage, Relay, RelayConfig, StoreError,
    Takeover,
};
use ferry_core::testing::services;

fn tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    #[cfg(feature = "redis-lease")]
    Redis,
    #[cfg(feature = "etcd-lease")]
    Etcd,
}

impl Backend {
    fn unique_prefix(self) -> String {
        match self {
            #[cfg(feature = "redis-lease")]
            Self::Redis => format!("test:{}:", tag()),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => format!("test/{}/", tag()),
        }
    }

    async fn try_connect(
        self,
        prefix: &str,
        partitions: u32,
        floor: i64,
    ) -> Result<Arc<dyn LeaseStore>, StoreError> {
        Ok(match self {
            #[cfg(feature = "redis-lease")]
            Self::Redis => Arc::new(
                ferry::redis_lease::RedisLeases::connect(
                    &services::redis_url(),
                    prefix,
                    partitions,
                    floor,
                )
                .await?,
            ),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => Arc::new(
                ferry::etcd_lease::EtcdLeases::connect(
                    ferry::etcd_lease::EtcdConnection {
                        tls_ca_file: None,
                        endpoints: &[services::etcd_url()],
                        credentials: None,
                        key_prefix: prefix,
                    },
                    partitions,
                    floor,
                )
                .await?,
            ),
        })
    }

    async fn connect(self, prefix: &str, partitions: u32, floor: i64) -> Arc<dyn LeaseStore> {
        self.try_connect(prefix, partitions, floor).await.unwrap()
    }

    /// Deletes every key under `prefix`, as a backend that lost its state would have.
    async fn wipe(self, prefix: &str) {
        match self {
            #[cfg(feature = "redis-lease")]
            Self::Redis => {
                let client = ::redis::Client::open(services::redis_url()).unwrap();
                let mut connection = client.get_multiplexed_async_connection().await.unwrap();
                let keys: Vec<String> = ::redis::cmd("KEYS")
                    .arg(format!("{prefix}*"))
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                let _: () = ::redis::cmd("DEL")
                    .arg(keys)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            }
            #[cfg(feature = "etcd-lease")]
            Self::Etcd => {
                let mut client = etcd_client::Client::connect([services::etcd_url()], None)
                    .await
                    .unwrap();
                client
                    .delete(
                        prefix,
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    )
                    .await
                    .unwrap();
            }
        }
    }
}

/// A fresh outbox of dialect `D` at `url` whose leases live outside it.
async fn sql_outbox<D: Dialect>(url: &str, partitions: u32) -> SqlOutbox<D> {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(format!("x{}_", tag())).unwrap(),
        external_leases: true,
        ..StoreSettings::default()
    };
    let outbox = SqlOutbox::connect(url, 4, settings).await.unwrap();
    outbox.migrate(partitions).await.unwrap();
    outbox
}

/// A fresh PostgreSQL outbox whose leases live outside it.
async fn outbox(partitions: u32) -> PgOutbox {
    sql_outbox(&services::postgres_url(), partitions).await
}

/// Enqueues an event of `aggregate` in a transaction of its own.
async fn enqueue<D: Dialect>(outbox: &SqlOutbox<D>, aggregate: &str) -> Uuid {
    let mut tx = outbox.pool().begin().await.unwrap();
    let message = NewMessage::new("order", aggregate, "order.changed", "{}");
    let id = outbox.enqueue(&mut tx, message).await.unwrap().id;
    tx.commit().await.unwrap();
    id
}

async fn backlog(outbox: &PgOutbox) -> u64 {
    outbox
        .status()
        .await
        .unwrap()
        .iter()
        .map(|p| p.backlog)
        .sum()
}

/// Acquires for `relay` until a lease is granted, failing after `within`; returns it and
/// how long it took.
async fn acquire_within(
    leases: &dyn LeaseStore,
    relay: &str,
    ttl: Duration,
    within: Duration,
) -> (Lease, Duration) {
    let started = Instant::now();
    loop {
        if let Some(lease) = leases.acquire(relay, 1, ttl).await.unwrap().pop() {
            return (lease, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "{relay} got no lease in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lease of a one-partition backend, granted to `relay` now.
async fn grant(leases: &dyn LeaseStore, relay: &str, ttl: Duration) -> Lease {
    leases.acquire(relay, 1, ttl).await.unwrap().pop().unwrap()
}

fn partitions_of(leases: &[Lease]) -> Vec<u32> {
    let mut partitions: Vec<u32> = leases.iter().map(|l| l.partition).collect();
    partitions.sort_unstable();
    partitions
}

async fn grants_renews_and_releases(backend: Backend) {
    let leases = backend.connect(&backend.unique_prefix(), 4, 0).await;
    let ttl = Duration::from_secs(10);
    let a = leases.acquire("relay-a", 2, ttl).await.unwrap();
    assert_eq!(a.len(), 2);
    assert!(
        a.iter()
            .all(|l| l.takeover == Takeover::Clean && l.owner == "relay-a"),
        "{a:?}"
    );
    let b = leases.acquire("relay-b", 10, ttl).await.unwrap();
    assert_eq!(b.len(), 2, "only the two free partitions: {b:?}");
    let all: HashSet<u32> = a.iter().chain(&b).map(|l| l.partition).collect();
    assert_eq!(all.len(), 4, "no partition granted twice: {a:?} {b:?}");
    assert!(leases.acquire("relay-c", 10, ttl).await.unwrap().is_empty());

    let mut renewed = leases.renew(&a, ttl).await.unwrap();
    renewed.sort_unstable();
    assert_eq!(renewed, partitions_of(&a));
    let mut stale = a[0].clone();
    stale.epoch -= 1;
    let mut impostor = b[0].clone();
    impostor.owner = "relay-a".into();
    assert!(
        leases
            .renew(&[stale, impostor], ttl)
            .await
            .unwrap()
            .is_empty(),
        "a wrong epoch or owner renews nothing"
    );

    leases.release(&a[0], true).await.unwrap();
    leases.release(&a[1], false).await.unwrap();
    let c = leases.acquire("relay-c", 10, ttl).await.unwrap();
    assert_eq!(partitions_of(&c), partitions_of(&a));
    for lease in &c {
        let expected_clean = lease.partition == a[0].partition;
        assert_eq!(
            lease.takeover == Takeover::Clean,
            expected_clean,
            "a clean release hands over cleanly, an unclean one does not: {lease:?}"
        );
    }
    let before = a.iter().chain(&b).map(|l| l.epoch).max().unwrap();
    assert!(c.iter().all(|l| l.epoch > before), "{c:?} after {before}");

    // A release under a lease granted again since changes nothing.
    leases.release(&a[1], true).await.unwrap();
    assert_eq!(
        leases.renew(&c, ttl).await.unwrap().len(),
        2,
        "the stale release left the new grant alone"
    );
}

async fn epochs_increase_with_every_grant(backend: Backend) {
    let leases = backend.connect(&backend.unique_prefix(), 1, 0).await;
    let mut previous = 0;
    for round in 0..6 {
        let lease = grant(
            leases.as_ref(),
            &format!("relay-{}", round % 2),
            Duration::from_secs(10),
        )
        .await;
        assert!(lease.epoch > previous, "{} after {previous}", lease.epoch);
        previous = lease.epoch;
        leases.release(&lease, round % 3 != 0).await.unwrap();
    }
}

async fn an_expired_lease_is_taken_over_uncleanly_and_cannot_be_renewed(backend: Backend) {
    let leases = backend.connect(&backend.unique_prefix(), 1, 0).await;
    let ttl = Duration::from_secs(2);
    let first = grant(leases.as_ref(), "relay-a", ttl).await;
    let (second, waited) =
        acquire_within(leases.as_ref(), "relay-b", ttl, Duration::from_secs(10)).await;
    assert!(
        waited >= Duration::from_millis(1500),
        "granted after {waited:?}: before the lease ran out"
    );
    assert!(second.epoch > first.epoch);
    assert!(
        matches!(
            second.takeover,
            Takeover::Unclean {
                checkpoint: None,
                ..
            }
        ),
        "{:?}",
        second.takeover
    );
    assert!(leases.renew(&[first], ttl).await.unwrap().is_empty());
    assert_eq!(leases.renew(&[second], ttl).await.unwrap(), vec![0]);
}

async fn heartbeats_count_live_relays(backend: Backend) {
    let leases = backend.connect(&backend.unique_prefix(), 1, 0).await;
    let ttl = Duration::from_secs(10);
    assert_eq!(leases.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(leases.heartbeat("b", ttl).await.unwrap(), 2);
    assert_eq!(leases.heartbeat("a", ttl).await.unwrap(), 2);
    leases.leave("b").await.unwrap();
    assert_eq!(leases.heartbeat("a", ttl).await.unwrap(), 1);
    // A relay that stops heartbeating drops out when its heartbeat runs out, and counts
    // again when it comes back (after a pause longer than its TTL, say).
    assert_eq!(
        leases.heartbeat("c", Duration::from_secs(1)).await.unwrap(),
        2
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leases.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(leases.heartbeat("c", ttl).await.unwrap(), 2);
}

/// G5 with leases outside the store: a relay paused past its lease resumes after another
/// took the partition over and adopted it; the outbox refuses everything it tries, and the
/// checkpoints recorded on marks reach each new owner.
async fn g5_a_paused_owner_is_fenced_by_the_outbox_after_a_takeover(backend: Backend) {
    let outbox = outbox(1).await;
    let first_id = enqueue(&outbox, "1").await;
    let second_id = enqueue(&outbox, "2").await;
    let leases = backend
        .connect(
            &backend.unique_prefix(),
            1,
            outbox.highest_epoch().await.unwrap(),
        )
        .await;
    let ttl = Duration::from_secs(2);
    let paused = grant(leases.as_ref(), "relay-a", ttl).await;
    assert_eq!(outbox.adopt(&paused).await.unwrap(), None);
    assert_eq!(
        outbox
            .mark_published(&paused, &[first_id], Some(7))
            .await
            .unwrap(),
        1
    );

    let (taker, _) = acquire_within(leases.as_ref(), "relay-b", ttl, Duration::from_secs(10)).await;
    assert!(
        matches!(taker.takeover, Takeover::Unclean { .. }),
        "{:?}",
        taker.takeover
    );
    assert_eq!(
        outbox.adopt(&taker).await.unwrap(),
        Some(7),
        "the checkpoint recorded by the store reaches the new owner"
    );

    let refused = outbox
        .mark_published(&paused, &[second_id], None)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, StoreError::Fenced { partition: 0, .. }),
        "{refused}"
    );
    assert_eq!(backlog(&outbox).await, 1, "a fenced mark changes nothing");
    assert!(matches!(
        outbox.set_blocked(&paused, Some("stale")).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(
        matches!(outbox.adopt(&paused).await, Err(StoreError::Fenced { .. })),
        "an older epoch never wins the partition back"
    );
    assert!(leases.renew(&[paused], ttl).await.unwrap().is_empty());

    assert_eq!(
        outbox
            .mark_published(&taker, &[second_id], Some(9))
            .await
            .unwrap(),
        1
    );
    leases.release(&taker, false).await.unwrap();
    let next = grant(leases.as_ref(), "relay-c", ttl).await;
    assert!(matches!(next.takeover, Takeover::Unclean { .. }));
    assert_eq!(outbox.adopt(&next).await.unwrap(), Some(9));
}

/// With a lease backend that lost its keys, epochs restart; the floor from the outbox keeps
/// new grants above what it adopted.
async fn epochs_stay_above_the_outbox_after_the_backend_lost_its_keys(backend: Backend) {
    let outbox = outbox(1).await;
    let prefix = backend.unique_prefix();
    let leases = backend.connect(&prefix, 1, 0).await;
    let before = grant(leases.as_ref(), "relay-a", Duration::from_secs(10)).await;
    outbox.adopt(&before).await.unwrap();
    backend.wipe(&prefix).await;
    let floor = outbox.highest_epoch().await.unwrap();
    assert_eq!(floor, before.epoch);
    let leases = backend.connect(&prefix, 1, floor).await;
    let after = grant(leases.as_ref(), "relay-b", Duration::from_secs(10)).await;
    assert!(after.epoch > floor, "{} not above {floor}", after.epoch);
    outbox.adopt(&after).await.unwrap();
}

/// The relay with leases outside the store: every message published, per aggregate in
/// version order, and the partitions' owners (as the store records them) are the relay.
async fn relay_publishes_everything_with_external_leases(backend: Backend) {
    let outbox = outbox(4).await;
    let mut produced = HashSet::new();
    for _round in 0..10 {
        for aggregate in 0..8 {
            produced.insert(enqueue(&outbox, &aggregate.to_string()).await);
        }
    }
    let leases = backend
        .connect(
            &backend.unique_prefix(),
            4,
            outbox.highest_epoch().await.unwrap(),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let sink = FileSink::open(&FileSinkConfig {
        path: path.clone(),
        source: None,
    })
    .await
    .unwrap();
    let mut config = RelayConfig::new("relay-x");
    config.lease_ttl = Duration::from_secs(3);
    config.poll_interval = Duration::from_millis(100);
    config.external_leases = true;
    let store: Arc<dyn OutboxStore> = Arc::new(outbox.clone());
    let relay = Relay::new(store, leases, Arc::new(sink), config);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while backlog(&outbox).await > 0 {
        assert!(
            Instant::now() < deadline,
            "not drained: {} left",
            backlog(&outbox).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for line in text.lines() {
        let received = ReceivedMessage::from_structured_json(line).unwrap();
        assert!(seen.insert(received.id), "duplicate {}", received.id);
        versions
            .entry(received.aggregate_id)
            .or_default()
            .push(received.version);
    }
    assert_eq!(seen, produced);
    for (aggregate, versions) in versions {
        assert_eq!(
            versions,
            (1..=10).collect::<Vec<_>>(),
            "aggregate {aggregate}"
        );
    }
}

fn lease(epoch: i64, owner: &str) -> Lease {
    Lease {
        partition: 0,
        epoch,
        owner: owner.into(),
        takeover: Takeover::Clean,
    }
}

fn assert_fenced<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::Fenced { partition: 0, .. })),
        "{what}: {result:?}"
    );
}

/// The `adopt` contract on a one-partition outbox holding `ids` (three messages), with
/// epochs above `base`, the store's highest before (what `ferry relay` makes backends do).
async fn adoption_fences_marks_by_epoch_and_owner(
    store: &dyn OutboxStore,
    ids: [Uuid; 3],
    base: i64,
) {
    let lease = |epoch: i64, owner: &str| lease(base + epoch, owner);
    assert_eq!(store.adopt(&lease(5, "a")).await.unwrap(), None);
    assert_eq!(
        store.adopt(&lease(5, "a")).await.unwrap(),
        None,
        "adopting the same lease again is harmless"
    );
    assert_fenced(store.adopt(&lease(5, "b")).await, "same epoch, other owner");
    assert_fenced(store.adopt(&lease(4, "a")).await, "older epoch");
    assert_eq!(
        store
            .mark_published(&lease(5, "a"), &[ids[0]], Some(4))
            .await
            .unwrap(),
        1
    );
    assert_fenced(
        store.mark_published(&lease(5, "b"), &[ids[1]], None).await,
        "mark by another owner",
    );
    store
        .set_blocked(&lease(5, "a"), Some("stuck"))
        .await
        .unwrap();
    assert_eq!(
        store.status().await.unwrap()[0].blocked_reason.as_deref(),
        Some("stuck")
    );

    assert_eq!(store.adopt(&lease(8, "b")).await.unwrap(), Some(4));
    assert_eq!(
        store.status().await.unwrap()[0].blocked_reason,
        None,
        "a new owner starts unblocked"
    );
    assert_fenced(
        store.mark_published(&lease(5, "a"), &[ids[1]], None).await,
        "mark under the superseded epoch",
    );
    assert_fenced(
        store.set_blocked(&lease(5, "a"), Some("stale")).await,
        "blocked reason under the superseded epoch",
    );
    assert_eq!(
        store
            .mark_published(&lease(8, "b"), &[ids[1]], Some(3))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.adopt(&lease(9, "c")).await.unwrap(),
        Some(4),
        "the checkpoint never moves back"
    );
    let status = store.status().await.unwrap();
    assert_eq!((status[0].epoch, status[0].backlog), (base + 9, 1));
}

/// The `adopt` contract on a one-partition outbox of dialect `D` at `url`.
async fn sql_adoption_fences_marks_by_epoch_and_owner<D: Dialect>(url: &str) {
    let outbox = sql_outbox::<D>(url, 1).await;
    let ids = [
        enqueue(&outbox, "1").await,
        enqueue(&outbox, "2").await,
        enqueue(&outbox, "3").await,
    ];
    adoption_fences_marks_by_epoch_and_owner(&outbox, ids, 0).await;
    assert_eq!(outbox.highest_epoch().await.unwrap(), 9);
}

#[tokio::test]
async fn postgres_adoption_fences_marks_by_epoch_and_owner() {
    sql_adoption_fences_marks_by_epoch_and_owner::<ferry::postgres::PgDialect>(
        &services::postgres_url(),
    )
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_adoption_fences_marks_by_epoch_and_owner() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
    sql_adoption_fences_marks_by_epoch_and_owner::<ferry::sqlite::SqliteDialect>(&url).await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mysql_adoption_fences_marks_by_epoch_and_owner() {
    sql_adoption_fences_marks_by_epoch_and_owner::<ferry::mysql::MyDialect>(&services::mysql_url())
        .await;
}

#[cfg(feature = "redis-store")]
#[tokio::test]
async fn redis_store_adoption_fences_marks_by_epoch_and_owner() {
    use ferry::redis_store::{KeyPrefix, RedisOutbox, RedisSettings, RedisWrites};
    let settings = RedisSettings {
        key_prefix: KeyPrefix::new(format!("x{}:", tag())).unwrap(),
        external_leases: true,
        ..RedisSettings::default()
    };
    let outbox = RedisOutbox::connect(&services::redis_url(), settings)
        .await
        .unwrap();
    outbox.migrate(1).await.unwrap();
    let mut ids = Vec::new();
    for aggregate in ["1", "2", "3"] {
        let message = NewMessage::new("order", aggregate, "order.changed", "{}");
        ids.push(
            outbox
                .enqueue(&RedisWrites::new(), message)
                .await
                .unwrap()
                .id,
        );
    }
    let base = outbox.highest_epoch().await.unwrap();
    adoption_fences_marks_by_epoch_and_owner(&outbox, ids.try_into().unwrap(), base).await;
    assert_eq!(outbox.highest_epoch().await.unwrap(), base + 9);
    outbox.remove().await.unwrap();
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        #[cfg(feature = "redis-lease")]
        mod redis {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Redis).await;
                }
            )*
        }
        #[cfg(feature = "etcd-lease")]
        mod etcd {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Etcd).await;
                }
            )*
        }
    };
}

for_each_backend!(
    grants_renews_and_releases,
    epochs_increase_with_every_grant,
    an_expired_lease_is_taken_over_uncleanly_and_cannot_be_renewed,
    heartbeats_count_live_relays,
    g5_a_paused_owner_is_fenced_by_the_outbox_after_a_takeover,
    epochs_stay_above_the_outbox_after_the_backend_lost_its_keys,
    relay_publishes_everything_with_external_leases,
);

#[cfg(feature = "redis-lease")]
#[path = "support/nodelay.rs"]
mod nodelay;

#[cfg(feature = "redis-lease")]
mod redis_only {
    use super::*;

    /// The leases' connection sends at once: redis-rs leaves TCP_NODELAY off unless told.
    #[tokio::test]
    async fn the_connection_sends_without_waiting_for_acks() {
        let _leases = ferry::redis_lease::RedisLeases::connect(&services::redis_url(), "x:", 1, 0)
            .await
            .unwrap();
        let url = services::redis_url();
        super::nodelay::assert_connections_send_at_once(&url, 1, "redis-rs (TcpSettings)");
    }

    /// Without the floor, a Redis that lost its counter restarts epochs low: the outbox
    /// refuses them (safe, not live); a backend that keeps running raises its counter
    /// past every epoch it granted.
    #[tokio::test]
    async fn a_reset_counter_is_refused_by_the_outbox_and_a_running_backend_recovers() {
        let outbox = outbox(1).await;
        let prefix = Backend::Redis.unique_prefix();
        let running = Backend::Redis.connect(&prefix, 1, 0).await;
        let ttl = Duration::from_secs(10);
        let first = grant(running.as_ref(), "relay-a", ttl).await;
        outbox.adopt(&first).await.unwrap();
        Backend::Redis.wipe(&prefix).await;

        let fresh = Backend::Redis.connect(&prefix, 1, 0).await;
        let low = grant(fresh.as_ref(), "relay-b", ttl).await;
        assert!(low.epoch <= first.epoch, "{low:?}");
        assert!(matches!(
            outbox.adopt(&low).await,
            Err(StoreError::Fenced { .. })
        ));
        fresh.release(&low, false).await.unwrap();

        let recovered = grant(running.as_ref(), "relay-a", ttl).await;
        assert!(recovered.epoch > first.epoch, "{recovered:?}");
        outbox.adopt(&recovered).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retryable_and_a_bad_url_is_not() {
        let err = ferry::redis_lease::RedisLeases::connect("redis://127.0.0.1:1", "x:", 1, 0)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        let err = ferry::redis_lease::RedisLeases::connect("http://127.0.0.1", "x:", 1, 0)
            .await
            .unwrap_err();
        assert!(
            !err.is_retryable() && err.to_string().contains("Redis url"),
            "{err}"
        );
    }
}

#[cfg(feature = "etcd-lease")]
mod etcd_only {
    use super::*;

    #[tokio::test]
    async fn a_prefix_whose_epochs_are_below_the_outbox_is_refused_with_the_fix() {
        let prefix = Backend::Etcd.unique_prefix();
        Backend::Etcd.connect(&prefix, 1, 0).await;
        let Err(err) = Backend::Etcd.try_connect(&prefix, 1, i64::MAX / 2).await else {
            panic!("a floor above every epoch of the prefix must be refused");
        };
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("etcdctl del --prefix"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_retryable_and_a_bad_endpoint_is_not() {
        let connect = |endpoint: &'static str| async move {
            ferry::etcd_lease::EtcdLeases::connect(
                ferry::etcd_lease::EtcdConnection {
                    tls_ca_file: None,
                    endpoints: &[endpoint.to_owned()],
                    credentials: None,
                    key_prefix: "x/",
                },
                1,
                0,
            )
            .await
            .unwrap_err()
        };
        let err = connect("http://127.0.0.1:1").await;
        assert!(err.is_retryable(), "{err}");
        let err = connect("not a url").await;
        assert!(!err.is_retryable(), "{err}");
    }
}
