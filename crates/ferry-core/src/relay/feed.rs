//! A partition's share of the captured transactions, between the log capture's dispatcher
//! and the partition's worker: bounded (the dispatcher waits when it is full, which
//! backpressures the log), in log order, and with the transactions' completion reported
//! back once every message of the partition's share is acked and marked.

use std::collections::HashSet;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::message::Message;

/// One transaction's messages of one partition, in insert order.
#[derive(Debug)]
pub(super) struct Portion {
    /// The transaction's place in the stream, counted from 0 by the dispatcher.
    pub(super) ordinal: u64,
    pub(super) messages: Vec<Message>,
}

/// The worker's end of a partition's feed.
#[derive(Debug)]
pub(super) struct CapturedFeed {
    portions: mpsc::Receiver<Portion>,
    /// The ordinals of the portions whose messages are all acked and marked.
    done: mpsc::UnboundedSender<u64>,
    /// The ordinals of the portions in the batch being published, with how many of the
    /// batch's messages, in order, are theirs.
    in_batch: Vec<(u64, usize)>,
    /// The batch's messages the sink did not ack, to publish again, first, in order.
    held_back: Vec<Message>,
}

impl CapturedFeed {
    pub(super) fn new(portions: mpsc::Receiver<Portion>, done: mpsc::UnboundedSender<u64>) -> Self {
        Self {
            portions,
            done,
            in_batch: Vec::new(),
            held_back: Vec::new(),
        }
    }

    /// What the sink did not ack of the last batch, or else the next portions, up to
    /// `limit` messages (a larger transaction's share is one batch); waits for one.
    /// `None` once the feed is closed or `stop` fires.
    pub(super) async fn next_batch(
        &mut self,
        limit: usize,
        stop: &CancellationToken,
    ) -> Option<Vec<Message>> {
        if !self.held_back.is_empty() {
            return Some(std::mem::take(&mut self.held_back));
        }
        let first = tokio::select! {
            portion = self.portions.recv() => portion?,
            _ = stop.cancelled() => return None,
        };
        self.in_batch.push((first.ordinal, first.messages.len()));
        let mut batch = first.messages;
        while batch.len() < limit {
            match self.portions.try_recv() {
                Ok(portion) => {
                    self.in_batch
                        .push((portion.ordinal, portion.messages.len()));
                    batch.extend(portion.messages);
                }
                Err(_) => break,
            }
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
