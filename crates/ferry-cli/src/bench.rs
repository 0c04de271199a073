//! `ferry bench`: produce through the real producer API, relay with in-process
//! [`Relay`]s, consume with an ordinary consumer, and print throughput, latency, memory
//! and a consistency check, on tables, a stream or a file of the bench's own.
//!
//! - **drain**: all messages are committed first, with no relay running; then the relays
//!   start and the clock runs until the consumer has received every message.
//! - **live**: relays and consumer run first; producers commit at a paced rate and each
//!   message's commit-to-consume latency goes into a histogram.

mod check;
mod consume;
#[cfg(feature = "kafka")]
mod kafka;
mod mqtt;
mod plan;
mod produce;
mod raw;
mod target;
mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry::{Relay, RelayError, RelayStats};

use crate::config::{Config, StoreConfig};
use crate::wiring;

use check::{Checker, Latency};
use consume::{Consumed, Consumer, ConsumerReport};
use plan::Plan;
use produce::{ProducerStore, Production};
use target::Target;

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The ferry config whose store and sink (nats or file) are measured. The bench makes
    /// its own tables (`bench_<random>_`), stream or file, and removes them at the end.
    #[arg(long, short)]
    config: PathBuf,
    /// Messages to produce in all.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Aggregates the messages are spread over (each gets versions 1, 2, 3, …).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    aggregates: u32,
    /// Concurrent producer tasks, each enqueueing in transactions of its own.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    producers: u32,
    /// Messages per producer transaction [default: 100 in drain mode, 1 in live mode].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    per_tx: Option<u32>,
    /// Size of each payload, a JSON object, in bytes (at least 8).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(8..))]
    payload_bytes: u64,
    /// drain: produce everything, then time the relays emptying the outbox.
    /// live: produce at --rate while relaying, and measure commit-to-consume latency.
    #[arg(long, value_enum, default_value_t = Mode::Drain)]
    mode: Mode,
    /// Live mode: messages per second over all producers; the run lasts about
    /// --messages / --rate seconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Relay instances in this process, sharing the partitions through leases.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    relays: u32,
    /// Keep the bench's tables and stream or file afterwards (for inspection).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Drain,
    Live,
}

/// A run that makes no progress for this long is stopped, and what is missing reported.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the bench looks at its counters while waiting.
const TICK: Duration = Duration::from_millis(20);

type RelayTask = JoinHandle<Result<(), RelayError>>;

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if args.producers > args.aggregates {
        bail!(
            "--producers ({}) must not exceed --aggregates ({}): each producer writes \
             aggregates of its own, so that producers never queue on each other's version locks",
            args.producers,
            args.aggregates
        );
    }
    let max_payload = config.outbox.max_payload_bytes;
    if args.payload_bytes > max_payload as u64 {
        bail!(
            "--payload-bytes {} exceeds outbox.max_payload_bytes = {max_payload} in {}",
            args.payload_bytes,
            args.config.display()
        );
    }
    let tag = format!("{:08x}", rand::random::<u32>());
    target::isolate(&mut config, &tag)?;
    let target = Target::create(&mut config).await?;

    let interrupt = crate::shutdown_on_signal()?;
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    let outcome = tokio::select! {
        outcome = execute(&args, &config, &target, &stop, &mut relays) => outcome,
        () = interrupt.cancelled() => Err(anyhow!("interrupted")),
    };
    stop.cancel();
    let shutdown = Duration::from_secs(config.relay.shutdown_timeout_secs + 5);
    stop_relays(relays, shutdown).await;
    if args.keep {
        println!("kept: {}", target.describe());
    } else {
        match target.remove().await {
            Ok(removed) => println!("removed: {removed}"),
            Err(err) if outcome.is_ok() => return Err(err),
            Err(err) => eprintln!("warning: clean-up failed: {err:#}"),
        }
    }
    let problems = outcome?;
    if problems > 0 {
        bail!("the consistency check found {problems} problem(s): see the check line");
    }
    Ok(())
}

