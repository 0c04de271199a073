//! One bench run: its own outbox and sink output, the producers, the relays and the
//! consumer, in the mode asked for; then the figures and the clean-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio_util::sync::CancellationToken;

use ferry::{Relay, RelayStats};
use ferry_cli::config::{Config, SinkConfig, StoreConfig};
use ferry_cli::wiring;

use crate::ack_clock::AckClock;
use crate::args::{BenchArgs, Mode};
use crate::baseline;
use crate::check::{Checker, Latencies};
use crate::consume::{Consumed, Consumer};
use crate::cpu::CpuSample;
use crate::isolate;
use crate::produce::{self, Production};
use crate::report::{print_check, print_drain, print_live, print_memory, print_relay_counters};
use crate::running::{RelayTask, Running, Until};
use crate::target::Target;

/// Runs the bench as `args` say, and removes what it made unless `--keep`.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.relay_alone && args.mode == Mode::Live {
        bail!(
            "--relay-alone measures a drain: use it with --mode drain (live mode's consumer \
             must run while the producers commit)"
        );
    }
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
    if args.baseline {
        baseline::check_supported(&args, &config)?;
    }
    if args.relay_alone && matches!(config.sink, SinkConfig::Mqtt(_)) {
        bail!(
            "--relay-alone cannot check an MQTT drain: the broker keeps nothing for a \
             subscriber that connects after the messages were published, so the bench's \
             consumer must run during the drain (drop --relay-alone)"
        );
    }
    let tag = format!("{:08x}", rand::random::<u32>());
    isolate::isolate(&mut config, &tag)?;
    let target = Target::create(&mut config).await?;

    let interrupt = ferry_cli::process::shutdown_on_signal()?;
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    let outcome = tokio::select! {
        outcome = execute(&args, &config, &target, &stop, &mut relays) => outcome,
        () = interrupt.cancelled() => Err(anyhow!("interrupted")),
    };
    stop.cancel();
    let shutdown = Duration::from_secs(config.relay.shutdown_timeout_secs + 5);
    stop_relays(relays, shutdown).await;
    target.clean_up(args.keep, outcome.is_ok()).await?;
    let Measured {
        mut problems,
        drained,
    } = outcome?;
    if args.baseline {
        let baseline = tokio::select! {
            baseline = baseline::run(&args, &tag) => baseline?,
            () = interrupt.cancelled() => bail!("interrupted"),
        };
        problems += baseline.problems;
        match drained {
            Some(ferry) => baseline::print_ratio(ferry, baseline),
            None => println!("ratio: not measured, ferry's drain stalled"),
        }
    }
    if problems > 0 {
        bail!("the consistency check found {problems} problem(s): see the check lines");
    }
    Ok(())
}

/// What a run measured that the caller needs.
#[derive(Debug)]
struct Measured {
    /// Consistency problems the check found.
    problems: u64,
    /// Drain mode with the consumer held back: the relays' drain rate.
    drained: Option<f64>,
}

