//! What tests share (feature `testing`).
//!
//! In-memory test doubles for the relay logic: an outbox and lease store that keeps the
//! stores' contracts, and a sink whose every answer is scripted. They let the relay's
//! ordering, fencing, blocking and shutdown rules be tested in seconds on tokio's paused
//! clock. They never stand in for a real store or broker in integration tests: those run
//! against the real services (docs/DESIGN.md §8), whose addresses [`services`] gives.

mod capture;
pub mod services;
mod sink;
mod store;
#[cfg(test)]
mod tests;

pub use capture::MemoryLog;
pub use sink::{Outcome, ScriptedSink, SinkEvent};
pub use store::{MarkAttempt, MemoryStore, Release};
