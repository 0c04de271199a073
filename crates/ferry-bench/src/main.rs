//! `ferry-bench`: produce through the real producer API, relay with in-process
//! [`ferry::Relay`]s, consume with an ordinary consumer, and print throughput, latency,
//! memory and a consistency check, on tables, a stream or a file of the bench's own.
//!
//! - **drain**: all messages are committed first, with no relay running; then the relays
//!   start and the clock runs until the consumer has received every message.
//! - **live**: relays and consumer run first; producers commit at a paced rate and each
//!   message's latencies from its commit to the broker's ack (as the relay got it) and to
//!   the consumer go into histograms.
//! - **--baseline** (drain, PostgreSQL → NATS): the consumer waits until the relays have
//!   emptied the outbox; then a naive poller drains a backlog of the same size
//!   ([`baseline`]) and the report prints ferry's drain rate over the poller's.

mod ack_clock;
mod args;
mod baseline;
mod check;
mod cleanup;
mod consume;
mod cpu;
mod decoded;
mod isolate;
#[cfg(feature = "kafka")]
mod kafka;
mod mqtt;
mod plan;
mod produce;
mod raw;
mod reader;
mod report;
mod run;
mod running;
mod target;
mod webhook;

use clap::Parser;

/// The `ferry` binary's allocator, so that the bench measures the relay as `ferry relay`
/// runs it (BENCHMARKS.md section 6: glibc's malloc cost the relay a third of its CPU).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "Produce, relay and consume messages on tables and a stream (or file) of the bench's \
             own, removed afterwards; print throughput, latency, memory and a consistency check"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "FERRY_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    args: args::BenchArgs,
}

fn main() -> std::process::ExitCode {
    ferry_cli::runtime::run(async_main())
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The bench prints its own story; info logs would drown it.
    ferry_cli::telemetry::init_logging(cli.log_json, "warn");
    match run::run(cli.args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", ferry::ErrorChain(err.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
