//! The figures a run prints: throughput, latency, the relays' counters, the consistency
//! check and the process's memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry::RelayStats;

use crate::check::{Latencies, Latency};
use crate::consume::ConsumerReport;
use crate::produce::Production;
use crate::running::{Outcome, Running, Until};

pub(crate) fn rate(messages: u64, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The drain's rates; returns the relays' drain rate (relay start until every message was
/// marked, i.e. the outbox was empty) when they got there.
pub(crate) fn print_drain(
    total: u64,
    relay_started: Instant,
    run: &Running,
    outcome: Outcome,
    until: Until,
) -> Option<f64> {
    let since_start = |at: Instant| at.saturating_duration_since(relay_started);
    if let Some(at) = outcome.published_all {
        let elapsed = since_start(at);
        println!(
            "relay published (broker-acked) all {total}: {:.2} s, {:.0} msg/s",
            elapsed.as_secs_f64(),
            rate(total, elapsed)
        );
    }
    let drained = outcome.marked_all.map(|at| rate(total, since_start(at)));
    match until {
        Until::Drained => match outcome.marked_all {
            Some(at) => println!(
                "relay drained (relay start -> all {total} marked, outbox empty; no consumer \
                 running): {:.2} s, {:.0} msg/s",
                since_start(at).as_secs_f64(),
                rate(total, since_start(at))
            ),
            None => println!(
                "relay drain: not measured, the run stalled after {} of {total} messages",
                run.marked()
            ),
        },
        Until::Consumed => match outcome.consumed_all {
            Some(at) => {
                let elapsed = since_start(at);
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
        },
    }
    drained
}

pub(crate) fn print_live(
    target_rate: u32,
    production: &Production,
    started: Instant,
    run: &Running,
    latency: Option<&Latencies>,
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
    print_latency(
        "commit -> broker ack (the relay's)",
        "were acked",
        &latency.to_ack,
    );
    print_latency("commit -> consume", "arrived", &latency.to_consume);
}

fn print_latency(what: &str, reached: &str, latency: &Latency) {
    let h = latency.histogram();
    let ms = |micros: u64| micros as f64 / 1000.0;
    println!(
        "latency {what} (n={}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    );
    if latency.early() > 0 {
        println!(
            "latency {what}: {} message(s) {reached} before their commit() returned (counted as 0)",
            latency.early()
        );
    }
}

pub(crate) fn print_relay_counters(stats: &[Arc<RelayStats>]) {
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

pub(crate) fn print_check(report: &ConsumerReport) {
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
pub(crate) fn print_memory() {
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
