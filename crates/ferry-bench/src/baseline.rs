//! `--baseline`: a naive outbox poller of a few lines, run in the same invocation right
//! after ferry's drain, over a backlog of the same size on the same machine, so that the
//! report can say how many times ferry's relay outpaces what one would write by hand.
//!
//! The poller is one task on one PostgreSQL connection. In a transaction: `SELECT … ORDER
//! BY sequence LIMIT 500 FOR UPDATE SKIP LOCKED`, publish every row to JetStream with
//! `Nats-Msg-Id` (and the aggregate id and version, the two headers a consumer needs to
//! apply events in order; not ferry's CloudEvents set), await every ack, `DELETE` the rows,
//! `COMMIT`; until a select returns no row. It has tables and a stream of its own, read
//! back and checked like ferry's.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream;
use secrecy::ExposeSecret;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::ReceivedMessage;
use ferry_cli::config::{Config, SinkConfig, StoreConfig};
use ferry_cli::wiring;

use crate::args::{BenchArgs, Mode};
use crate::check::Checker;
use crate::consume::{Consumed, Consumer};
use crate::decoded::Decoded;
use crate::isolate;
use crate::plan::{AGGREGATE_TYPE, EVENT_TYPE};
use crate::produce::{self, Production};
use crate::report::{print_check, rate};
use crate::target::{NatsWire, SinkTarget, Target, connect_nats};

/// Rows the poller selects, publishes and deletes per transaction.
const BATCH: u32 = 500;

const AGGREGATE_ID_HEADER: &str = "Aggregate-Id";
const VERSION_HEADER: &str = "Aggregate-Version";

/// What the baseline's run showed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// Messages per second from the poller's start until its outbox was empty.
    pub(crate) rate: f64,
    /// Consistency problems the check found in its stream.
    pub(crate) problems: u64,
}

/// Refuses `--baseline` where the poller cannot run: it is written for drain mode,
/// PostgreSQL and NATS.
pub(crate) fn check_supported(args: &BenchArgs, config: &Config) -> anyhow::Result<()> {
    let postgres = matches!(config.store, StoreConfig::Postgres { .. });
    let nats = matches!(config.sink, SinkConfig::Nats(_));
    if args.mode != Mode::Drain || !postgres || !nats {
        bail!(
            "--baseline runs a naive PostgreSQL -> NATS poller next to ferry's drain: use it with \
             --mode drain and a config whose store is postgres and sink nats (e.g. \
             examples/postgres-nats.toml)"
        );
    }
    Ok(())
}

/// Makes the baseline's own tables and stream (names from `tag`), produces the same
/// backlog as ferry's run, drains it with the poller, checks the stream, and removes what
/// it made unless `--keep`.
pub(crate) async fn run(args: &BenchArgs, tag: &str) -> anyhow::Result<Drained> {
    let mut config = Config::load(&args.config)?;
    isolate::isolate(&mut config, &format!("{tag}base"))?;
    let mut target = Target::create(&mut config).await?;
    if let SinkTarget::Nats { wire, .. } = &mut target.sink {
        *wire = NatsWire::Baseline;
    }
    println!(
        "baseline: {}, {}",
        target.describe_store(),
        target.describe_sink()
    );
    let outcome = drain(args, &config, &target).await;
    target.clean_up(args.keep, outcome.is_ok()).await?;
    outcome
}