/// Runs the bench; returns the number of consistency problems found.
async fn execute(
    args: &BenchArgs,
    config: &Config,
    target: &Target,
    stop: &CancellationToken,
    relays: &mut Vec<RelayTask>,
) -> anyhow::Result<u64> {
    let live = args.mode == Mode::Live;
    let per_tx = args.per_tx.unwrap_or(if live { 1 } else { 100 });
    let plan = Plan {
        messages: args.messages,
        aggregates: args.aggregates,
        producers: args.producers,
    };
    let partitions = config.outbox.partitions;
    let store_kind = match config.store {
        StoreConfig::Postgres { .. } => "postgres",
        StoreConfig::Sqlite { .. } => "sqlite",
        StoreConfig::Mysql { .. } => "mysql",
        StoreConfig::Redis { .. } => "redis",
    };
    println!(
        "bench: {} mode, {store_kind} -> {}",
        if live { "live" } else { "drain" },
        target.describe_sink()
    );
    println!(
        "bench outbox: {} ({partitions} partitions)",
        target.describe_store()
    );
    println!(
        "workload: {} messages, {} aggregates, {} producers, {per_tx} per transaction, {}-byte payloads, {} relay(s), batch_size {}{}",
        args.messages,
        args.aggregates,
        args.producers,
        args.payload_bytes,
        args.relays,
        config.relay.batch_size,
        if live {
            format!(", target {} msg/s", args.rate)
        } else {
            String::new()
        }
    );

    let latency = if live {
        Some(Arc::new(Latency::new()?))
    } else {
        None
    };
    let production = Arc::new(Production {
        store: ProducerStore::open(config, args.producers).await?,
        plan,
        per_tx,
        payload: produce::payload(usize::try_from(args.payload_bytes)?),
        rate: live.then_some(args.rate),
        produced: Default::default(),
        transactions: Default::default(),
        latency: latency.clone(),
    });
    #[cfg(feature = "kafka")]
    if let target::SinkTarget::Kafka {
        config: kafka_config,
        raw_topic,
        ..
    } = &target.sink
    {
        let load = kafka::RawLoad {
            topic: raw_topic,
            messages: args.messages,
            aggregates: args.aggregates,
            payload: production.payload.as_bytes(),
            batch: config.relay.batch_size,
            producers: partitions,
        };
        kafka::print_raw_ceiling(kafka_config, &load).await?;
    }
    let (ready, stats) = open_relays(config, args.relays).await?;
    let consumed = Arc::new(Consumed::new());
    let open_consumer = || {
        Consumer::open(
            &target.sink,
            Checker::new(&plan.versions()),
            latency.clone(),
            Arc::clone(&consumed),
        )
    };
    let mut run = Running {
        production: Arc::clone(&production),
        stats,
        consumed: Arc::clone(&consumed),
        producers: Vec::new(),
        consumer: None,
    };
    let progress_stop = CancellationToken::new();
    let _progress = progress_stop.clone().drop_guard();
    tokio::spawn(run.progress().report(progress_stop));
    let finish = CancellationToken::new();
    let relay_stop = stop.child_token();

    let (relay_results, report) =
        if live {
            let consumer = open_consumer().await?;
            run.consumer = Some(tokio::spawn(consumer.run(finish.clone(), stop.clone())));
            relays.extend(
                ready
                    .into_iter()
                    .map(|r| tokio::spawn(r.run(relay_stop.clone()))),
            );
            run.wait_for_leases(partitions, relays).await?;
            let started = Instant::now();
            run.start_producers(stop);
            let outcome = run.wait(args.messages, relays).await?;
            let finished = run.finish(&relay_stop, relays, &finish).await?;
            print_live(
                args.rate,
                &production,
                started,
                &run,
                latency.as_deref(),
                outcome,
            );
            finished
        } else {
            let started = Instant::now();
            run.start_producers(stop);
            futures::future::try_join_all(run.producers.drain(..).map(|producer| async move {
                producer.await.context("a producer task panicked")?
            }))
            .await?;
            let elapsed = started.elapsed();
            let produced = production.produced.load(Ordering::Relaxed);
            println!(
                "produce: {produced} messages in {} transactions, {:.2} s, {:.0} msg/s",
                production.transactions.load(Ordering::Relaxed),
                elapsed.as_secs_f64(),
                rate(produced, elapsed)
            );
            let backlog: u64 = target
                .store
                .outbox()
                .status()
                .await?
                .iter()
                .map(|p| p.backlog)
                .sum();
            println!("outbox backlog before the relay starts: {backlog}");
            let consumer = open_consumer().await?;
            run.consumer = Some(tokio::spawn(consumer.run(finish.clone(), stop.clone())));
            let relay_started = Instant::now();
            relays.extend(
                ready
                    .into_iter()
                    .map(|r| tokio::spawn(r.run(relay_stop.clone()))),
            );
            let outcome = run.wait(args.messages, relays).await?;
            let finished = run.finish(&relay_stop, relays, &finish).await?;
            print_drain(args.messages, relay_started, &run, outcome);
            finished
        };
    print_relay_counters(&run.stats);
    for (index, result) in relay_results.into_iter().enumerate() {
        if let Err(err) = result {
            println!("relay {index} stopped with an error: {err:#}");
        }
    }
    print_check(&report);
    print_memory();
    for line in target
        .raw_ceiling(args.messages, &production.payload, partitions)
        .await?
    {
        println!("{line}");
    }
    Ok(report.checker.problems())
}

