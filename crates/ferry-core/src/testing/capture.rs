//! [`MemoryLog`]: a database log in memory, for the log capture relay's unit tests.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::capture::{CaptureLag, CapturedPiece, LogCapture, LogPosition, LogStream};
use crate::error::StoreError;
use crate::message::Message;

/// A log of committed transactions that one stream at a time may read, keeping the
/// [`LogCapture`] contract: a second `start` while a stream is open fails with
/// [`StoreError::HeldElsewhere`]; a new stream re-sends everything after the confirmed
/// position, in pieces of the size `start` asks for; positions are the transactions'
/// numbers from 1. The test commits
/// transactions itself ([`commit`](Self::commit)), after enqueueing their messages in a
/// [`MemoryStore`](super::MemoryStore), in whatever order the scenario commits them.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    committed: Notify,
}

#[derive(Debug, Default)]
struct State {
    transactions: Vec<Vec<Message>>,
    confirmed: usize,
    streaming: bool,
    streams_started: usize,
    /// The most messages a stream has handed out, counted from the log's start.
    messages_read: usize,
    /// The open stream fails at its next read.
    cut: bool,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a committed transaction (no messages: a heartbeat).
    pub fn commit(&self, messages: Vec<Message>) {
        self.lock().transactions.push(messages);
        self.inner.committed.notify_waiters();
    }

    /// Makes the open stream fail at its next read, as when its connection drops: the
    /// relay starts another, which re-sends what was not confirmed.
    pub fn cut_stream(&self) {
        self.lock().cut = true;
        self.inner.committed.notify_waiters();
    }

    /// The number of the last confirmed transaction (0: none).
    pub fn confirmed(&self) -> usize {
        self.lock().confirmed
    }

    /// How many messages, counted from the log's start, streams have handed to the relay
    /// (the most by any stream).
    pub fn messages_read(&self) -> usize {
        self.lock().messages_read
    }

    /// How many streams were opened so far.
    pub fn streams_started(&self) -> usize {
        self.lock().streams_started
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl LogCapture for MemoryLog {
    async fn start(&self, max_messages: usize) -> Result<Box<dyn LogStream>, StoreError> {
        let mut state = self.lock();
        if state.streaming {
            return Err(StoreError::HeldElsewhere(
                "the memory log is streamed by another relay".into(),
            ));
        }
        state.streaming = true;
        state.streams_started += 1;
        let messages_read = state.transactions[..state.confirmed]
            .iter()
            .map(Vec::len)
            .sum();
        Ok(Box::new(MemoryStream {
            log: self.clone(),
            max_messages,
            next: state.confirmed,
            sent_of_next: 0,
            messages_read,
            drained_before: None,
        }))
    }

    async fn lag(&self) -> Result<CaptureLag, StoreError> {
        let state = self.lock();
        Ok(CaptureLag {
            bytes: Some((state.transactions.len() - state.confirmed) as u64),
            seconds: None,
        })
    }
}

struct MemoryStream {
    log: MemoryLog,
    max_messages: usize,
    /// The index of the next transaction to send.
    next: usize,
    /// How many of its messages went out in earlier pieces.
    sent_of_next: usize,
    /// How many messages, counted from the log's start, this stream handed out.
    messages_read: usize,
    /// How many transactions the log held when the relay said it drained.
    drained_before: Option<usize>,
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        self.log.lock().streaming = false;
    }
}

#[async_trait]
impl LogStream for MemoryStream {
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedPiece>, StoreError> {
        let inner = Arc::clone(&self.log.inner);
        let committed = inner.committed.notified();
        if let Some(piece) = self.take()? {
            return Ok(Some(piece));
        }
        let _ = tokio::time::timeout(idle, committed).await;
        self.take()
    }

    async fn mark_drained(&mut self) -> Result<(), StoreError> {
        self.drained_before = Some(self.log.lock().transactions.len());
        Ok(())
    }

    async fn confirm(&mut self, end: &LogPosition) -> Result<(), StoreError> {
        let number: usize = end.0.parse().map_err(|_| {
            StoreError::Other(format!("not a position of the memory log: {end}").into())
        })?;
        let mut state = self.log.lock();
        state.confirmed = state.confirmed.max(number);
        Ok(())
    }

    async fn lag(&mut self) -> Result<CaptureLag, StoreError> {
        self.log.lag().await
    }
}

impl MemoryStream {
    /// The next piece of the next transaction, if it is committed; an error if the stream
    /// was cut.
    fn take(&mut self) -> Result<Option<CapturedPiece>, StoreError> {
        let mut state = self.log.lock();
        if std::mem::take(&mut state.cut) {
            return Err(StoreError::Unavailable(
                "the memory log's stream was cut".into(),
            ));
        }
        let Some(transaction) = state.transactions.get(self.next) else {
            return Ok(None);
        };
        let unsent = &transaction[self.sent_of_next..];
        let last = unsent.len() <= self.max_messages;
        let messages: Vec<Message> = unsent.iter().take(self.max_messages).cloned().collect();
        let maybe_published = self
            .drained_before
            .is_none_or(|drained| self.next < drained);
        self.messages_read += messages.len();
        state.messages_read = state.messages_read.max(self.messages_read);
        let end = if last {
            self.next += 1;
            self.sent_of_next = 0;
            Some(LogPosition(self.next.to_string()))
        } else {
            self.sent_of_next += messages.len();
            None
        };
        Ok(Some(CapturedPiece {
            end,
            messages,
            maybe_published,
        }))
    }
}
