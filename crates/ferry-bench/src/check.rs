//! What the consumer checks per aggregate: every planned version arrives, once, in order;
//! and, in live mode, how long each message took from its commit to its arrival.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::plan::AGGREGATE_TYPE;

/// Counts of what arrived.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Every message read from the sink.
    pub(crate) received: u64,
    /// Planned versions received for the first time.
    pub(crate) distinct: u64,
    /// Versions received again. The bench's tables are new, so each version of an
    /// aggregate has exactly one message id: a repeated version is a repeated id.
    pub(crate) duplicates: u64,
    /// Versions that arrived after a higher version of the same aggregate.
    pub(crate) out_of_order: u64,
    /// Messages no producer committed: another aggregate, or a version beyond the plan.
    pub(crate) unexpected: u64,
    /// Messages that are not valid CloudEvents of ferry's shape.
    pub(crate) undecodable: u64,
}

/// What a received message turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    New,
    Duplicate,
    Unexpected,
}

/// Per-aggregate bookkeeping in one bit per planned message, so that checking a million
/// messages costs the bench process kilobytes, not the megabytes of an id set.
#[derive(Debug)]
pub(crate) struct Checker {
    /// `offsets[i]..offsets[i + 1]` are aggregate `i`'s bits, one per planned version.
    offsets: Vec<u64>,
    seen: Vec<u64>,
    /// Highest version received per aggregate.
    last: Vec<u64>,
    tally: Tally,
}

impl Checker {
    /// `versions[i]` is how many versions aggregate `i` is planned to get.
    pub(crate) fn new(versions: &[u64]) -> Self {
        let mut offsets = Vec::with_capacity(versions.len() + 1);
        let mut total = 0;
        offsets.push(0);
        for v in versions {
            total += v;
            offsets.push(total);
        }
        Self {
            offsets,
            seen: vec![0; total.div_ceil(64) as usize],
            last: vec![0; versions.len()],
            tally: Tally::default(),
        }
    }

    pub(crate) fn record(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        version: u64,
    ) -> Verdict {
        self.tally.received += 1;
        let index = (aggregate_type == AGGREGATE_TYPE)
            .then(|| aggregate_id.parse::<usize>().ok())
            .flatten()
            .filter(|&i| i < self.last.len());
        let Some(index) = index else {
            self.tally.unexpected += 1;
            return Verdict::Unexpected;
        };
        let (start, end) = (self.offsets[index], self.offsets[index + 1]);
        if version == 0 || version > end - start {
            self.tally.unexpected += 1;
            return Verdict::Unexpected;
        }
        let bit = start + version - 1;
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.seen[word] & mask != 0 {
            self.tally.duplicates += 1;
            return Verdict::Duplicate;
        }
        self.seen[word] |= mask;
        self.tally.distinct += 1;
        if version < self.last[index] {
            self.tally.out_of_order += 1;
        } else {
            self.last[index] = version;
        }
        Verdict::New
    }

    pub(crate) fn undecodable(&mut self) {
        self.tally.received += 1;
        self.tally.undecodable += 1;
    }

    pub(crate) fn tally(&self) -> Tally {
        self.tally
    }

    /// Planned versions never received.
    pub(crate) fn missing(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0) - self.tally.distinct
    }

    /// The sum of every kind of failure: zero means the run kept ferry's guarantees.
    pub(crate) fn problems(&self) -> u64 {
        let t = &self.tally;
        self.missing() + t.duplicates + t.out_of_order + t.unexpected + t.undecodable
    }
}

/// Live mode's two latencies from each message's commit: to the broker's ack, as the relay
/// received it (the figure the latency bars are set on), and to the bench's consumer
/// receiving it (which adds the broker's delivery to a consumer).
#[derive(Debug)]
pub(crate) struct Latencies {
    pub(crate) to_ack: Latency,
    pub(crate) to_consume: Latency,
}

impl Latencies {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            to_ack: Latency::new()?,
            to_consume: Latency::new()?,
        })
    }

    /// Called right after `commit()` returned for `ids`.
    pub(crate) fn committed(&self, ids: &[Uuid], at: Instant) {
        self.to_ack.committed(ids, at);
        self.to_consume.committed(ids, at);
    }
}

