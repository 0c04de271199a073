//! `ferry replay`: publishes retained messages again (see `ferry_core::relay::replay` for
//! order and dedup), with a progress bar, a rate limit, a clean stop on Ctrl-C and a
//! progress file to resume from.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};

use ferry::{Replay, ReplayCheckpoint, ReplayEnd, ReplayOptions, RetainedFilter, RetainedSummary};
use ferry_cli::config::{Config, SinkConfig};
use ferry_cli::process::shutdown_on_signal;
use ferry_cli::wiring;

#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
    /// The config whose store holds the retained messages (and whose sink receives them
    /// unless --sink-config is given).
    #[arg(long, short)]
    config: PathBuf,
    /// A second config file whose `[sink]` section is the replay's target instead (e.g. a
    /// fresh stream or topic); its other sections are ignored.
    #[arg(long)]
    sink_config: Option<PathBuf>,
    /// Names this replay: in its messages' broker dedup ids, in its Kafka transactional
    /// ids and in its progress file. A new name replays again what an earlier one sent.
    #[arg(long)]
    name: String,
    /// Only this partition's messages.
    #[arg(long)]
    partition: Option<u32>,
    /// Only messages with this sequence or a higher one.
    #[arg(long)]
    from_sequence: Option<i64>,
    /// Only messages with this sequence or a lower one.
    #[arg(long)]
    to_sequence: Option<i64>,
    /// Only messages created at or after: an RFC 3339 time (2026-12-04T08:00:00Z) or a
    /// duration ago (6h, 2days).
    #[arg(long, value_parser = ferry::parse_time_or_ago)]
    since: Option<DateTime<Utc>>,
    /// Only messages created at or before (same forms as --since).
    #[arg(long, value_parser = ferry::parse_time_or_ago)]
    until: Option<DateTime<Utc>>,
    /// Only this aggregate's messages (with --aggregate-id).
    #[arg(long, requires = "aggregate_id")]
    aggregate_type: Option<String>,
    #[arg(long, requires = "aggregate_type")]
    aggregate_id: Option<String>,
    /// Every retained message (required when no other selection is given).
    #[arg(long)]
    all: bool,
    /// Print how many messages the selection holds and their range; publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Highest rate, in messages per second.
    #[arg(long)]
    rate: Option<NonZeroU32>,
    /// Messages read per page (the resume granularity).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Where progress is kept. Defaults to `ferry-replay-<name>.json` in the current
    /// directory.
    #[arg(long)]
    progress_file: Option<PathBuf>,
    /// Start from the beginning even if the progress file says this replay got further.
    #[arg(long)]
    restart: bool,
}

/// What the progress file holds: the replay it belongs to and how far it got.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Progress {
    name: String,
    filter: RetainedFilter,
    checkpoint: Option<ReplayCheckpoint>,
    finished: bool,
}

pub(crate) async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let filter = selection(&args)?;
    let config = Config::load(&args.config)?;
    let store = wiring::Store::open(&config).await?;
    let admin = store.admin()?;
    let summary = admin
        .retained_summary(&filter)
        .await
        .context("counting the retained messages to replay")?;
    if args.dry_run {
        print_summary(&summary);
        if config.outbox.retention_secs == 0 {
            println!("note: outbox.retention_secs = 0 keeps no published messages to replay");
        }
        return Ok(());
    }
    let progress_path = args
        .progress_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("ferry-replay-{}.json", args.name)));
    let resume = resume_point(&progress_path, &args, &filter)?;
    let sink_config = match &args.sink_config {
        Some(path) => SinkConfig::load(path)?,
        None => config.sink,
    };
    let sink = wiring::open_sink(&sink_config.for_replay(&args.name)).await?;
    let mut options = ReplayOptions::new(args.name.clone(), filter.clone());
    options.page_size = args.batch;
    options.rate = args.rate;
    let replay = Replay::new(admin, sink.clone(), options)?;

    let already = resume.map_or(0, |c| c.sent);
    if let Some(checkpoint) = resume {
        println!(
            "resuming replay {:?} after sequence {} ({} already sent)",
            args.name, checkpoint.last_sequence, checkpoint.sent
        );
    }
    let bar = progress_bar(summary.count.max(already), already);
    let ticker = tick(bar.clone(), replay.progress());
    let stop = shutdown_on_signal()?;
    let mut record = |checkpoint: ReplayCheckpoint| {
        write_progress(&progress_path, &args.name, &filter, Some(checkpoint), false)
            .map_err(Into::into)
    };
    let end = replay.run(resume, &mut record, &stop).await;
    ticker.abort();
    bar.set_position(replay.progress().sent().max(already));
    sink.shutdown().await;
    match end? {
        ReplayEnd::Finished { sent } => {
            bar.finish();
            write_progress(
                &progress_path,
                &args.name,
                &filter,
                replay
                    .progress()
                    .last_sequence()
                    .map(|last_sequence| ReplayCheckpoint {
                        last_sequence,
                        sent,
                    }),
                true,
            )?;
            println!("replay {:?} finished: {sent} messages sent", args.name);
        }
        ReplayEnd::Stopped { checkpoint } => {
            bar.abandon();
            match checkpoint {
                Some(c) => println!(
                    "replay {:?} stopped after sequence {} ({} sent); run the same command again to resume",
                    args.name, c.last_sequence, c.sent
                ),
                None => println!("replay {:?} stopped before its first page", args.name),
            }
        }
    }
    Ok(())
}

