//! Producers: concurrent tasks writing through the real producer API, `enqueue` inside
//! transactions of their own, as an application would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::NewMessage;
use ferry::mysql::MyOutbox;
use ferry::postgres::PgOutbox;
use ferry::redis_store::{RedisOutbox, RedisWrites};
use ferry::sqlite::SqliteOutbox;
use ferry_cli::config::{Config, StoreConfig};
use ferry_cli::wiring;

use crate::args::{BenchArgs, Mode};
use crate::check::Latencies;
use crate::plan::{AGGREGATE_TYPE, EVENT_TYPE, Plan};
use crate::report::rate;

/// The producers' own connection to the outbox, apart from the relay's.
#[derive(Debug)]
pub(crate) enum ProducerStore {
    Postgres(PgOutbox),
    /// SQLite has one writer at a time and its busy handler is not fair: producers that
    /// begin again right after committing can keep one of them waiting past the busy
    /// timeout. They take turns through `writer` (first come, first served) instead, as an
    /// application with several writing tasks on one SQLite file would.
    Sqlite {
        outbox: Arc<SqliteOutbox>,
        writer: tokio::sync::Mutex<()>,
    },
    Mysql(MyOutbox),
    /// One multiplexed connection shared by every producer, as in an application.
    Redis(RedisOutbox),
}

impl ProducerStore {
    /// A PostgreSQL or MySQL pool with a connection per producer (plus one), a SQLite
    /// pool, or a Redis connection.
    pub(crate) async fn open(config: &Config, producers: u32) -> anyhow::Result<Self> {
        Ok(match &config.store {
            StoreConfig::Postgres { url, .. } => Self::Postgres(
                PgOutbox::connect(url.expose_secret(), producers + 1, config.store_settings())
                    .await
                    .context("connecting the producers to PostgreSQL (store.url)")?,
            ),
            StoreConfig::Mysql { url, .. } => Self::Mysql(
                MyOutbox::connect(url.expose_secret(), producers + 1, config.store_settings())
                    .await
                    .context("connecting the producers to MySQL (store.url)")?,
            ),
            // One connection or file for all: the relay's own opening (and TLS settings).
            StoreConfig::Sqlite { .. } | StoreConfig::Redis { .. } => {
                match wiring::Store::open(config).await? {
                    wiring::Store::Sqlite(outbox) => Self::Sqlite {
                        outbox,
                        writer: tokio::sync::Mutex::new(()),
                    },
                    wiring::Store::Redis(outbox) => Self::Redis(Arc::unwrap_or_clone(outbox)),
                    wiring::Store::Postgres(_) | wiring::Store::Mysql(_) => {
                        anyhow::bail!("a sqlite or redis store config opened another store")
                    }
                }
            }
        })
    }

    /// Enqueues `messages` in one transaction and commits (for Redis: one script call);
    /// returns their ids.
    async fn commit(&self, messages: Vec<NewMessage>) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(messages.len());
        match self {
            Self::Postgres(outbox) => {
                let mut tx = outbox.pool().begin().await.context("BEGIN")?;
                for message in messages {
                    ids.push(outbox.enqueue(&mut tx, message).await?.id);
                }
                tx.commit().await.context("COMMIT")?;
            }
            Self::Sqlite { outbox, writer } => {
                let _turn = writer.lock().await;
                let mut tx = outbox
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .context("BEGIN IMMEDIATE")?;
                for message in messages {
                    ids.push(outbox.enqueue(&mut tx, message).await?.id);
                }
                tx.commit().await.context("COMMIT")?;
            }
            // Each producer writes aggregates of its own, so no two transactions wait on
            // each other's version locks and InnoDB has no deadlock to resolve.
            Self::Mysql(outbox) => {
                let mut tx = outbox.pool().begin().await.context("BEGIN")?;
                for message in messages {
                    ids.push(outbox.enqueue(&mut tx, message).await?.id);
                }
                tx.commit().await.context("COMMIT")?;
            }
            Self::Redis(outbox) => {
                let enqueued = outbox.enqueue_all(&RedisWrites::new(), messages).await?;
                ids.extend(enqueued.into_iter().map(|e| e.id));
            }
        }
        Ok(ids)
    }
}

