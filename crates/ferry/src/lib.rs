//! ferry: a transactional outbox and inbox that keeps its promise across crashes,
//! failovers and concurrent relays: no loss, no duplicates in effect, no reordering per key.
//!
//! The core (message model, contracts, relay loop) is re-exported from `ferry-core`; each
//! store and sink is a module behind a cargo feature, so an application that only enqueues
//! into PostgreSQL compiles no broker client.

pub use ferry_core::*;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod sql;

#[cfg(feature = "postgres")]
pub mod postgres;

#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(any(feature = "nats", feature = "kafka"))]
mod template;

#[cfg(feature = "nats")]
pub mod nats;

#[cfg(feature = "kafka")]
pub mod kafka;

#[cfg(feature = "file")]
pub mod file;

#[cfg(feature = "redis-lease")]
pub mod redis_lease;

#[cfg(feature = "etcd-lease")]
pub mod etcd_lease;
