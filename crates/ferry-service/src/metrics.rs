//! `GET /metrics` in the Prometheus text format (names in [`ferry::metric_names`]).
//!
//! The service records into a registry of its own, so that two services in one process
//! (tests, an embedding application) count apart: its counters live in this process; the
//! per-status gauges, ages and the outbox's per-partition backlog are read from the store
//! at each scrape, so every instance reports the same current totals (while the store does
//! not answer, `ferry_service_store_up` is 0 and the gauges keep the last values read).
//! When the relay runs in the same process, the process's registry, where the relay
//! records, is rendered after it.

use metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use ferry::metric_names::{
    SERVICE_CHECK_BACKS, SERVICE_CHECK_FAILED, SERVICE_DEAD_LETTERED, SERVICE_DELIVERED,
    SERVICE_MESSAGES, SERVICE_OLDEST_PREPARED_AGE, SERVICE_OLDEST_UNACKED_AGE,
    SERVICE_REDELIVERIES, SERVICE_STORE_UP,
};
use ferry::{PartitionStatus, record_outbox_status};

use crate::state::Status;
use crate::store::Stats;

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

/// The service's registry and its series.
pub struct Metrics {
    recorder: PrometheusRecorder,
    series: Series,
}

/// Every series, registered up front so that a scrape shows zeros rather than nothing.
struct Series {
    check_backs: [Counter; 4],
    check_failed: Counter,
    delivered: Counter,
    redeliveries: Counter,
    dead_lettered: Counter,
    store_up: Gauge,
    messages: Vec<(Status, Gauge)>,
    oldest_prepared_age: Gauge,
    oldest_unacked_age: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let series = metrics::with_local_recorder(&recorder, || {
            describe();
            Series {
                check_backs: CheckOutcome::ALL
                    .map(|outcome| counter!(SERVICE_CHECK_BACKS, "outcome" => outcome.as_str())),
                check_failed: counter!(SERVICE_CHECK_FAILED),
                delivered: counter!(SERVICE_DELIVERED),
                redeliveries: counter!(SERVICE_REDELIVERIES),
                dead_lettered: counter!(SERVICE_DEAD_LETTERED),
                store_up: gauge!(SERVICE_STORE_UP),
                messages: Status::ALL
                    .into_iter()
                    .map(|status| {
                        (
                            status,
                            gauge!(SERVICE_MESSAGES, "status" => status.as_str()),
                        )
                    })
                    .collect(),
                oldest_prepared_age: gauge!(SERVICE_OLDEST_PREPARED_AGE),
                oldest_unacked_age: gauge!(SERVICE_OLDEST_UNACKED_AGE),
            }
        });
        Self { recorder, series }
    }
}

impl Metrics {
    pub fn count_check(&self, outcome: CheckOutcome) {
        self.series.check_backs[outcome as usize].increment(1);
    }

    pub fn count_check_failed(&self) {
        self.series.check_failed.increment(1);
    }

    pub fn count_delivered(&self, messages: usize) {
        self.series.delivered.increment(messages as u64);
    }

    pub fn count_redelivered(&self, messages: usize) {
        self.series.redeliveries.increment(messages as u64);
    }

    pub fn count_dead_lettered(&self, messages: usize) {
        self.series.dead_lettered.increment(messages as u64);
    }

    /// The exposition text: `stats` is `None` when the store did not answer, `outbox` the
    /// outbox's status if read; `process` the process's registry, if the relay runs here.
    pub fn render(
        &self,
        stats: Option<&Stats>,
        outbox: Option<&[PartitionStatus]>,
        process: Option<&PrometheusHandle>,
    ) -> String {
        let series = &self.series;
        series.store_up.set(f64::from(u8::from(stats.is_some())));
        if let Some(stats) = stats {
            for (status, gauge) in &series.messages {
                gauge.set(stats.counts.get(status).copied().unwrap_or(0) as f64);
            }
            series
                .oldest_prepared_age
                .set(stats.oldest_prepared_age_secs.unwrap_or(0.0));
            series
                .oldest_unacked_age
                .set(stats.oldest_unacked_age_secs.unwrap_or(0.0));
        }
        if let Some(outbox) = outbox {
            metrics::with_local_recorder(&self.recorder, || record_outbox_status(outbox));
        }
        let mut text = self.recorder.handle().render();
        if let Some(process) = process {
            text.push_str(&process.render());
        }
        text
    }
}

fn describe() {
    describe_gauge!(SERVICE_STORE_UP, "1 if the store answered this scrape");
    describe_gauge!(SERVICE_MESSAGES, "messages per status");
    describe_gauge!(
        SERVICE_OLDEST_PREPARED_AGE,
        "seconds since the oldest prepared message was prepared (0 if none)"
    );
    describe_gauge!(
        SERVICE_OLDEST_UNACKED_AGE,
        "seconds since the oldest confirmed or delivered, not yet acknowledged message was confirmed (0 if none)"
    );
    describe_counter!(SERVICE_CHECK_BACKS, "check-backs by outcome");
    describe_counter!(SERVICE_CHECK_FAILED, "messages moved to check_failed");
    describe_counter!(
        SERVICE_DELIVERED,
        "messages seen published (confirmed to delivered)"
    );
    describe_counter!(SERVICE_REDELIVERIES, "redeliveries enqueued");
    describe_counter!(SERVICE_DEAD_LETTERED, "messages dead-lettered");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_status_and_counter() {
        let metrics = Metrics::default();
        metrics.count_check(CheckOutcome::RolledBack);
        metrics.count_redelivered(3);
        let mut stats = Stats::default();
        stats.counts.insert(Status::DeadLettered, 2);
        stats.oldest_prepared_age_secs = Some(1.5);
        let outbox = PartitionStatus {
            partition: 0,
            owner: None,
            epoch: 0,
            lease_expires_at: None,
            backlog: 7,
            oldest_unpublished_age_secs: Some(3.0),
            blocked_reason: None,
        };
        let text = metrics.render(Some(&stats), Some(&[outbox]), None);
        assert!(text.contains("ferry_service_messages{status=\"dead_lettered\"} 2\n"));
        assert!(text.contains("ferry_service_messages{status=\"prepared\"} 0\n"));
        assert!(text.contains("ferry_service_check_backs_total{outcome=\"rolled_back\"} 1\n"));
        assert!(text.contains("ferry_service_check_backs_total{outcome=\"error\"} 0\n"));
        assert!(text.contains("ferry_service_redeliveries_total 3\n"));
        assert!(text.contains("ferry_service_oldest_prepared_age_seconds 1.5\n"));
        assert!(text.contains("ferry_outbox_backlog{partition=\"0\"} 7\n"));
        assert!(text.contains("ferry_service_store_up 1\n"));
        assert!(text.contains("# HELP ferry_service_delivered_total "));
        let down = metrics.render(None, None, None);
        assert!(down.contains("ferry_service_store_up 0\n"));
    }

    #[test]
    fn two_services_count_apart() {
        let (one, two) = (Metrics::default(), Metrics::default());
        one.count_delivered(1);
        assert!(
            two.render(None, None, None)
                .contains("ferry_service_delivered_total 0\n")
        );
    }
}