/// Opens a store and a sink per relay (their own pools and connections, as separate
/// processes would have); opening the first sink creates the bench stream.
async fn open_relays(
    config: &Config,
    count: u32,
) -> anyhow::Result<(Vec<Relay>, Vec<Arc<RelayStats>>)> {
    let mut relays = Vec::new();
    let mut stats = Vec::new();
    for index in 0..count {
        let store = wiring::Store::open(config).await?;
        let sink = wiring::open_sink(&config.sink).await?;
        let mut relay_config = config.relay_config();
        relay_config.relay_id = format!("{}-bench{index}", relay_config.relay_id);
        let relay = Relay::new(store.outbox(), store.leases(), sink, relay_config);
        stats.push(relay.stats());
        relays.push(relay);
    }
    Ok((relays, stats))
}

/// Signals relays to stop (the token is already cancelled) and waits for each, up to
/// `timeout` in all; what has not stopped by then is aborted.
async fn stop_relays(relays: Vec<RelayTask>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    for mut relay in relays {
        if tokio::time::timeout_at(deadline, &mut relay).await.is_err() {
            relay.abort();
        }
    }
}

/// How the wait for the last message ended.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// When the producers' counter reached the total (to within [`TICK`]).
    produced_all: Option<Instant>,
    /// When the relays' published counters reached the total (to within [`TICK`]).
    published_all: Option<Instant>,
    /// When the consumer received the last message; `None` if the run stalled.
    consumed_all: Option<Instant>,
}

/// The tasks and counters of a run.
struct Running {
    production: Arc<Production>,
    stats: Vec<Arc<RelayStats>>,
    consumed: Arc<Consumed>,
    producers: Vec<JoinHandle<anyhow::Result<()>>>,
    consumer: Option<JoinHandle<anyhow::Result<ConsumerReport>>>,
}

