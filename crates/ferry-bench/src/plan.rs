//! Which aggregate each produced message belongs to, decided before anything runs, so the
//! consumer knows exactly which versions of which aggregate to expect.
//!
//! Producer `p` of `P` owns the aggregates `p, p + P, p + 2P, …` and cycles through them:
//! producers never wait on each other's per-aggregate version locks, so what is measured
//! is the outbox and the relay, not lock queues (and no two transactions can deadlock).

/// The aggregate type of every bench message; `aggregate_id` is the aggregate's index.
pub(crate) const AGGREGATE_TYPE: &str = "bench";

/// The event type of every bench message.
pub(crate) const EVENT_TYPE: &str = "bench.event";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) messages: u64,
    pub(crate) aggregates: u32,
    pub(crate) producers: u32,
}

/// Part `index` of `total` split into `parts` near-equal parts, the larger ones first.
fn share(total: u64, parts: u64, index: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

impl Plan {
    /// Messages producer `producer` writes.
    pub(crate) fn messages_of(&self, producer: u32) -> u64 {
        share(
            self.messages,
            u64::from(self.producers),
            u64::from(producer),
        )
    }

    /// Aggregates producer `producer` owns (at least one: there are no more producers
    /// than aggregates).
    fn aggregates_of(&self, producer: u32) -> u64 {
        share(
            u64::from(self.aggregates),
            u64::from(self.producers),
            u64::from(producer),
        )
    }

    /// The aggregate index of producer `producer`'s `k`-th message.
    pub(crate) fn aggregate(&self, producer: u32, k: u64) -> u32 {
        let local = k % self.aggregates_of(producer).max(1);
        // local < aggregates / producers + 1, so the index is below `aggregates`.
        producer + self.producers * local as u32
    }

    /// How many messages (and so versions: 1 to n) each aggregate gets.
    pub(crate) fn versions(&self) -> Vec<u64> {
        let mut versions = vec![0; self.aggregates as usize];
        for producer in 0..self.producers {
            let messages = self.messages_of(producer);
            let owned = self.aggregates_of(producer);
            for local in 0..owned {
                let index = producer as usize + self.producers as usize * local as usize;
                versions[index] = share(messages, owned, local);
            }
        }
        versions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_and_aggregate_is_planned_once() {
        for (messages, aggregates, producers) in [(1000, 10, 4), (7, 3, 3), (5, 9, 2), (1, 1, 1)] {
            let plan = Plan {
                messages,
                aggregates,
                producers,
            };
            let mut counted = vec![0u64; aggregates as usize];
            for producer in 0..producers {
                for k in 0..plan.messages_of(producer) {
                    let aggregate = plan.aggregate(producer, k);
                    assert_eq!(aggregate % producers, producer, "owned by its producer");
                    counted[aggregate as usize] += 1;
                }
            }
            assert_eq!(counted, plan.versions(), "{plan:?}");
            assert_eq!(counted.iter().sum::<u64>(), messages);
        }
    }
}
