//! Prometheus text exposition for `GET /metrics`. Counters live in this process; the
//! per-status gauges and ages are read from the store at each scrape, so every instance
//! reports the same, current totals. Hand-rendered: a dozen series need no registry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry::RelayStats;

use crate::state::Status;
use crate::store::Stats;

pub const MESSAGES: &str = "ferry_service_messages";
pub const OLDEST_PREPARED_AGE: &str = "ferry_service_oldest_prepared_age_seconds";
pub const OLDEST_UNACKED_AGE: &str = "ferry_service_oldest_unacked_age_seconds";
pub const CHECK_BACKS: &str = "ferry_service_check_backs_total";
pub const CHECK_FAILED: &str = "ferry_service_check_failed_total";
pub const DELIVERED: &str = "ferry_service_delivered_total";
pub const REDELIVERIES: &str = "ferry_service_redeliveries_total";
pub const DEAD_LETTERED: &str = "ferry_service_dead_lettered_total";
pub const STORE_UP: &str = "ferry_service_store_up";
pub const RELAY_PUBLISHED: &str = "ferry_relay_published_total";
pub const RELAY_PUBLISH_FAILURES: &str = "ferry_relay_publish_failures_total";
pub const RELAY_OWNED_PARTITIONS: &str = "ferry_relay_owned_partitions";
pub const OUTBOX_BACKLOG: &str = "ferry_outbox_backlog";

/// What a check-back came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Committed,
    RolledBack,
    Unknown,
    /// No usable answer: unreachable, timeout, non-2xx, unreadable body.
    Error,
}

impl CheckOutcome {
    const ALL: [CheckOutcome; 4] = [
        CheckOutcome::Committed,
        CheckOutcome::RolledBack,
        CheckOutcome::Unknown,
        CheckOutcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckOutcome::Committed => "committed",
            CheckOutcome::RolledBack => "rolled_back",
            CheckOutcome::Unknown => "unknown",
            CheckOutcome::Error => "error",
        }
    }
}

/// This process's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    check_backs: [AtomicU64; 4],
    pub check_failed: AtomicU64,
    pub delivered: AtomicU64,
    pub redeliveries: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl Metrics {
    pub fn count_check(&self, outcome: CheckOutcome) {
        self.check_backs[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn check_backs(&self, outcome: CheckOutcome) -> u64 {
        self.check_backs[outcome as usize].load(Ordering::Relaxed)
    }

    /// The exposition text. `stats` is `None` when the store did not answer.
    pub fn render(
        &self,
        stats: Option<&Stats>,
        relay: Option<&RelayStats>,
        backlog: Option<u64>,
    ) -> String {
        let mut out = String::with_capacity(2048);
        header(
            &mut out,
            STORE_UP,
            "gauge",
            "1 if the store answered this scrape",
        );
        sample(&mut out, STORE_UP, "", stats.is_some() as u64 as f64);
        if let Some(stats) = stats {
            header(&mut out, MESSAGES, "gauge", "messages per status");
            for status in Status::ALL {
                let count = stats.counts.get(&status).copied().unwrap_or(0);
                sample(
                    &mut out,
                    MESSAGES,
                    &format!("status=\"{status}\""),
                    count as f64,
                );
            }
            header(
                &mut out,
                OLDEST_PREPARED_AGE,
                "gauge",
                "seconds since the oldest prepared message was prepared (0 if none)",
            );
            sample(
                &mut out,
                OLDEST_PREPARED_AGE,
                "",
                stats.oldest_prepared_age_secs.unwrap_or(0.0),
            );
            header(
                &mut out,
                OLDEST_UNACKED_AGE,
                "gauge",
                "seconds since the oldest confirmed or delivered, not yet acknowledged message was confirmed (0 if none)",
            );
            sample(
                &mut out,
                OLDEST_UNACKED_AGE,
                "",
                stats.oldest_unacked_age_secs.unwrap_or(0.0),
            );
        }
        header(&mut out, CHECK_BACKS, "counter", "check-backs by outcome");
        for outcome in CheckOutcome::ALL {
            sample(
                &mut out,
                CHECK_BACKS,
                &format!("outcome=\"{}\"", outcome.as_str()),
                self.check_backs(outcome) as f64,
            );
        }
        for (name, help, counter) in [
            (
                CHECK_FAILED,
                "messages moved to check_failed",
                &self.check_failed,
            ),
            (
                DELIVERED,
                "messages seen published (confirmed to delivered)",
                &self.delivered,
            ),
            (REDELIVERIES, "redeliveries enqueued", &self.redeliveries),
            (DEAD_LETTERED, "messages dead-lettered", &self.dead_lettered),
        ] {
            header(&mut out, name, "counter", help);
            sample(&mut out, name, "", counter.load(Ordering::Relaxed) as f64);
        }
        if let Some(relay) = relay {
            for (name, kind, help, value) in [
                (
                    RELAY_PUBLISHED,
                    "counter",
                    "messages the in-process relay published",
                    relay.published.load(Ordering::Relaxed),
                ),
                (
                    RELAY_PUBLISH_FAILURES,
                    "counter",
                    "failed publish attempts of the in-process relay",
                    relay.publish_failures.load(Ordering::Relaxed),
                ),
                (
                    RELAY_OWNED_PARTITIONS,
                    "gauge",
                    "partitions the in-process relay owns",
                    relay.owned_partitions.load(Ordering::Relaxed),
                ),
            ] {
                header(&mut out, name, kind, help);
                sample(&mut out, name, "", value as f64);
            }
        }
        if let Some(backlog) = backlog {
            header(
                &mut out,
                OUTBOX_BACKLOG,
                "gauge",
                "unpublished outbox messages",
            );
            sample(&mut out, OUTBOX_BACKLOG, "", backlog as f64);
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: f64) {
    let _ = if labels.is_empty() {
        writeln!(out, "{name} {value}")
    } else {
        writeln!(out, "{name}{{{labels}}} {value}")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_status_and_counter() {
        let metrics = Metrics::default();
        metrics.count_check(CheckOutcome::RolledBack);
        metrics.redeliveries.fetch_add(3, Ordering::Relaxed);
        let mut stats = Stats::default();
        stats.counts.insert(Status::DeadLettered, 2);
        stats.oldest_prepared_age_secs = Some(1.5);
        let text = metrics.render(Some(&stats), None, Some(7));
        assert!(text.contains("ferry_service_messages{status=\"dead_lettered\"} 2\n"));
        assert!(text.contains("ferry_service_messages{status=\"prepared\"} 0\n"));
        assert!(text.contains("ferry_service_check_backs_total{outcome=\"rolled_back\"} 1\n"));
        assert!(text.contains("ferry_service_redeliveries_total 3\n"));
        assert!(text.contains("ferry_service_oldest_prepared_age_seconds 1.5\n"));
        assert!(text.contains("ferry_outbox_backlog 7\n"));
        assert!(text.contains("ferry_service_store_up 1\n"));
        let down = metrics.render(None, None, None);
        assert!(down.contains("ferry_service_store_up 0\n"));
        assert!(!down.contains(MESSAGES));
    }
}
