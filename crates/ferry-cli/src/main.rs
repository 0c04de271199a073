//! The `ferry` command: a thin layer over the `ferry` library and this crate's config and
//! wiring (`ferry-bench` is a binary of its own, in `crates/ferry-bench`).

mod demo;
mod ops;
mod relay;
mod replay;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use ferry_cli::config::Config;
use ferry_cli::telemetry::{Telemetry, init_logging};
use ferry_cli::wiring;

/// jemalloc instead of glibc's malloc: the relay allocates and frees many small buffers
/// per message (headers, rows, acks) across worker threads, and glibc's consolidation of
/// freed chunks took about a third of the relay's CPU (BENCHMARKS.md section 6). It is
/// built with one arena (`.cargo/config.toml`), which keeps the peak 4-9 MiB lower
/// (section 17), serves librdkafka's malloc too, and keeps thread caches on the runtime's
/// threads only (`ferry_cli::runtime`, section 19).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Transactional outbox relay: no loss, no duplicates in effect, no reordering per key"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "FERRY_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade ferry's tables and functions (idempotent).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the relay until SIGTERM or SIGINT.
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the reliable message service (HTTP API, check-backs, redeliveries) and, unless
    /// `service.run_relay = false`, the relay, until SIGTERM or SIGINT.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show each partition's owner, epoch, backlog, oldest unpublished age and blocked
    /// reason, and in log capture mode how far the capture is behind the log.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table: `{"partitions": [...], "capture": {"lag_bytes",
        /// "oldest_unpublished_age_secs"}}`, `capture` null in poll mode.
        #[arg(long)]
        json: bool,
    },
    /// List the blocked partitions: the message at each one's head and why the sink
    /// rejects it.
    Blocked(ops::BlockedArgs),
    /// Retry a blocked partition's head message now instead of at the next retry_max.
    Unblock(ops::UnblockArgs),
    /// Park an unpublished message (who, when, why recorded) so that its partition goes on.
    Skip(ops::SkipArgs),
    /// List parked messages.
    Parked(ops::ParkedArgs),
    /// Put an aggregate's parked messages back into the outbox, in order, ahead of its
    /// later messages.
    RequeueParked(ops::RequeueArgs),
    /// Delete, in batches, published messages kept for replay, inbox records and parked
    /// messages older than the bounds given.
    Cleanup(ops::CleanupArgs),
    /// Publish retained messages again (disaster recovery): by partition and sequence
    /// range, time range, aggregate, or all; resumable, rate-limited, with progress.
    Replay(replay::ReplayArgs),
    /// Run an order service, the relay and an inbox consumer on embedded SQLite.
    Demo(demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    ferry_cli::runtime::run(async_main())
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; info logs would drown it.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    let telemetry = init_logging(cli.log_json, default_level);
    match run(cli.command, &telemetry).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", ferry::ErrorChain(err.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, telemetry: &Telemetry) -> anyhow::Result<()> {
    match command {
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            let store = wiring::Store::open(&config).await?;
            store.migrate(config.outbox.partitions).await?;
            println!(
                "migrated: {} partitions, {}",
                config.outbox.partitions,
                store.describe(&config)
            );
            if config.service.is_some() {
                store.service()?.migrate().await?;
                println!("migrated: service tables");
            }
            if let Some(capture) = wiring::open_capture(&config, &store)? {
                println!("log capture: {}", capture.setup().await?);
            }
            Ok(())
        }
        Command::Relay { config } => relay::run(&config, telemetry).await,
        Command::Serve { config } => serve::run(&config, telemetry).await,
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let store = wiring::Store::open(&config).await?;
            let mut status = store.outbox().status().await?;
            show_external_owners(&config, &store, &mut status).await;
            let capture = match wiring::open_capture(&config, &store)? {
                Some(capture) => Some(CaptureLagReport::new(&capture.lag().await?, &status)),
                None => None,
            };
            if json {
                let report = StatusReport {
                    partitions: &status,
                    capture,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_status(&status);
                if let Some(capture) = capture {
                    capture.print();
                }
            }
            Ok(())
        }
        Command::Blocked(args) => ops::blocked(args).await,
        Command::Unblock(args) => ops::unblock(args).await,
        Command::Skip(args) => ops::skip(args).await,
        Command::Parked(args) => ops::parked(args).await,
        Command::RequeueParked(args) => ops::requeue_parked(args).await,
        Command::Cleanup(args) => ops::cleanup(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

/// Fills in the owners from a lease backend outside the store, which the store cannot
/// know; the rest of the status stands on its own if that backend is unreachable.
async fn show_external_owners(
    config: &Config,
    store: &wiring::Store,
    status: &mut [ferry::PartitionStatus],
) {
    let owners = match wiring::Leases::open(config, store).await {
        Ok(leases) => leases.owners().await.map_err(anyhow::Error::from),
        Err(err) => Err(err),
    };
    match owners {
        Ok(Some(owners)) => {
            for partition in status.iter_mut() {
                partition.owner = owners.get(&partition.partition).cloned();
            }
        }
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(
                error = %ferry::ErrorChain(err.as_ref()),
                "lease owners unknown: cannot read the lease backend"
            )
        }
    }
}

/// `ferry status --json`.
#[derive(serde::Serialize)]
struct StatusReport<'a> {
    partitions: &'a [ferry::PartitionStatus],
    /// `null` in poll mode.
    capture: Option<CaptureLagReport>,
}

