//! [`MemoryStore`]: an outbox and its leases in memory, on tokio's clock.

mod leases;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeDelta, Utc};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::StoreError;
use crate::lease::Lease;
use crate::message::{Message, NewMessage};
use crate::partition::partition_for;
use crate::store::{OutboxStore, PartitionStatus, Wakers};

/// An outbox store and lease store in one, like the SQL stores, keeping their contracts:
/// `fetch` reads a partition's unpublished messages in sequence order with no cursor;
/// `mark_published` and `set_blocked` change something only under the partition's current
/// unexpired epoch and otherwise fail with [`StoreError::Fenced`]; each grant raises the
/// epoch by one and says how the previous owner left (clean release, or expiry with its
/// checkpoint). Leases and heartbeats expire on tokio's clock, so a test on a paused
/// runtime moves them with time; [`advance_clock`](Self::advance_clock) jumps the store's
/// clock alone. Published messages stay, flagged, for the test to inspect (retention is
/// zero for the relay's purposes: nothing is purged).
#[derive(Debug)]
pub struct MemoryStore {
    partitions: u32,
    state: Mutex<State>,
    /// The partition of every enqueued message, for `watch`.
    enqueued: broadcast::Sender<u32>,
}

#[derive(Debug)]
struct State {
    next_sequence: i64,
    versions: HashMap<(String, String), u64>,
    /// By sequence.
    rows: BTreeMap<i64, Row>,
    /// By partition.
    leases: Vec<LeaseRow>,
    /// Heartbeat expiry per relay.
    relays: HashMap<String, Instant>,
    clock_ahead: Duration,
    outbox_unavailable: bool,
    leases_unavailable: bool,
    marks: Vec<MarkAttempt>,
    /// How many `unpublished` calls were made.
    unpublished_checks: usize,
    releases: Vec<Release>,
    /// Every reason `set_blocked` recorded, by partition.
    blocked_reasons: HashMap<u32, Vec<Option<String>>>,
    /// Messages parked by `park_aggregate`, in sequence order; each holds its aggregate.
    parked: BTreeMap<i64, Message>,
    /// Committed rows not yet visible to reads and marks (see [`MemoryStore::enqueue_unseen`]).
    unseen: HashSet<Uuid>,
}

#[derive(Debug)]
struct Row {
    message: Message,
    published: bool,
}

#[derive(Debug)]
struct LeaseRow {
    owner: Option<String>,
    epoch: i64,
    expires_at: Instant,
    /// Whether the last owner released the lease clean.
    clean: bool,
    checkpoint: Option<u64>,
    blocked_reason: Option<String>,
    /// An operator asked to retry the partition's head now.
    retry_requested: bool,
}

impl LeaseRow {
    fn is_current(&self, lease: &Lease, now: Instant) -> bool {
        self.epoch == lease.epoch && self.expires_at > now
    }
}

/// One call of `mark_published`, accepted or fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkAttempt {
    pub partition: u32,
    pub epoch: i64,
    pub owner: String,
    pub ids: Vec<Uuid>,
    pub checkpoint: Option<u64>,
    /// False when the lease was no longer current and nothing changed.
    pub accepted: bool,
}

/// One call of `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub partition: u32,
    pub epoch: i64,
    pub clean: bool,
}

impl MemoryStore {
    /// An empty outbox of `partitions` partitions, none of them leased yet.
    pub fn new(partitions: u32) -> Self {
        let now = Instant::now();
        let leases = (0..partitions)
            .map(|_| LeaseRow {
                owner: None,
                epoch: 0,
                expires_at: now,
                clean: true,
                checkpoint: None,
                blocked_reason: None,
                retry_requested: false,
            })
            .collect();
        Self {
            partitions,
            state: Mutex::new(State {
                next_sequence: 1,
                versions: HashMap::new(),
                rows: BTreeMap::new(),
                leases,
                relays: HashMap::new(),
                clock_ahead: Duration::ZERO,
                outbox_unavailable: false,
                leases_unavailable: false,
                marks: Vec::new(),
                unpublished_checks: 0,
                releases: Vec::new(),
                blocked_reasons: HashMap::new(),
                parked: BTreeMap::new(),
                unseen: HashSet::new(),
            }),
            enqueued: broadcast::channel(1024).0,
        }
    }