/// The filter the flags select; refuses an empty selection without `--all`, and ranges
/// that are empty by construction.
fn selection(args: &ReplayArgs) -> anyhow::Result<RetainedFilter> {
    let filter = RetainedFilter {
        partition: args.partition,
        from_sequence: args.from_sequence,
        to_sequence: args.to_sequence,
        since: args.since,
        until: args.until,
        aggregate: args.aggregate_type.clone().zip(args.aggregate_id.clone()),
    };
    filter.check(args.all).map_err(|reason| {
        anyhow::anyhow!(
            "{reason} (--partition, --from-sequence/--to-sequence, --since/--until, \
             --aggregate-type with --aggregate-id, or --all)"
        )
    })?;
    Ok(filter)
}

/// Where to resume: the checkpoint of an unfinished run of this replay with this selection.
fn resume_point(
    path: &Path,
    args: &ReplayArgs,
    filter: &RetainedFilter,
) -> anyhow::Result<Option<ReplayCheckpoint>> {
    if args.restart || !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the progress file {}", path.display()))?;
    let progress: Progress = serde_json::from_str(&text).with_context(|| {
        format!(
            "progress file {} is not a replay's progress; pass another --progress-file or remove it",
            path.display()
        )
    })?;
    if progress.name != args.name || &progress.filter != filter {
        bail!(
            "progress file {} belongs to replay {:?} with selection {:?}; run that selection to \
             resume it, or pass --restart to start this one over, or another --progress-file",
            path.display(),
            progress.name,
            progress.filter
        );
    }
    if progress.finished {
        bail!(
            "replay {:?} already finished (progress file {}); to send the messages again, \
             choose a new --name (a broker that dedups would drop a second run under this one)",
            args.name,
            path.display()
        );
    }
    Ok(progress.checkpoint)
}

/// Replaces the progress file atomically (a crash leaves the old or the new one).
fn write_progress(
    path: &Path,
    name: &str,
    filter: &RetainedFilter,
    checkpoint: Option<ReplayCheckpoint>,
    finished: bool,
) -> std::io::Result<()> {
    let progress = Progress {
        name: name.to_owned(),
        filter: filter.clone(),
        checkpoint,
        finished,
    };
    let text = serde_json::to_vec_pretty(&progress).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

fn print_summary(summary: &RetainedSummary) {
    println!("{} retained messages selected", summary.count);
    if let (Some(first), Some(last)) = (summary.first_sequence, summary.last_sequence) {
        println!("sequences {first}..={last}");
    }
    if let (Some(first), Some(last)) = (summary.first_created_at, summary.last_created_at) {
        println!("created {} ..= {}", first.to_rfc3339(), last.to_rfc3339());
    }
}

fn progress_bar(total: u64, position: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} messages, {per_sec}, {elapsed} elapsed, ETA {eta}",
        )
        .expect("the template is valid"),
    );
    bar.set_position(position);
    bar
}

/// Moves the bar from the replay's live figures four times a second.
fn tick(
    bar: ProgressBar,
    progress: std::sync::Arc<ferry::ReplayProgress>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            bar.set_position(progress.sent());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}
