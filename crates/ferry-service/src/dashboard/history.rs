//! A small ring of samples (backlog per partition, the in-process relay's published
//! count) taken every `sample_interval`, from which the pages draw the publish rate and
//! the backlog's recent course. In memory only: a restart starts the history anew.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use ferry::ErrorChain;

use super::DashboardState;

#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) at: Instant,
    /// Unpublished messages per partition, in partition order.
    pub(super) backlog: Vec<u64>,
    /// What the relay in this process had published so far, if one runs here.
    pub(super) published: Option<u64>,
}

impl Sample {
    pub(super) fn total_backlog(&self) -> u64 {
        self.backlog.iter().sum()
    }
}

#[derive(Debug)]
pub(super) struct History {
    samples: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl History {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(2),
        }
    }

    pub(super) fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub(super) fn snapshot(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().cloned().collect()
    }
}

/// Messages per second the relay published over the last `window` (or over the history
/// there is, if shorter); `None` without a relay or two samples.
pub(super) fn publish_rate(samples: &[Sample], window: Duration) -> Option<f64> {
    let last = samples.last()?;
    let first = samples
        .iter()
        .find(|s| last.at.duration_since(s.at) <= window)?;
    let elapsed = last.at.duration_since(first.at).as_secs_f64();
    if elapsed <= 0.0 {
        return None;
    }
    let published = last.published?.saturating_sub(first.published?);
    Some(published as f64 / elapsed)
}

/// How a partition's backlog moved per minute over the history (negative: draining).
pub(super) fn backlog_trend(samples: &[Sample], partition: usize) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    let minutes = last.at.duration_since(first.at).as_secs_f64() / 60.0;
    if minutes <= 0.0 {
        return None;
    }
    let delta = *last.backlog.get(partition)? as f64 - *first.backlog.get(partition)? as f64;
    Some(delta / minutes)
}

/// Samples until `shutdown`; a store that does not answer skips the sample.
pub(super) async fn sample(dashboard: DashboardState, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(dashboard.sample_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match dashboard.outbox.status().await {
            Ok(status) => dashboard.history.push(Sample {
                at: Instant::now(),
                backlog: status.iter().map(|p| p.backlog).collect(),
                published: dashboard
                    .relay
                    .as_ref()
                    .map(|r| r.published.load(Ordering::Relaxed)),
            }),
            Err(err) => {
                debug!(error = %ErrorChain(&err), "dashboard: no sample, store unreachable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, backlog: u64, published: Option<u64>) -> Sample {
        Sample {
            at,
            backlog: vec![backlog],
            published,
        }
    }

    #[test]
    fn rates_span_the_window_and_the_ring_keeps_its_size() {
        let start = Instant::now();
        let history = History::new(3);
        for (secs, backlog, published) in [(0, 100, 0), (30, 70, 30), (60, 40, 60), (120, 40, 60)] {
            history.push(sample(
                start + Duration::from_secs(secs),
                backlog,
                Some(published),
            ));
        }
        let samples = history.snapshot();
        assert_eq!(samples.len(), 3, "the oldest was dropped");
        let per_sec = publish_rate(&samples, Duration::from_secs(60)).expect("rate");
        assert!(
            (per_sec - 0.0).abs() < 1e-9,
            "nothing published in the last minute"
        );
        let per_sec = publish_rate(&samples, Duration::from_secs(300)).expect("rate");
        assert!((per_sec - 30.0 / 90.0).abs() < 1e-9, "{per_sec}");
        let trend = backlog_trend(&samples, 0).expect("trend");
        assert!((trend - (-30.0 / 1.5)).abs() < 1e-9, "{trend}");
        assert!(publish_rate(&[sample(start, 1, None)], Duration::from_secs(60)).is_none());
    }
}