    /// Commits `message` as a producer's transaction would: next version of its aggregate,
    /// next sequence, its partition; wakes the relays watching.
    pub fn enqueue(&self, message: NewMessage) -> Message {
        self.commit(message, true)
    }

    /// Commits `message` as [`enqueue`](Self::enqueue) does, but leaves it out of every
    /// read and mark until [`reveal`](Self::reveal): PostgreSQL streams a commit before the
    /// committing session has made its rows visible to other sessions.
    pub fn enqueue_unseen(&self, message: NewMessage) -> Message {
        self.commit(message, false)
    }

    /// Makes a message of [`enqueue_unseen`](Self::enqueue_unseen) visible.
    pub fn reveal(&self, id: Uuid) {
        self.lock().unseen.remove(&id);
    }

    fn commit(&self, message: NewMessage, seen: bool) -> Message {
        let mut state = self.lock();
        let partition_key = message.partition_key();
        let version = state
            .versions
            .entry((message.aggregate_type.clone(), message.aggregate_id.clone()))
            .or_default();
        *version += 1;
        let version = *version;
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let stored = Message {
            id: message.id.unwrap_or_else(Uuid::now_v7),
            aggregate_type: message.aggregate_type,
            aggregate_id: message.aggregate_id,
            version,
            event_type: message.event_type,
            payload: message.payload,
            headers: message.headers,
            partition: partition_for(&partition_key, self.partitions),
            partition_key,
            created_at: Utc::now(),
            sequence,
        };
        state.rows.insert(
            sequence,
            Row {
                message: stored.clone(),
                published: false,
            },
        );
        if !seen {
            state.unseen.insert(stored.id);
        }
        // No relay watching yet is fine: relays wake every partition when they start.
        let _ = self.enqueued.send(stored.partition);
        stored
    }

    /// Makes every `OutboxStore` call fail with [`StoreError::Unavailable`], or not.
    pub fn set_outbox_unavailable(&self, unavailable: bool) {
        self.lock().outbox_unavailable = unavailable;
    }

    /// Makes every `LeaseStore` call fail with [`StoreError::Unavailable`], or not.
    pub fn set_leases_unavailable(&self, unavailable: bool) {
        self.lock().leases_unavailable = unavailable;
    }

    /// Moves the store's clock `by` ahead of tokio's: leases and heartbeats expire that
    /// much sooner than their holders believe, as when a relay was paused past its lease
    /// or its clock lags.
    pub fn advance_clock(&self, by: Duration) {
        self.lock().clock_ahead += by;
    }

    pub fn is_published(&self, id: Uuid) -> bool {
        self.lock()
            .rows
            .values()
            .any(|row| row.message.id == id && row.published)
    }

    /// The ids of `partition`'s unpublished messages, in sequence order.
    pub fn unpublished(&self, partition: u32) -> Vec<Uuid> {
        self.lock().unpublished(partition).map(|m| m.id).collect()
    }

    /// Every `mark_published` call so far, in order.
    pub fn marks(&self) -> Vec<MarkAttempt> {
        self.lock().marks.clone()
    }

    /// How many `unpublished` calls were made so far.
    pub fn unpublished_checks(&self) -> usize {
        self.lock().unpublished_checks
    }

    /// Every `release` call so far, in order.
    pub fn releases(&self) -> Vec<Release> {
        self.lock().releases.clone()
    }

    /// Every reason recorded for `partition` by `set_blocked`, in order, `None` for each
    /// clearing.
    pub fn blocked_reasons(&self, partition: u32) -> Vec<Option<String>> {
        self.lock()
            .blocked_reasons
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }

    pub fn blocked_reason(&self, partition: u32) -> Option<String> {
        self.lock()
            .leases
            .get(partition as usize)
            .and_then(|row| row.blocked_reason.clone())
    }

