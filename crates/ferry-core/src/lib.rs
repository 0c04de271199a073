//! ferry's core: the message model, the contracts every store, lease backend, sink and
//! inbox implements, and the relay loop that drives them.
//!
//! Architecture invariant: this crate has no database or broker driver and does no I/O of
//! its own; drivers live in the `ferry` crate behind cargo features.

pub mod admin;
pub mod backoff;
pub mod capture;
pub mod cloudevents;
mod error;
pub mod inbox;
pub mod lease;
pub mod message;
pub mod metric_names;
pub mod partition;
pub mod relay;
pub mod sink;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace_context;

pub use admin::{
    BlockedPartition, Cleaned, CleanupBounds, OutboxAdmin, ParkedMessage, ParkedQuery,
    RetainedFilter, RetainedSummary, parse_time_or_ago,
};
pub use capture::{CaptureLag, CapturedPiece, LogCapture, LogPosition, LogStream};
pub use cloudevents::{ReceivedMessage, Source};
pub use error::{ErrorChain, StoreError, error_chain};
pub use inbox::{Admission, Decision, Inbox, ProcessError, Processed};
pub use lease::{Lease, LeaseStore, Takeover};
pub use message::{EnqueueError, Enqueued, Headers, InvalidMessage, Message, NewMessage};
pub use partition::partition_for;
pub use relay::{
    OnPermanentFailure, Relay, RelayConfig, RelayError, RelayStats, Replay, ReplayCheckpoint,
    ReplayEnd, ReplayError, ReplayOptions, ReplayProgress, record_outbox_status,
};
pub use sink::{Delivery, ReconcileRequest, Sink, SinkError, report_unsent};
pub use store::{OutboxStore, PartitionStatus, Wakers};
pub use trace_context::TraceParent;
