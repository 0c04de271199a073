//! [`ScriptedSink`]: a sink that answers as scripted and records what it was asked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{Instant, sleep};
use uuid::Uuid;

use crate::lease::Lease;
use crate::message::Message;
use crate::sink::{Delivery, ReconcileRequest, Sink, SinkError, report_unsent};

/// How the sink answers one publish of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// [`SinkError::retryable`].
    Transient,
    /// [`SinkError::permanent`].
    Permanent,
    /// [`SinkError::fenced`].
    Fenced,
    /// The sink panics, as a driver with a bug might, partway through the batch: the
    /// messages before it count as sent, their acks never delivered.
    Panic,
}

/// What the sink was asked to do, in call order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkEvent {
    Opened {
        partition: u32,
        owner: String,
        epoch: i64,
    },
    /// A batch handed to `publish`, when it was handed over.
    Published {
        partition: u32,
        ids: Vec<Uuid>,
        at: Instant,
    },
    /// The acks of a batch arrived (after the ack delay).
    Acked {
        partition: u32,
        ids: Vec<Uuid>,
        at: Instant,
    },
    Reconciled {
        partition: u32,
        checkpoint: Option<u64>,
        since_expiry: Duration,
    },
    Closed {
        partition: u32,
    },
    ShutDown,
}

/// A sink whose answers are scripted per message: each publish of a message takes the
/// next outcome scripted for its id ([`Outcome::Ack`] once none is left). Like a real
/// sink it sends a batch in order and stops at the first failure, reporting the rest as
/// not sent. Acks carry increasing broker positions and arrive after the ack delay, so a
/// batch can be held "in flight". `reconcile` returns the ids scripted for the partition
/// (once), as if the broker held them.
#[derive(Debug, Default)]
pub struct ScriptedSink {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    scripts: HashMap<Uuid, VecDeque<Outcome>>,
    ack_delay: Duration,
    in_broker: HashMap<u32, Vec<Uuid>>,
    last_position: u64,
    events: Vec<SinkEvent>,
}

impl ScriptedSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// The outcomes of the next publishes of message `id`, in order.
    pub fn script(&self, id: Uuid, outcomes: impl IntoIterator<Item = Outcome>) {
        self.lock().scripts.entry(id).or_default().extend(outcomes);
    }

    /// How long each `publish` waits before its acks arrive.
    pub fn set_ack_delay(&self, delay: Duration) {
        self.lock().ack_delay = delay;
    }

    /// What the next reconciliation of `partition` finds already in the broker.
    pub fn reconcile_finds(&self, partition: u32, ids: Vec<Uuid>) {
        self.lock().in_broker.insert(partition, ids);
    }

    pub fn events(&self) -> Vec<SinkEvent> {
        self.lock().events.clone()
    }

    /// The batches handed to `publish` for `partition`, in order.
    pub fn batches(&self, partition: u32) -> Vec<Vec<Uuid>> {
        self.id_lists(partition, false)
    }

    /// Every message of `partition` acked so far, in ack order.
    pub fn acked(&self, partition: u32) -> Vec<Uuid> {
        self.id_lists(partition, true).concat()
    }

    /// Partitions opened again before they were closed: two workers at once.
    pub fn overlapping_opens(&self) -> Vec<u32> {
        let mut open = HashSet::new();
        let mut overlaps = Vec::new();
        for event in &self.lock().events {
            match event {
                SinkEvent::Opened { partition, .. } if !open.insert(*partition) => {
                    overlaps.push(*partition);
                }
                SinkEvent::Closed { partition } => {
                    open.remove(partition);
                }
                _ => {}
            }
        }
        overlaps
    }

    /// The ids of `partition`'s batches as handed over, or as acked.
    fn id_lists(&self, partition: u32, acked: bool) -> Vec<Vec<Uuid>> {
        self.lock()
            .events
            .iter()
            .filter_map(|event| match event {
                SinkEvent::Published {
                    partition: p, ids, ..
                } if !acked && *p == partition => Some(ids.clone()),
                SinkEvent::Acked {
                    partition: p, ids, ..
                } if acked && *p == partition => Some(ids.clone()),
                _ => None,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Sink for ScriptedSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let Some(partition) = batch.first().map(|m| m.partition) else {
            return Vec::new();
        };
        let mut panics = false;
        let (mut outcomes, delay) = {
            let mut state = self.lock();
            state.events.push(SinkEvent::Published {
                partition,
                ids: batch.iter().map(|m| m.id).collect(),
                at: Instant::now(),
            });
            let mut outcomes = Vec::with_capacity(batch.len());
            for message in batch {
                let outcome = state
                    .scripts
                    .get_mut(&message.id)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or(Outcome::Ack);
                outcomes.push(match outcome {
                    Outcome::Ack => {
                        state.last_position += 1;
                        Ok(Delivery {
                            position: Some(state.last_position),
                        })
                    }
                    Outcome::Transient => Err(SinkError::retryable("scripted transient failure")),
                    Outcome::Permanent => Err(SinkError::permanent("scripted rejection")),
                    Outcome::Fenced => Err(SinkError::fenced("scripted fence")),
                    Outcome::Panic => {
                        panics = true;
                        break;
                    }
                });
                if outcome != Outcome::Ack {
                    break;
                }
            }
            (outcomes, state.ack_delay)
        };
        assert!(!panics, "scripted panic");
        report_unsent(&mut outcomes, batch.len());
        if !delay.is_zero() {
            sleep(delay).await;
        }
        let acked = batch
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .map(|(message, _)| message.id)
            .collect();
        self.lock().events.push(SinkEvent::Acked {
            partition,
            ids: acked,
            at: Instant::now(),
        });
        outcomes
    }

    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        let mut state = self.lock();
        state.events.push(SinkEvent::Reconciled {
            partition: request.partition,
            checkpoint: request.checkpoint,
            since_expiry: request.since_expiry,
        });
        Ok(state
            .in_broker
            .remove(&request.partition)
            .unwrap_or_default())
    }

    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        self.lock().events.push(SinkEvent::Opened {
            partition: lease.partition,
            owner: lease.owner.clone(),
            epoch: lease.epoch,
        });
        Ok(())
    }

    async fn close_partition(&self, partition: u32) {
        self.lock().events.push(SinkEvent::Closed { partition });
    }

    async fn shutdown(&self) {
        self.lock().events.push(SinkEvent::ShutDown);
    }
}