    /// Asks the relay owning `partition` to retry its head now, as `ferry unblock` does.
    pub fn request_retry(&self, partition: u32) {
        if let Some(row) = self.lock().leases.get_mut(partition as usize) {
            row.retry_requested = true;
        }
    }

    /// The parked messages' ids, in sequence order.
    pub fn parked(&self) -> Vec<Uuid> {
        self.lock().parked.values().map(|m| m.id).collect()
    }

    /// Puts an aggregate's parked messages back with their sequences, releasing it.
    pub fn requeue_parked(&self, aggregate_type: &str, aggregate_id: &str) -> usize {
        let mut state = self.lock();
        let back: Vec<Message> = state
            .parked
            .values()
            .filter(|m| m.aggregate_type == aggregate_type && m.aggregate_id == aggregate_id)
            .cloned()
            .collect();
        for message in &back {
            state.parked.remove(&message.sequence);
            state.rows.insert(
                message.sequence,
                Row {
                    message: message.clone(),
                    published: false,
                },
            );
        }
        back.len()
    }

    /// The relay holding an unexpired lease on `partition`, with its epoch.
    pub fn owner(&self, partition: u32) -> Option<(String, i64)> {
        let state = self.lock();
        let now = state.now();
        let row = state.leases.get(partition as usize)?;
        let owner = row.owner.clone().filter(|_| row.expires_at > now)?;
        Some((owner, row.epoch))
    }

    /// The relays whose heartbeat has not expired, sorted.
    pub fn live_relays(&self) -> Vec<String> {
        let state = self.lock();
        let now = state.now();
        let mut live: Vec<String> = state
            .relays
            .iter()
            .filter(|(_, expires_at)| **expires_at > now)
            .map(|(relay, _)| relay.clone())
            .collect();
        live.sort();
        live
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn outbox(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let state = self.lock();
        if state.outbox_unavailable {
            return Err(unavailable("outbox"));
        }
        Ok(state)
    }

    fn leases(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let state = self.lock();
        if state.leases_unavailable {
            return Err(unavailable("leases"));
        }
        Ok(state)
    }
}

impl State {
    fn now(&self) -> Instant {
        Instant::now() + self.clock_ahead
    }

    /// `partition`'s unpublished messages in sequence order, but for those of aggregates
    /// held by a parked message.
    fn unpublished(&self, partition: u32) -> impl Iterator<Item = &Message> {
        self.rows
            .values()
            .filter(move |row| row.message.partition == partition && self.is_pending(row))
            .map(|row| &row.message)
            .filter(|message| !self.holds(message))
    }

    /// Whether a read or a mark sees `row` as unpublished.
    fn is_pending(&self, row: &Row) -> bool {
        !row.published && !self.unseen.contains(&row.message.id)
    }

    fn holds(&self, message: &Message) -> bool {
        self.parked.values().any(|parked| {
            parked.aggregate_type == message.aggregate_type
                && parked.aggregate_id == message.aggregate_id
        })
    }

    /// The lease row of `lease`'s partition if `lease` is current there.
    fn current_lease(&mut self, lease: &Lease) -> Option<&mut LeaseRow> {
        let now = self.now();
        self.leases
            .get_mut(lease.partition as usize)
            .filter(|row| row.is_current(lease, now))
    }
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(format!("the in-memory {what} are switched off").into())
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn partitions(&self) -> Result<u32, StoreError> {
        self.outbox().map(|_| self.partitions)
    }

    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let state = self.outbox()?;
        Ok(state.unpublished(partition).take(limit).cloned().collect())
    }