async fn drain(args: &BenchArgs, config: &Config, target: &Target) -> anyhow::Result<Drained> {
    let (StoreConfig::Postgres { url, .. }, SinkConfig::Nats(nats)) = (&config.store, &config.sink)
    else {
        bail!("the baseline needs a postgres store and a nats sink");
    };
    // Ferry's sink creates the stream as it did for ferry's run: same settings for both.
    drop(wiring::open_sink(&config.sink).await?);
    let production = Arc::new(Production::open(args, config, None).await?);
    let stop = CancellationToken::new();
    produce::produce_all(&production, &stop).await?;

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url.expose_secret())
        .await
        .context("connecting the baseline poller to PostgreSQL (store.url)")?;
    let jetstream = jetstream::new(connect_nats(nats).await?);
    let table = format!("{}outbox", config.outbox.table_prefix);
    let subject = format!("{}.{AGGREGATE_TYPE}", nats.stream);
    let started = Instant::now();
    let sent = poll(&pool, &table, &jetstream, &subject).await?;
    let elapsed = started.elapsed();
    let drained = rate(sent, elapsed);
    println!(
        "baseline drained (poller start -> outbox empty) {sent}: {:.2} s, {drained:.0} msg/s",
        elapsed.as_secs_f64()
    );

    let consumer = Consumer::open(
        &target.sink,
        Checker::new(&production.plan.versions()),
        None,
        Arc::new(Consumed::new()),
    )
    .await?;
    // Everything is published: the consumer reads to the stream's end as it is now.
    let finish = CancellationToken::new();
    finish.cancel();
    let report = consumer.run(finish, stop).await?;
    print_check(&report);
    Ok(Drained {
        rate: drained,
        problems: report.checker.problems(),
    })
}

/// The naive poller: returns how many rows it published and deleted.
async fn poll(
    pool: &sqlx::PgPool,
    table: &str,
    jetstream: &jetstream::Context,
    subject: &str,
) -> anyhow::Result<u64> {
    let select = format!(
        "SELECT sequence, id, aggregate_id, version, payload FROM {table} \
         ORDER BY sequence LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
    );
    let delete = format!("DELETE FROM {table} WHERE sequence = ANY($1)");
    let mut sent = 0;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(i64, Uuid, String, i64, Vec<u8>)> =
            sqlx::query_as(AssertSqlSafe(select.clone()))
                .fetch_all(&mut *tx)
                .await
                .context("baseline: selecting a batch")?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(sent);
        }
        let mut acks = Vec::with_capacity(rows.len());
        for (_, id, aggregate_id, version, payload) in &rows {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string());
            headers.insert(AGGREGATE_ID_HEADER, aggregate_id.as_str());
            headers.insert(VERSION_HEADER, version.to_string());
            let payload = bytes::Bytes::copy_from_slice(payload);
            acks.push(
                jetstream
                    .publish_with_headers(subject.to_owned(), headers, payload)
                    .await
                    .context("baseline: publishing")?,
            );
        }
        for ack in acks {
            ack.await.context("baseline: awaiting an ack")?;
        }
        let sequences: Vec<i64> = rows.iter().map(|row| row.0).collect();
        sqlx::query(AssertSqlSafe(delete.clone()))
            .bind(&sequences)
            .execute(&mut *tx)
            .await
            .context("baseline: deleting a batch")?;
        tx.commit().await.context("baseline: COMMIT")?;
        sent += rows.len() as u64;
    }
}

/// A message the poller published, as its consumer reads it back.
pub(crate) fn decode(message: &async_nats::Message) -> Decoded {
    let headers = message
        .headers
        .as_ref()
        .ok_or_else(|| "a baseline message without headers".to_owned())?;
    let header = |name: &str| {
        headers
            .get(name)
            .map(|value| value.as_str())
            .ok_or_else(|| format!("the header {name} is missing"))
    };
    let id = header(async_nats::header::NATS_MESSAGE_ID.as_ref())?;
    let version = header(VERSION_HEADER)?;
    Ok(ReceivedMessage {
        id: id.parse().map_err(|err| format!("{id:?}: {err}"))?,
        // The subject is `<stream>.<aggregate type>`.
        aggregate_type: message
            .subject
            .rsplit_once('.')
            .map_or("", |(_, last)| last)
            .to_owned(),
        aggregate_id: header(AGGREGATE_ID_HEADER)?.to_owned(),
        version: version
            .parse()
            .map_err(|err| format!("version {version:?}: {err}"))?,
        event_type: EVENT_TYPE.to_owned(),
        partition_key: String::new(),
        payload: message.payload.clone(),
        headers: Default::default(),
        time: None,
    })
}

/// The line that puts the two rates side by side.
pub(crate) fn print_ratio(ferry: f64, baseline: Drained) {
    println!(
        "ratio: ferry {ferry:.0} msg/s / naive poller {:.0} msg/s = {:.2}x (same backlog, same \
         machine, one run; a shared machine makes single runs noisy)",
        baseline.rate,
        ferry / baseline.rate.max(1e-9)
    );
}