impl Running {
    fn published(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.published.load(Ordering::Relaxed))
            .sum()
    }

    fn start_producers(&mut self, stop: &CancellationToken) {
        let started = tokio::time::Instant::now();
        for index in 0..self.production.plan.producers {
            let production = Arc::clone(&self.production);
            self.producers.push(tokio::spawn(production.run_producer(
                index,
                started,
                stop.clone(),
            )));
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            production: Arc::clone(&self.production),
            stats: self.stats.clone(),
            consumed: Arc::clone(&self.consumed),
        }
    }

    /// Waits until the relays own every partition, so that live latencies do not include
    /// the relays' start-up.
    async fn wait_for_leases(
        &mut self,
        partitions: u32,
        relays: &mut [RelayTask],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            let owned: u64 = self
                .stats
                .iter()
                .map(|s| s.owned_partitions.load(Ordering::Relaxed))
                .sum();
            if owned >= u64::from(partitions) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the relays took {owned} of {partitions} partitions in {} s",
                    STALL_TIMEOUT.as_secs()
                );
            }
            self.check_tasks(relays).await?;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Waits until the consumer has received `total` messages, or nothing moved for
    /// [`STALL_TIMEOUT`]; fails if a task fails meanwhile.
    async fn wait(&mut self, total: u64, relays: &mut [RelayTask]) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome {
            produced_all: None,
            published_all: None,
            consumed_all: None,
        };
        let mut last_change = Instant::now();
        let mut last_seen = (0, 0, 0);
        loop {
            let produced = self.production.produced.load(Ordering::Relaxed);
            let published = self.published();
            let consumed = self.consumed.distinct();
            if outcome.produced_all.is_none() && produced >= total {
                outcome.produced_all = Some(Instant::now());
            }
            if outcome.published_all.is_none() && published >= total {
                outcome.published_all = Some(Instant::now());
            }
            if consumed >= total {
                outcome.consumed_all = Some(self.consumed.last_at());
                return Ok(outcome);
            }
            if (produced, published, consumed) != last_seen {
                last_seen = (produced, published, consumed);
                last_change = Instant::now();
            } else if last_change.elapsed() > STALL_TIMEOUT {
                eprintln!(
                    "bench: nothing moved for {} s ({consumed} of {total} consumed); stopping",
                    STALL_TIMEOUT.as_secs()
                );
                return Ok(outcome);
            }
            self.check_tasks(relays).await?;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Fails with the error of a producer, relay or consumer task that ended early.
    async fn check_tasks(&mut self, relays: &mut [RelayTask]) -> anyhow::Result<()> {
        if let Some(at) = self.producers.iter().position(JoinHandle::is_finished) {
            let producer = self.producers.swap_remove(at);
            producer.await.context("a producer task panicked")??;
        }
        for (index, relay) in relays.iter_mut().enumerate() {
            if relay.is_finished() {
                let result = relay.await.context("a relay task panicked")?;
                result.with_context(|| format!("relay {index} failed"))?;
                bail!("relay {index} stopped before the run ended");
            }
        }
        if let Some(consumer) = self.consumer.as_mut().filter(|c| c.is_finished()) {
            consumer.await.context("the consumer task panicked")??;
            bail!("the consumer stopped before the run ended");
        }
        Ok(())
    }

    /// Stops the relays (gracefully: in-flight batches are marked, leases released), then
    /// lets the consumer read to the end of what they wrote.
    async fn finish(
        &mut self,
        relay_stop: &CancellationToken,
        relays: &mut Vec<RelayTask>,
        finish: &CancellationToken,
    ) -> anyhow::Result<(Vec<anyhow::Result<()>>, ConsumerReport)> {
        relay_stop.cancel();
        let mut results = Vec::new();
        for relay in relays.drain(..) {
            results.push(match relay.await {
                Ok(result) => result.map_err(anyhow::Error::from),
                Err(err) => Err(anyhow!("the relay task panicked: {err}")),
            });
        }
        finish.cancel();
        let consumer = self
            .consumer
            .take()
            .ok_or_else(|| anyhow!("the consumer was not started"))?;
        let report = consumer.await.context("the consumer task panicked")??;
        Ok((results, report))
    }
}

/// The once-a-second progress line on stderr.
struct Progress {
    production: Arc<Production>,
    stats: Vec<Arc<RelayStats>>,
    consumed: Arc<Consumed>,
}

impl Progress {
    async fn report(self, stop: CancellationToken) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut before = (0, 0, 0);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = (
                self.production.produced.load(Ordering::Relaxed),
                self.stats
                    .iter()
                    .map(|s| s.published.load(Ordering::Relaxed))
                    .sum::<u64>(),
                self.consumed.distinct(),
            );
            eprintln!(
                "bench {:>4}s: produced {} (+{}/s), published {} (+{}/s), consumed {} (+{}/s)",
                started.elapsed().as_secs(),
                now.0,
                now.0 - before.0,
                now.1,
                now.1.saturating_sub(before.1),
                now.2,
                now.2 - before.2,
            );
            before = now;
        }
    }
}

