//! The operator's commands: `blocked`, `unblock`, `skip`, `parked`, `requeue-parked` and
//! `cleanup`, each one call to the store's [`OutboxAdmin`](ferry::OutboxAdmin) (see
//! `ferry_core::admin` for what each does to the flow), printed as a table or, with
//! `--json`, as the views `ferry serve`'s `/v1/ops` routes answer with.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use uuid::Uuid;

use ferry::{CleanupBounds, ParkedQuery};
use ferry_cli::config::Config;
use ferry_cli::wiring;
use ferry_service::api::ops::{BlockedView, ParkedView};

#[derive(Debug, clap::Args)]
pub(crate) struct ConfigArg {
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub(crate) struct BlockedArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct UnblockArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The blocked partition whose head message to retry now.
    #[arg(long)]
    partition: u32,
}

#[derive(Debug, clap::Args)]
pub(crate) struct SkipArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The unpublished message to park (its id, as `ferry blocked` shows it).
    #[arg(long)]
    message: Uuid,
    /// Why, recorded with the parked message.
    #[arg(long)]
    reason: String,
    /// Who, recorded with the parked message. Defaults to `$USER@<hostname>`.
    #[arg(long)]
    by: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ParkedArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    aggregate: OptionalAggregate,
    /// Messages after this sequence (the previous page's last).
    #[arg(long)]
    after: Option<i64>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct OptionalAggregate {
    /// Only this aggregate's messages (with --aggregate-id).
    #[arg(long, requires = "aggregate_id")]
    aggregate_type: Option<String>,
    #[arg(long, requires = "aggregate_type")]
    aggregate_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RequeueArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The aggregate whose parked messages go back, e.g. `order`.
    #[arg(long)]
    aggregate_type: String,
    /// e.g. `42`.
    #[arg(long)]
    aggregate_id: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CleanupArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Delete published messages kept for replay that were published longer ago than this
    /// (e.g. `7d`, `12h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    published_older_than: Option<Duration>,
    /// Delete inbox records of messages processed longer ago than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    inbox_older_than: Option<Duration>,
    /// Delete parked messages parked longer ago than this (an aggregate they held goes on
    /// without them).
    #[arg(long, value_parser = humantime::parse_duration)]
    parked_older_than: Option<Duration>,
}

async fn admin(config: &ConfigArg) -> anyhow::Result<std::sync::Arc<dyn ferry::OutboxAdmin>> {
    let config = Config::load(&config.config)?;
    wiring::Store::open(&config).await?.admin()
}

pub(crate) async fn blocked(args: BlockedArgs) -> anyhow::Result<()> {
    let blocked = admin(&args.config).await?.blocked().await?;
    let views: Vec<BlockedView> = blocked.iter().map(BlockedView::from).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no partition is blocked");
        return Ok(());
    }
    for view in &views {
        println!(
            "partition {} blocked since {}",
            view.partition,
            view.since.map_or_else(|| "?".into(), |t| t.to_rfc3339())
        );
        match &view.head {
            Some(head) => println!(
                "  head: message {} ({}/{} version {}, sequence {})",
                head.id, head.aggregate_type, head.aggregate_id, head.version, head.sequence
            ),
            None => println!("  head: none (published or parked since)"),
        }
        println!("  reason: {}", view.reason);
    }
    println!(
        "retry now: ferry unblock --partition P; move the head aside: ferry skip --message ID --reason TEXT"
    );
    Ok(())
}

pub(crate) async fn unblock(args: UnblockArgs) -> anyhow::Result<()> {
    if admin(&args.config)
        .await?
        .request_retry(args.partition)
        .await?
    {
        println!(
            "partition {}: retry requested; its relay retries the head message within a poll interval",
            args.partition
        );
        Ok(())
    } else {
        bail!(
            "partition {} is not blocked (see `ferry blocked`)",
            args.partition
        )
    }
}

pub(crate) async fn skip(args: SkipArgs) -> anyhow::Result<()> {
    if args.reason.trim().is_empty() {
        bail!("--reason must say why the message is skipped");
    }
    let by = args.by.unwrap_or_else(operator);
    let parked = admin(&args.config)
        .await?
        .skip(args.message, &by, &args.reason)
        .await?
        .with_context(|| {
            format!(
                "no unpublished message {} (already published, parked, or not in this outbox)",
                args.message
            )
        })?;
    let message = &parked.message;
    println!(
        "parked message {} ({}/{} version {}) by {by}; partition {} goes on",
        message.id,
        message.aggregate_type,
        message.aggregate_id,
        message.version,
        message.partition
    );
    println!(
        "put it back: ferry requeue-parked --aggregate-type {} --aggregate-id {}",
        message.aggregate_type, message.aggregate_id
    );
    Ok(())
}

pub(crate) async fn parked(args: ParkedArgs) -> anyhow::Result<()> {
    let query = ParkedQuery {
        aggregate: args
            .aggregate
            .aggregate_type
            .zip(args.aggregate.aggregate_id),
        after_sequence: args.after,
        limit: args.limit,
    };
    let parked = admin(&args.config).await?.parked(&query).await?;
    let views: Vec<ParkedView> = parked.iter().map(ParkedView::from).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:>10}  {:<36}  {:<24} {:>7}  {:<20}  {:<5}  reason",
        "sequence", "id", "aggregate", "version", "parked by", "holds"
    );
    for view in &views {
        let m = &view.message;
        println!(
            "{:>10}  {:<36}  {:<24} {:>7}  {:<20}  {:<5}  {}",
            m.sequence,
            m.id,
            format!("{}/{}", m.aggregate_type, m.aggregate_id),
            m.version,
            view.parked_by,
            view.holds_aggregate,
            view.reason
        );
    }
    println!("{} parked message(s)", views.len());
    Ok(())
}

pub(crate) async fn requeue_parked(args: RequeueArgs) -> anyhow::Result<()> {
    let requeued = admin(&args.config)
        .await?
        .requeue_parked(&args.aggregate_type, &args.aggregate_id)
        .await?;
    if requeued == 0 {
        bail!(
            "no parked message of {}/{} (see `ferry parked`)",
            args.aggregate_type,
            args.aggregate_id
        );
    }
    println!(
        "{requeued} message(s) of {}/{} back in the outbox, ahead of the aggregate's later ones",
        args.aggregate_type, args.aggregate_id
    );
    Ok(())
}

pub(crate) async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let bounds = CleanupBounds {
        published_older_than: args.published_older_than,
        inbox_older_than: args.inbox_older_than,
        parked_older_than: args.parked_older_than,
    };
    if bounds == CleanupBounds::default() {
        bail!(
            "say what to clean up: --published-older-than, --inbox-older-than and/or --parked-older-than (e.g. 7d)"
        );
    }
    let cleaned = admin(&args.config).await?.cleanup(&bounds).await?;
    println!(
        "deleted {} published message(s), {} inbox record(s), {} parked message(s)",
        cleaned.published, cleaned.inbox, cleaned.parked
    );
    Ok(())
}

/// `$USER@<hostname>`, recorded as who skipped a message.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}
