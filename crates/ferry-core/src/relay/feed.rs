//! A partition's share of the captured transactions, between the log capture's dispatcher
//! and the partition's worker: bounded in messages (the dispatcher waits when it is full,
//! which backpressures the log, so a large transaction is never held whole), in log
//! order, and with each portion's completion reported back once its messages are acked
//! and marked.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::message::Message;

/// One piece's messages of one partition, in insert order.
#[derive(Debug)]
pub(super) struct Portion {
    /// The transaction's place in the stream, counted from 0 by the dispatcher (the same
    /// for every piece of a transaction).
    pub(super) ordinal: u64,
    pub(super) messages: Vec<Message>,
}

/// A portion in the feed, with the room it takes there.
#[derive(Debug)]
struct Queued {
    portion: Portion,
    _room: OwnedSemaphorePermit,
}

/// A partition's feed holding at most `capacity` messages queued (the worker holds, besides,
/// the batch in flight and at most one portion that did not fit in it): the dispatcher's
/// end and the worker's. `done` receives the ordinal of each portion whose messages are all acked and
/// marked.
pub(super) fn feed(
    capacity: usize,
    done: mpsc::UnboundedSender<u64>,
) -> (FeedSender, CapturedFeed) {
    let (queue, portions) = mpsc::unbounded_channel();
    let sender = FeedSender {
        queue,
        room: Arc::new(Semaphore::new(capacity)),
        capacity,
    };
    let receiver = CapturedFeed {
        portions,
        done,
        next: None,
        in_batch: Vec::new(),
        held_back: Vec::new(),
    };
    (sender, receiver)
}

/// The dispatcher's end of a partition's feed.
#[derive(Debug, Clone)]
pub(super) struct FeedSender {
    queue: mpsc::UnboundedSender<Queued>,
    /// One permit per message the feed may still take.
    room: Arc<Semaphore>,
    capacity: usize,
}

/// The worker is gone: the feed takes nothing more.
#[derive(Debug)]
pub(super) struct FeedClosed;

/// Room reserved in a feed for one portion.
pub(super) struct Reserved<'f> {
    queue: &'f mpsc::UnboundedSender<Queued>,
    room: OwnedSemaphorePermit,
}

impl FeedSender {
    /// Waits until the feed has room for `messages` messages (the whole feed for a portion
    /// larger than it, which a piece no larger than a batch never is). Cancel-safe.
    pub(super) async fn reserve(&self, messages: usize) -> Result<Reserved<'_>, FeedClosed> {
        let wanted = u32::try_from(messages.min(self.capacity)).unwrap_or(u32::MAX);
        tokio::select! {
            room = Arc::clone(&self.room).acquire_many_owned(wanted) => Ok(Reserved {
                queue: &self.queue,
                room: room.map_err(|_| FeedClosed)?,
            }),
            () = self.queue.closed() => Err(FeedClosed),
        }
    }
}

impl Reserved<'_> {
    pub(super) fn send(self, portion: Portion) -> Result<(), FeedClosed> {
        self.queue
            .send(Queued {
                portion,
                _room: self.room,
            })
            .map_err(|_| FeedClosed)
    }
}

/// The worker's end of a partition's feed.
#[derive(Debug)]
pub(super) struct CapturedFeed {
    portions: mpsc::UnboundedReceiver<Queued>,
    /// A portion taken from the feed that did not fit in the last batch: the next one's
    /// first.
    next: Option<Portion>,
    /// The ordinals of the portions whose messages are all acked and marked.
    done: mpsc::UnboundedSender<u64>,
    /// The ordinals of the portions in the batch being published, with how many of the
    /// batch's messages, in order, are theirs.
    in_batch: Vec<(u64, usize)>,
    /// The batch's messages the sink did not ack, to publish again, first, in order.
    held_back: Vec<Message>,
}

impl CapturedFeed {
    /// What the sink did not ack of the last batch, or else the next portions, up to
    /// `limit` messages (a portion larger than `limit` is a batch of its own); waits for
    /// one. Portions taken out of the feed give their room back. `None` once the feed is
    /// closed or `stop` fires.
    pub(super) async fn next_batch(
        &mut self,
        limit: usize,
        stop: &CancellationToken,
    ) -> Option<Vec<Message>> {
        if !self.held_back.is_empty() {
            return Some(std::mem::take(&mut self.held_back));
        }
        let first = match self.next.take() {
            Some(portion) => portion,
            None => tokio::select! {
                queued = self.portions.recv() => queued?.portion,
                _ = stop.cancelled() => return None,
            },
        };
        self.in_batch.push((first.ordinal, first.messages.len()));
        let mut batch = first.messages;
        while batch.len() < limit {
            let Ok(Queued { portion, .. }) = self.portions.try_recv() else {
                break;
            };
            if batch.len() + portion.messages.len() > limit {
                self.next = Some(portion);
                break;
            }
            self.in_batch
                .push((portion.ordinal, portion.messages.len()));
            batch.extend(portion.messages);
        }
        Some(batch)
    }

    /// After `batch` was published and `acked` marked: reports the portions whose
    /// messages are all acked done, and holds back the others' unacked messages.
    pub(super) fn settle(&mut self, batch: &[Message], acked: &[Uuid]) {
        if acked.len() == batch.len() {
            for (ordinal, _) in self.in_batch.drain(..) {
                // The dispatcher is gone only when the stream ended: nothing to confirm.
                let _ = self.done.send(ordinal);
            }
            return;
        }
        let acked: HashSet<&Uuid> = acked.iter().collect();
        let mut shares = batch;
        let mut unsettled = Vec::new();
        for (ordinal, len) in std::mem::take(&mut self.in_batch) {
            let (share, rest) = shares.split_at(len);
            shares = rest;
            let left: Vec<Message> = share
                .iter()
                .filter(|message| !acked.contains(&message.id))
                .cloned()
                .collect();
            if left.is_empty() {
                let _ = self.done.send(ordinal);
            } else {
                unsettled.push((ordinal, left.len()));
                self.held_back.extend(left);
            }
        }
        self.in_batch = unsettled;
    }
}