    async fn unpublished(&self, partition: u32, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut state = self.outbox()?;
        state.unpublished_checks += 1;
        Ok(state
            .rows
            .values()
            .filter(|row| {
                row.message.partition == partition
                    && state.is_pending(row)
                    && ids.contains(&row.message.id)
            })
            .map(|row| row.message.id)
            .collect())
    }

    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut state = self.outbox()?;
        let accepted = match state.current_lease(lease) {
            Some(row) => {
                row.checkpoint = row.checkpoint.max(checkpoint);
                true
            }
            None => false,
        };
        state.marks.push(MarkAttempt {
            partition: lease.partition,
            epoch: lease.epoch,
            owner: lease.owner.clone(),
            ids: ids.to_vec(),
            checkpoint,
            accepted,
        });
        if !accepted {
            return Err(StoreError::fenced(lease));
        }
        let mut marked = 0;
        let State { rows, unseen, .. } = &mut *state;
        for row in rows.values_mut() {
            if row.message.partition == lease.partition
                && !row.published
                && !unseen.contains(&row.message.id)
                && ids.contains(&row.message.id)
            {
                row.published = true;
                marked += 1;
            }
        }
        Ok(marked)
    }

    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError> {
        let mut state = self.outbox()?;
        let row = state
            .current_lease(lease)
            .ok_or_else(|| StoreError::fenced(lease))?;
        row.blocked_reason = reason.map(str::to_owned);
        state
            .blocked_reasons
            .entry(lease.partition)
            .or_default()
            .push(reason.map(str::to_owned));
        Ok(())
    }

    async fn take_retry_request(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut state = self.outbox()?;
        Ok(state
            .current_lease(lease)
            .is_some_and(|row| std::mem::take(&mut row.retry_requested)))
    }

    async fn park_aggregate(
        &self,
        lease: &Lease,
        message: &Message,
        _by: &str,
        _reason: &str,
    ) -> Result<u64, StoreError> {
        let mut state = self.outbox()?;
        if state.current_lease(lease).is_none() {
            return Err(StoreError::fenced(lease));
        }
        let parked: Vec<i64> = state
            .rows
            .iter()
            .filter(|(_, row)| {
                !row.published
                    && row.message.partition == lease.partition
                    && row.message.aggregate_type == message.aggregate_type
                    && row.message.aggregate_id == message.aggregate_id
            })
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in &parked {
            if let Some(row) = state.rows.remove(sequence) {
                state.parked.insert(*sequence, row.message);
            }
        }
        Ok(parked.len() as u64)
    }

    /// Adopts a lease this store granted (or one from a backend that granted a higher
    /// epoch): the epoch is raised, never lowered; an older epoch, or the same one held by
    /// another owner, is fenced.
    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let mut state = self.outbox()?;
        let row = state
            .leases
            .get_mut(lease.partition as usize)
            .filter(|row| {
                row.epoch < lease.epoch
                    || (row.epoch == lease.epoch && row.owner.as_deref() == Some(&lease.owner))
            })
            .ok_or_else(|| StoreError::fenced(lease))?;
        if row.epoch < lease.epoch {
            row.blocked_reason = None;
        }
        row.epoch = lease.epoch;
        row.owner = Some(lease.owner.clone());
        Ok(row.checkpoint)
    }

    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let mut enqueued = self.enqueued.subscribe();
        wakers.wake_all();
        loop {
            match enqueued.recv().await {
                Ok(partition) => wakers.wake(partition),
                Err(RecvError::Lagged(_)) => wakers.wake_all(),
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let state = self.outbox()?;
        let now = state.now();
        let wall_now = Utc::now();
        Ok((0..self.partitions)
            .zip(&state.leases)
            .map(|(partition, lease)| {
                let unpublished: Vec<&Message> = state.unpublished(partition).collect();
                let held = lease.expires_at > now;
                PartitionStatus {
                    partition,
                    owner: lease.owner.clone().filter(|_| held),
                    epoch: lease.epoch,
                    lease_expires_at: TimeDelta::from_std(
                        lease.expires_at.saturating_duration_since(now),
                    )
                    .ok()
                    .filter(|_| held)
                    .map(|left| wall_now + left),
                    backlog: unpublished.len() as u64,
                    oldest_unpublished_age_secs: unpublished.first().map(|oldest| {
                        (wall_now - oldest.created_at).num_milliseconds() as f64 / 1000.0
                    }),
                    blocked_reason: lease.blocked_reason.clone(),
                }
            })
            .collect())
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        self.outbox().map(|_| 0)
    }

    fn retention(&self) -> Duration {
        Duration::ZERO
    }
}