/// Runs the bench; returns the consistency problems found and, with `--baseline`, the
/// relays' drain rate.
async fn execute(
    args: &BenchArgs,
    config: &Config,
    target: &Target,
    stop: &CancellationToken,
    relays: &mut Vec<RelayTask>,
) -> anyhow::Result<Measured> {
    let live = args.mode == Mode::Live;
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
    let latency = if live {
        Some(Arc::new(Latencies::new()?))
    } else {
        None
    };
    let production = Arc::new(Production::open(args, config, latency.clone()).await?);
    let plan = production.plan;
    println!(
        "workload: {} messages, {} aggregates, {} producers, {} per transaction, {}-byte payloads, {} relay(s), batch_size {}{}",
        args.messages,
        args.aggregates,
        args.producers,
        production.per_tx,
        args.payload_bytes,
        args.relays,
        config.relay.batch_size,
        if live {
            format!(", target {} msg/s", args.rate)
        } else {
            String::new()
        }
    );

    #[cfg(feature = "kafka")]
    if let crate::target::SinkTarget::Kafka {
        config: kafka_config,
        raw_topic,
        ..
    } = &target.sink
    {
        let load = crate::kafka::RawLoad {
            topic: raw_topic,
            messages: args.messages,
            aggregates: args.aggregates,
            payload: production.payload.as_bytes(),
            batch: config.relay.batch_size,
            producers: partitions,
        };
        crate::kafka::print_raw_ceiling(kafka_config, &load).await?;
    }
    let (ready, stats) = open_relays(config, args.relays, latency.as_ref()).await?;
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

    let mut drained = None;
    let (relay_results, report) = if live {
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
        let outcome = run.wait(args.messages, Until::Consumed, relays).await?;
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
        produce::produce_all(&production, stop).await?;
        let backlog: u64 = target
            .store
            .outbox()
            .status()
            .await?
            .iter()
            .map(|p| p.backlog)
            .sum();
        println!("outbox backlog before the relay starts: {backlog}");
        // With --relay-alone (and --baseline, whose poller runs alone too) the consumer
        // starts only once the outbox is empty: the rate is then the drain alone.
        let until = if args.baseline || args.relay_alone {
            Until::Drained
        } else {
            run.consumer = Some(tokio::spawn(
                open_consumer().await?.run(finish.clone(), stop.clone()),
            ));
            Until::Consumed
        };
        let cpu_at_start = CpuSample::take();
        let relay_started = Instant::now();
        relays.extend(
            ready
                .into_iter()
                .map(|r| tokio::spawn(r.run(relay_stop.clone()))),
        );
        let outcome = run.wait(args.messages, until, relays).await?;
        let mut cpu_report = Vec::new();
        if until == Until::Drained {
            // Read before the consumer starts, so that the figures are the drain's alone.
            if outcome.marked_all.is_some() {
                cpu_report = match (cpu_at_start, CpuSample::take()) {
                    (Some(start), Some(end)) => end.report_since(&start, args.messages),
                    _ => vec!["cpu during the drain: not measured (no Linux /proc)".to_owned()],
                };
            }
            run.consumer = Some(tokio::spawn(
                open_consumer().await?.run(finish.clone(), stop.clone()),
            ));
        }
        let finished = run.finish(&relay_stop, relays, &finish).await?;
        let rate = print_drain(args.messages, relay_started, &run, outcome, until);
        for line in &cpu_report {
            println!("{line}");
        }
        drained = rate.filter(|_| until == Until::Drained);
        finished
    };
    print_relay_counters(&run.stats);
    for (index, result) in relay_results.into_iter().enumerate() {
        if let Err(err) = result {
            println!(
                "relay {index} stopped with an error: {}",
                ferry::ErrorChain(err.as_ref())
            );
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
    Ok(Measured {
        problems: report.checker.problems(),
        drained,
    })
}

/// Opens a store and a sink per relay (their own pools and connections, as separate
/// processes would have); opening the first sink creates the bench stream. With
/// `latencies` (live mode), the sinks record when each message was acked.
async fn open_relays(
    config: &Config,
    count: u32,
    latencies: Option<&Arc<Latencies>>,
) -> anyhow::Result<(Vec<Relay>, Vec<Arc<RelayStats>>)> {
    let mut relays = Vec::new();
    let mut stats = Vec::new();
    for index in 0..count {
        let store = wiring::Store::open(config).await?;
        let mut sink = wiring::open_sink(&config.sink).await?;
        if let Some(latencies) = latencies {
            sink = Arc::new(AckClock {
                sink,
                latencies: Arc::clone(latencies),
            });
        }
        let mut relay_config = config.relay_config();
        relay_config.relay_id = format!("{}-bench{index}", relay_config.relay_id);
        let mut relay = Relay::new(store.outbox(), store.leases(), sink, relay_config);
        if let Some(capture) = wiring::log_capture(config, &store)? {
            relay = relay.with_log_capture(capture);
        }
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
