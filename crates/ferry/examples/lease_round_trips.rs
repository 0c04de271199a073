//! What leases cost per lease backend: the latency of one relay's lease round (heartbeat +
//! renewal of every partition it holds, done every third of the lease TTL), of acquiring
//! and releasing all partitions, of the outbox's `adopt`, and of a fenced mark of 100 rows
//! with leases in the store versus adopted ones. Run against the local services:
//!
//! ```sh
//! cargo run --release -p ferry --features etcd-lease --example lease_round_trips
//! ```
//!
//! Addresses come from `FERRY_TEST_PG_URL`, `FERRY_TEST_REDIS_URL`, `FERRY_TEST_ETCD_URL`.
//! It makes tables and keys of its own (`lb<random>`), and drops the tables at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::postgres::PgOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{Lease, LeaseStore, NewMessage, OutboxStore};
use ferry_core::testing::services;

const PARTITIONS: u32 = 16;
const ROUNDS: usize = 200;
const TTL: Duration = Duration::from_secs(10);
const MARKED_PER_BATCH: usize = 100;

/// Median and 99th percentile of `samples`, in milliseconds.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!("p50 {:7.3} ms   p99 {:7.3} ms", at(0.5), at(0.99))
}

async fn outbox(tag: &str, external_leases: bool) -> anyhow::Result<PgOutbox> {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(format!("lb{tag}_"))?,
        external_leases,
        ..StoreSettings::default()
    };
    let outbox = PgOutbox::connect(&services::postgres_url(), 4, settings).await?;
    outbox.migrate(PARTITIONS).await?;
    Ok(outbox)
}

/// Lease round, acquire-all and release-all latencies of `leases`; adopts every grant in
/// `outbox` when it is given (leases outside the store).
async fn measure(
    name: &str,
    leases: &dyn LeaseStore,
    adopting: Option<&PgOutbox>,
) -> anyhow::Result<()> {
    let (mut acquire, mut round, mut release, mut adopt) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS / 10 {
        let started = Instant::now();
        let held = leases.acquire("bench", PARTITIONS as usize, TTL).await?;
        acquire.push(started.elapsed());
        anyhow::ensure!(held.len() == PARTITIONS as usize, "{name}: got {held:?}");
        if let Some(outbox) = adopting {
            for lease in &held {
                let started = Instant::now();
                outbox.adopt(lease).await?;
                adopt.push(started.elapsed());
            }
        }
        for _ in 0..10 {
            let started = Instant::now();
            leases.heartbeat("bench", TTL).await?;
            let renewed = leases.renew(&held, TTL).await?;
            round.push(started.elapsed());
            anyhow::ensure!(renewed.len() == held.len(), "{name}: lost a lease");
        }
        let started = Instant::now();
        for lease in &held {
            leases.release(lease, true).await?;
        }
        release.push(started.elapsed());
    }
    leases.leave("bench").await?;
    println!("{name}:");
    println!(
        "  lease round (heartbeat + renew {PARTITIONS}) {}",
        summary(round)
    );
    println!(
        "  acquire {PARTITIONS}                        {}",
        summary(acquire)
    );
    println!(
        "  release {PARTITIONS}                        {}",
        summary(release)
    );
    if !adopt.is_empty() {
        println!("  outbox adopt (per grant)          {}", summary(adopt));
    }
    Ok(())
}

/// Latency of marking batches of 100 rows of partition 0 under `lease`.
async fn measure_marks(name: &str, outbox: &PgOutbox, lease: &Lease) -> anyhow::Result<()> {
    let aggregates: Vec<String> = (0..)
        .map(|n: u32| n.to_string())
        .filter(|id| ferry::partition_for(&format!("bench/{id}"), PARTITIONS) == 0)
        .take(MARKED_PER_BATCH)
        .collect();
    let mut marks = Vec::new();
    for _ in 0..ROUNDS / 4 {
        let mut tx = outbox.pool().begin().await?;
        let mut ids = Vec::new();
        for aggregate in &aggregates {
            let message = NewMessage::new("bench", aggregate.as_str(), "bench.marked", "{}");
            ids.push(outbox.enqueue(&mut tx, message).await?.id);
        }
        tx.commit().await?;
        let started = Instant::now();
        let marked = outbox.mark_published(lease, &ids, Some(1)).await?;
        marks.push(started.elapsed());
        anyhow::ensure!(marked == MARKED_PER_BATCH as u64, "{name}: marked {marked}");
    }
    println!("  mark {MARKED_PER_BATCH} rows ({name}) {}", summary(marks));
    Ok(())
}

async fn drop_tables(outbox: &PgOutbox) -> anyhow::Result<()> {
    let prefix = outbox.table_prefix().as_str();
    for table in [
        "outbox",
        "aggregate_versions",
        "leases",
        "relays",
        "inbox",
        "inbox_versions",
        "meta",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {prefix}{table} CASCADE"
        )))
        .execute(outbox.pool())
        .await?;
    }
    for function in [
        "notify",
        "partition_for",
        "uuid_v7",
        "enqueue_bytes",
        "enqueue",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP FUNCTION IF EXISTS {prefix}{function} CASCADE"
        )))
        .execute(outbox.pool())
        .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tag = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    println!("{ROUNDS} lease rounds per backend, {PARTITIONS} partitions, one relay\n");

    let own = Arc::new(outbox(&format!("{tag}s"), false).await?);
    measure("leases in the store (PostgreSQL)", own.as_ref(), None).await?;
    // Long enough for every batch of the mark measurement.
    let held = own
        .acquire("bench", PARTITIONS as usize, Duration::from_secs(600))
        .await?;
    let lease = held
        .iter()
        .find(|l| l.partition == 0)
        .ok_or_else(|| anyhow::anyhow!("partition 0 not granted: {held:?}"))?;
    measure_marks("own lease: epoch + expiry checked", &own, lease).await?;

    let adopting = outbox(&format!("{tag}x"), true).await?;
    let redis = ferry::redis_lease::RedisLeases::connect(
        &services::redis_url(),
        &format!("lb{tag}:"),
        PARTITIONS,
        0,
    )
    .await?;
    println!();
    measure("leases in Redis", &redis, Some(&adopting)).await?;

    #[cfg(feature = "etcd-lease")]
    {
        let endpoints = [services::etcd_url()];
        let etcd = ferry::etcd_lease::EtcdLeases::connect(
            ferry::etcd_lease::EtcdConnection {
                tls_ca_file: None,
                endpoints: &endpoints,
                credentials: None,
                key_prefix: &format!("lb{tag}/"),
            },
            PARTITIONS,
            adopting.highest_epoch().await?,
        )
        .await?;
        println!();
        measure("leases in etcd", &etcd, Some(&adopting)).await?;
    }

    let adopted = Lease {
        partition: 0,
        epoch: adopting.highest_epoch().await? + 1,
        owner: "bench".into(),
        takeover: ferry::Takeover::Clean,
    };
    adopting.adopt(&adopted).await?;
    println!();
    measure_marks("adopted lease: epoch + owner checked", &adopting, &adopted).await?;

    drop_tables(&own).await?;
    drop_tables(&adopting).await?;
    Ok(())
}