fn rate(messages: u64, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn print_drain(total: u64, relay_started: Instant, run: &Running, outcome: Outcome) {
    if let Some(at) = outcome.published_all {
        let elapsed = at.saturating_duration_since(relay_started);
        println!(
            "relay published (broker-acked) all {total}: {:.2} s, {:.0} msg/s",
            elapsed.as_secs_f64(),
            rate(total, elapsed)
        );
    }
    match outcome.consumed_all {
        Some(at) => {
            let elapsed = at.saturating_duration_since(relay_started);
            println!(
                "relay throughput (relay start -> all {total} consumed): {:.2} s, {:.0} msg/s",
                elapsed.as_secs_f64(),
                rate(total, elapsed)
            );
        }
        None => println!(
            "relay throughput: not measured, the run stalled after {} of {total} messages",
            run.consumed.distinct()
        ),
    }
}

fn print_live(
    target_rate: u32,
    production: &Production,
    started: Instant,
    run: &Running,
    latency: Option<&Latency>,
    outcome: Outcome,
) {
    let produced = production.produced.load(Ordering::Relaxed);
    let produced_in = outcome
        .produced_all
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(started);
    println!(
        "produce: {produced} messages in {} transactions, {:.2} s, {:.1} msg/s (target {target_rate})",
        production.transactions.load(Ordering::Relaxed),
        produced_in.as_secs_f64(),
        rate(produced, produced_in),
    );
    match outcome.consumed_all {
        Some(at) => {
            let elapsed = at.saturating_duration_since(started);
            println!(
                "consume: all {produced} in {:.2} s from the producers' start, {:.1} msg/s",
                elapsed.as_secs_f64(),
                rate(produced, elapsed)
            );
        }
        None => println!(
            "consume: stalled after {} of {produced} messages",
            run.consumed.distinct()
        ),
    }
    let Some(latency) = latency else { return };
    let h = latency.histogram();
    let ms = |micros: u64| micros as f64 / 1000.0;
    println!(
        "latency commit -> consume (n={}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    );
    if latency.early() > 0 {
        println!(
            "latency: {} message(s) arrived before their commit() returned (counted as 0)",
            latency.early()
        );
    }
}

fn print_relay_counters(stats: &[Arc<RelayStats>]) {
    let sum = |field: fn(&RelayStats) -> u64| stats.iter().map(|s| field(s)).sum::<u64>();
    println!(
        "relay counters: published {}, marked {}, publish failures {}, leases lost {}, reconciled {}",
        sum(|s| s.published.load(Ordering::Relaxed)),
        sum(|s| s.marked.load(Ordering::Relaxed)),
        sum(|s| s.publish_failures.load(Ordering::Relaxed)),
        sum(|s| s.leases_lost.load(Ordering::Relaxed)),
        sum(|s| s.reconciled.load(Ordering::Relaxed)),
    );
}

fn print_check(report: &ConsumerReport) {
    let checker = &report.checker;
    let t = checker.tally();
    println!(
        "check: received {}, distinct {}, missing {}, duplicates {}, out of order {}, unexpected {}, undecodable {}",
        t.received,
        t.distinct,
        checker.missing(),
        t.duplicates,
        t.out_of_order,
        t.unexpected,
        t.undecodable
    );
    if let Some(err) = &report.first_error {
        println!("check: first undecodable message: {err}");
    }
}

/// Peak and current resident memory of this process, from `/proc/self/status`.
fn print_memory() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or_else(
                || "unknown".to_owned(),
                |kb| format!("{:.1} MiB", kb as f64 / 1024.0),
            )
    };
    println!(
        "memory: VmHWM {}, VmRSS {} (one process holding the producers, the relay(s) and the consumer)",
        field("VmHWM:"),
        field("VmRSS:")
    );
}