/// The latency from commit to one later instant, in microseconds.
#[derive(Debug)]
pub(crate) struct Latency {
    pending: Mutex<HashMap<Uuid, Seen>>,
    histogram: Mutex<Histogram<u64>>,
    /// Messages that reached the later instant before their producer's `commit()` had
    /// returned.
    early: AtomicU64,
}

/// Which of its two instants a message has reached first.
#[derive(Debug, Clone, Copy)]
enum Seen {
    Committed(Instant),
    /// Received (acked, consumed) before its producer's `commit()` returned: its latency
    /// counts as zero.
    Received,
}

/// Longest latency the histogram distinguishes; longer ones count as this.
const LATENCY_CEILING: Duration = Duration::from_secs(600);

impl Latency {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            pending: Mutex::default(),
            histogram: Mutex::new(Histogram::new_with_bounds(
                1,
                LATENCY_CEILING.as_micros() as u64,
                3,
            )?),
            early: AtomicU64::new(0),
        })
    }

    /// Called right after `commit()` returned for `ids`.
    pub(crate) fn committed(&self, ids: &[Uuid], at: Instant) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            match pending.remove(id) {
                // The relay and the consumer were faster than the producer's wake-up.
                Some(Seen::Received) => {
                    self.early.fetch_add(1, Ordering::Relaxed);
                    self.record(Duration::ZERO);
                }
                _ => {
                    pending.insert(*id, Seen::Committed(at));
                }
            }
        }
    }

    /// Called when a message is received (acked, consumed) for the first time.
    pub(crate) fn received(&self, id: Uuid, at: Instant) {
        let committed = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            match pending.remove(&id) {
                Some(Seen::Committed(committed)) => Some(committed),
                _ => {
                    pending.insert(id, Seen::Received);
                    None
                }
            }
        };
        if let Some(committed) = committed {
            self.record(at.saturating_duration_since(committed));
        }
    }

    fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(micros.max(1));
    }

    pub(crate) fn histogram(&self) -> Histogram<u64> {
        self.histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn early(&self) -> u64 {
        self.early.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_of_failure() {
        // Aggregate 0 gets versions 1..=3, aggregate 1 gets 1..=2.
        let mut checker = Checker::new(&[3, 2]);
        assert_eq!(checker.record("bench", "0", 1), Verdict::New);
        assert_eq!(checker.record("bench", "0", 3), Verdict::New);
        assert_eq!(checker.record("bench", "0", 2), Verdict::New); // after 3
        assert_eq!(checker.record("bench", "0", 3), Verdict::Duplicate);
        assert_eq!(checker.record("bench", "1", 1), Verdict::New);
        assert_eq!(checker.record("bench", "1", 3), Verdict::Unexpected); // beyond plan
        assert_eq!(checker.record("bench", "2", 1), Verdict::Unexpected); // no such aggregate
        assert_eq!(checker.record("order", "0", 1), Verdict::Unexpected);
        assert_eq!(checker.record("bench", "x", 1), Verdict::Unexpected);
        checker.undecodable();
        let tally = checker.tally();
        assert_eq!(
            tally,
            Tally {
                received: 10,
                distinct: 4,
                duplicates: 1,
                out_of_order: 1,
                unexpected: 4,
                undecodable: 1,
            }
        );
        assert_eq!(checker.missing(), 1); // aggregate 1, version 2
        assert_eq!(checker.problems(), 1 + 1 + 1 + 4 + 1);
    }

    #[test]
    fn a_clean_run_has_no_problems() {
        let mut checker = Checker::new(&[70, 1, 0, 64]);
        for (aggregate, versions) in [("0", 70), ("1", 1), ("3", 64)] {
            for version in 1..=versions {
                assert_eq!(checker.record("bench", aggregate, version), Verdict::New);
            }
        }
        assert_eq!(checker.problems(), 0);
        assert_eq!(checker.tally().distinct, 135);
    }

    #[test]
    fn latency_pairs_commit_and_receipt_in_either_order() {
        let latency = Latency::new().expect("valid bounds");
        let start = Instant::now();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        latency.committed(&[a], start);
        latency.received(a, start + Duration::from_millis(3));
        latency.received(b, start + Duration::from_millis(1));
        latency.committed(&[b], start + Duration::from_millis(2));
        let histogram = latency.histogram();
        assert_eq!(histogram.len(), 2);
        assert_eq!(latency.early(), 1);
        assert!(
            (2990..=3010).contains(&histogram.max()),
            "{}",
            histogram.max()
        );
    }
}
