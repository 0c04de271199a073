//! `ferry demo`: the whole path on embedded SQLite, no server needed. An order service
//! writes orders and their events in one transaction each (some roll back), the relay
//! publishes them to a JSON-lines file, and a consumer applies them through the inbox
//! into its own read model, twice, to show redelivered events being skipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use sqlx::SqlitePool;
use tokio_util::sync::CancellationToken;

use ferry::file::{FileSink, FileSinkConfig};
use ferry::sql::StoreSettings;
use ferry::sqlite::{SqliteInbox, SqliteOutbox};
use ferry::{NewMessage, OutboxStore, Processed, ReceivedMessage, Relay, RelayConfig};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Directory for the databases and the event file (default: a new temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Orders the service creates.
    #[arg(long, default_value_t = 50)]
    orders: u32,
}

const PARTITIONS: u32 = 4;

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp;
    let dir = match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let events_path = dir.join("events.jsonl");
    let _ = std::fs::remove_file(&events_path);
    println!("ferry demo in {}", dir.display());

    let outbox = Arc::new(
        SqliteOutbox::connect(&sqlite_url(&dir, "shop.db"), 4, StoreSettings::default()).await?,
    );
    outbox.migrate(PARTITIONS).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, status TEXT NOT NULL, total INTEGER NOT NULL)")
        .execute(outbox.pool())
        .await?;

    let sink = FileSink::open(&FileSinkConfig {
        path: events_path.clone(),
        source: Some("urn:ferry:demo:shop".into()),
    })
    .await?;
    let mut relay_config = RelayConfig::new("demo-relay");
    relay_config.poll_interval = Duration::from_millis(50);
    relay_config.lease_ttl = Duration::from_secs(3);
    let relay = Relay::new(outbox.clone(), outbox.clone(), Arc::new(sink), relay_config);
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));

    let produced = run_order_service(&outbox, args.orders).await?;
    println!(
        "order service: {} transactions committed with {} events; {} rolled back (their events never reach the outbox)",
        produced.committed, produced.events, produced.rolled_back
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let backlog: u64 = outbox.status().await?.iter().map(|p| p.backlog).sum();
        if backlog == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the relay did not drain the outbox in 30 s ({backlog} left)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    relay_task.await.context("relay task")??;
    let published = stats.published.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "relay: {published} events published to {}",
        events_path.display()
    );

    let consumer =
        SqliteOutbox::connect(&sqlite_url(&dir, "billing.db"), 4, StoreSettings::default()).await?;
    consumer.migrate(PARTITIONS).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS order_view (id TEXT PRIMARY KEY, status TEXT NOT NULL, events INTEGER NOT NULL)")
        .execute(consumer.pool())
        .await?;
    let inbox = SqliteInbox::new("billing", consumer.table_prefix());
    let lines = std::fs::read_to_string(&events_path)?;
    let first = consume(consumer.pool(), &inbox, &lines).await?;
    println!(
        "consumer, first delivery: {} applied, {} duplicates skipped, {} stale skipped",
        first.applied, first.duplicates, first.stale
    );
    let again = consume(consumer.pool(), &inbox, &lines).await?;
    println!(
        "consumer, same events delivered again: {} applied, {} duplicates skipped, {} stale skipped",
        again.applied, again.duplicates, again.stale
    );
    let view: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, status, events FROM order_view ORDER BY id LIMIT 3")
            .fetch_all(consumer.pool())
            .await?;
    for (id, status, events) in view {
        println!("  order {id}: {status} after {events} events");
    }
    let ok = first.applied == produced.events && again.applied == 0 && published == produced.events;
    println!(
        "{} in {:.2} s: produced {}, published {}, applied {}, duplicates skipped {}",
        if ok { "done" } else { "MISMATCH" },
        started.elapsed().as_secs_f64(),
        produced.events,
        published,
        first.applied,
        again.duplicates
    );
    if !ok {
        bail!("the demo's counts do not add up");
    }
    Ok(())
}

fn sqlite_url(dir: &std::path::Path, file: &str) -> String {
    format!("sqlite://{}", dir.join(file).display())
}

struct Produced {
    committed: u64,
    rolled_back: u64,
    events: u64,
}

/// Creates, pays and ships orders, each step one transaction holding the business change
/// and its event; every seventh order's payment is rolled back.
async fn run_order_service(outbox: &SqliteOutbox, orders: u32) -> anyhow::Result<Produced> {
    let pool = outbox.pool();
    let mut produced = Produced {
        committed: 0,
        rolled_back: 0,
        events: 0,
    };
    for n in 1..=orders {
        let id = format!("{n:04}");
        let total = 1000 + i64::from(n) * 7;
        for (step, status) in ["order.created", "order.paid", "order.shipped"]
            .iter()
            .enumerate()
        {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            if step == 0 {
                sqlx::query("INSERT INTO orders (id, status, total) VALUES (?, ?, ?)")
                    .bind(&id)
                    .bind(*status)
                    .bind(total)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query("UPDATE orders SET status = ? WHERE id = ?")
                    .bind(*status)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            let payload = serde_json::json!({ "order_id": id, "status": status, "total": total });
            outbox
                .enqueue(
                    &mut tx,
                    NewMessage::new("order", &id, *status, payload.to_string()),
                )
                .await?;
            if step == 1 && n % 7 == 0 {
                tx.rollback().await?;
                produced.rolled_back += 1;
                break;
            }
            tx.commit().await?;
            produced.committed += 1;
            produced.events += 1;
        }
    }
    Ok(produced)
}

#[derive(Default)]
struct Consumed {
    applied: u64,
    duplicates: u64,
    stale: u64,
}

async fn consume(pool: &SqlitePool, inbox: &SqliteInbox, lines: &str) -> anyhow::Result<Consumed> {
    let mut consumed = Consumed::default();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let message = ReceivedMessage::from_structured_json(line)?;
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = inbox
            .process(&mut tx, &message, async |tx, m| {
                sqlx::query(
                    "INSERT INTO order_view (id, status, events) VALUES (?, ?, 1) \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status, events = events + 1",
                )
                .bind(&m.aggregate_id)
                .bind(&m.event_type)
                .execute(&mut **tx)
                .await
            })
            .await?;
        tx.commit().await?;
        match outcome {
            Processed::Applied { .. } => consumed.applied += 1,
            Processed::Duplicate => consumed.duplicates += 1,
            Processed::Stale { .. } => consumed.stale += 1,
        }
    }
    Ok(consumed)
}