/// The log capture's lag, as `ferry status` prints it and `--json` carries it.
#[derive(serde::Serialize)]
struct CaptureLagReport {
    /// Log bytes the database keeps past the confirmed position; `None` while the slot
    /// (or the binlog origin) is not set up.
    lag_bytes: Option<u64>,
    /// Age of the oldest unpublished message, 0 when none: the confirmed position is not
    /// past it, so the log is at least this far behind.
    oldest_unpublished_age_secs: f64,
}

impl CaptureLagReport {
    fn new(lag: &ferry::CaptureLag, status: &[ferry::PartitionStatus]) -> Self {
        Self {
            lag_bytes: lag.bytes,
            oldest_unpublished_age_secs: status
                .iter()
                .filter_map(|p| p.oldest_unpublished_age_secs)
                .fold(0.0, f64::max),
        }
    }

    fn print(&self) {
        match self.lag_bytes {
            Some(bytes) => println!(
                "log capture: {bytes} bytes of log behind the server's, oldest unpublished {:.1} s",
                self.oldest_unpublished_age_secs
            ),
            None => println!("log capture: not set up (run `ferry migrate`)"),
        }
    }
}

fn print_status(status: &[ferry::PartitionStatus]) {
    println!(
        "{:>9}  {:<28} {:>6} {:>9} {:>12}  blocked",
        "partition", "owner", "epoch", "backlog", "oldest_secs"
    );
    for p in status {
        println!(
            "{:>9}  {:<28} {:>6} {:>9} {:>12}  {}",
            p.partition,
            p.owner.as_deref().unwrap_or("-"),
            p.epoch,
            p.backlog,
            p.oldest_unpublished_age_secs
                .map_or_else(|| "-".into(), |a| format!("{a:.1}")),
            p.blocked_reason.as_deref().unwrap_or("-"),
        );
    }
    let backlog: u64 = status.iter().map(|p| p.backlog).sum();
    let blocked = status.iter().filter(|p| p.blocked_reason.is_some()).count();
    println!("total backlog {backlog}, {blocked} partition(s) blocked");
}

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    /// The arena count is a build setting (`.cargo/config.toml`), easy to lose without
    /// noticing: every sink's peak memory rises by 4-9 MiB without it.
    #[test]
    fn the_allocator_keeps_one_arena() {
        let arenas = tikv_jemalloc_ctl::opt::narenas::read().expect("jemalloc answers");
        assert_eq!(
            arenas, 1,
            "jemalloc was built without JEMALLOC_SYS_WITH_MALLOC_CONF=narenas:1 \
             (.cargo/config.toml), or MALLOC_CONF overrides it"
        );
    }

    fn thread_cache_enabled() -> bool {
        use tikv_jemalloc_ctl::{Access, AsName};
        ferry_cli::runtime::THREAD_CACHE
            .name()
            .read()
            .expect("jemalloc answers")
    }

    /// Threads the runtime did not start (librdkafka's) keep no cache: a 16-partition Kafka
    /// relay's peak is ~6 MiB higher when they do. The runtime's own threads, where the
    /// relay allocates, keep theirs.
    #[test]
    fn only_the_runtimes_threads_keep_a_thread_cache() {
        assert!(
            !std::thread::spawn(thread_cache_enabled).join().unwrap(),
            "a thread the runtime did not start keeps a jemalloc thread cache: \
             JEMALLOC_SYS_WITH_MALLOC_CONF lost tcache:false (.cargo/config.toml), or \
             MALLOC_CONF overrides it"
        );
        let runtime = ferry_cli::runtime::build().expect("the runtime starts");
        assert!(thread_cache_enabled(), "the thread that built the runtime");
        let (worker, blocking) = runtime.block_on(async {
            let worker = tokio::spawn(async { thread_cache_enabled() });
            let blocking = tokio::task::spawn_blocking(thread_cache_enabled);
            (worker.await.unwrap(), blocking.await.unwrap())
        });
        assert!(worker, "a worker thread");
        assert!(blocking, "a blocking-pool thread");
    }
}
