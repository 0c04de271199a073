//! The bench's command-line flags.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The ferry config whose store and sink (any but stdout) are measured. The bench makes
    /// its own tables (`bench_<random>_`), stream or file, and removes them at the end.
    #[arg(long, short)]
    pub(crate) config: PathBuf,
    /// Messages to produce in all.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) messages: u64,
    /// Aggregates the messages are spread over (each gets versions 1, 2, 3, …).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) aggregates: u32,
    /// Concurrent producer tasks, each enqueueing in transactions of its own.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) producers: u32,
    /// Messages per producer transaction [default: 100 in drain mode, 1 in live mode].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) per_tx: Option<u32>,
    /// Size of each payload, a JSON object, in bytes (at least 8).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(8..))]
    pub(crate) payload_bytes: u64,
    /// drain: produce everything, then time the relays emptying the outbox.
    /// live: produce at --rate while relaying, and measure the latency from commit to the
    /// broker's ack and to the consumer.
    #[arg(long, value_enum, default_value_t = Mode::Drain)]
    pub(crate) mode: Mode,
    /// Live mode: messages per second over all producers; the run lasts about
    /// --messages / --rate seconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rate: u32,
    /// Relay instances in this process, sharing the partitions through leases.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) relays: u32,
    /// Drain mode, PostgreSQL -> NATS: after ferry's drain, drain a backlog of the same
    /// size with a naive poller (SELECT … FOR UPDATE SKIP LOCKED 500 rows, publish with
    /// Nats-Msg-Id, await the acks, DELETE, COMMIT) on tables and a stream of its own, and
    /// print both rates and their ratio. Both drains then run with no consumer; each stream
    /// is read back and checked afterwards.
    #[arg(long)]
    pub(crate) baseline: bool,
    /// Drain mode: start the consumer only once the relays have emptied the outbox, so
    /// that the drain is the relays' alone, and print the CPU each process on the machine
    /// spent per message during it (this process's relays, the database, the broker).
    /// Implied by --baseline. Not for MQTT, whose broker keeps nothing for a subscriber
    /// that connects later.
    #[arg(long)]
    pub(crate) relay_alone: bool,
    /// Keep the bench's tables and stream or file afterwards (for inspection).
    #[arg(long)]
    pub(crate) keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    Drain,
    Live,
}