/// What every producer shares.
#[derive(Debug)]
pub(crate) struct Production {
    pub(crate) store: ProducerStore,
    pub(crate) plan: Plan,
    pub(crate) per_tx: u32,
    /// Copied into each message, as an application serialises each event anew.
    pub(crate) payload: String,
    /// Live mode: the target rate in messages per second over all producers.
    pub(crate) rate: Option<u32>,
    /// Messages committed so far.
    pub(crate) produced: AtomicU64,
    /// Transactions committed so far.
    pub(crate) transactions: AtomicU64,
    /// Live mode: commit instants for the latencies.
    pub(crate) latency: Option<Arc<Latencies>>,
}

impl Production {
    /// The producers `args` ask for, on their own connections to `config`'s store; with
    /// `latency`, live mode's commit instants are recorded there.
    pub(crate) async fn open(
        args: &BenchArgs,
        config: &Config,
        latency: Option<Arc<Latencies>>,
    ) -> anyhow::Result<Self> {
        let live = args.mode == Mode::Live;
        Ok(Self {
            store: ProducerStore::open(config, args.producers).await?,
            plan: Plan {
                messages: args.messages,
                aggregates: args.aggregates,
                producers: args.producers,
            },
            per_tx: args.per_tx.unwrap_or(if live { 1 } else { 100 }),
            payload: payload(usize::try_from(args.payload_bytes)?),
            rate: live.then_some(args.rate),
            produced: AtomicU64::default(),
            transactions: AtomicU64::default(),
            latency,
        })
    }

    /// Runs producer `index` until its share of the plan is committed or `stop` fires.
    pub(crate) async fn run_producer(
        self: Arc<Self>,
        index: u32,
        started: tokio::time::Instant,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let total = self.plan.messages_of(index);
        // In live mode producer i's t-th transaction is due at started + (t + i/P) * gap:
        // the producers take turns, so the total is smooth at the target rate.
        let gap = self.rate.map(|rate| {
            Duration::from_secs_f64(
                f64::from(self.per_tx) * f64::from(self.plan.producers) / f64::from(rate),
            )
        });
        let mut sent = 0u64;
        let mut transaction = 0u32;
        while sent < total && !stop.is_cancelled() {
            if let Some(gap) = gap {
                let due = started
                    + gap.mul_f64(
                        f64::from(transaction) + f64::from(index) / f64::from(self.plan.producers),
                    );
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => break,
                }
            }
            let count = total.saturating_sub(sent).min(u64::from(self.per_tx));
            let messages = (sent..sent + count)
                .map(|k| {
                    NewMessage::new(
                        AGGREGATE_TYPE,
                        self.plan.aggregate(index, k).to_string(),
                        EVENT_TYPE,
                        self.payload.clone(),
                    )
                })
                .collect();
            let ids =
                self.store.commit(messages).await.with_context(|| {
                    format!("producer {index}: transaction {transaction} failed")
                })?;
            let committed_at = Instant::now();
            if let Some(latency) = &self.latency {
                latency.committed(&ids, committed_at);
            }
            sent += count;
            transaction += 1;
            self.produced.fetch_add(count, Ordering::Relaxed);
            self.transactions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Drain mode: runs every producer to the end of its share, then prints what they did.
pub(crate) async fn produce_all(
    production: &Arc<Production>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let origin = tokio::time::Instant::now();
    let producers = (0..production.plan.producers).map(|index| {
        tokio::spawn(Arc::clone(production).run_producer(index, origin, stop.clone()))
    });
    futures::future::try_join_all(
        producers
            .map(|producer| async move { producer.await.context("a producer task panicked")? }),
    )
    .await?;
    let elapsed = started.elapsed();
    let produced = production.produced.load(Ordering::Relaxed);
    println!(
        "produce: {produced} messages in {} transactions, {:.2} s, {:.0} msg/s",
        production.transactions.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        rate(produced, elapsed)
    );
    Ok(())
}

/// A JSON object of exactly `bytes` bytes (at least 8): `{"p":"xxxx…"}`.
pub(crate) fn payload(bytes: usize) -> String {
    const SHELL: usize = r#"{"p":""}"#.len();
    let mut text = String::with_capacity(bytes.max(SHELL));
    text.push_str(r#"{"p":""#);
    text.extend(std::iter::repeat_n('x', bytes.saturating_sub(SHELL)));
    text.push_str(r#""}"#);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_of_the_asked_size() {
        for size in [8, 9, 200, 4096] {
            let bytes = payload(size);
            assert_eq!(bytes.len(), size);
            serde_json::from_str::<serde_json::Value>(&bytes).expect("valid JSON");
        }
    }
}
