//! ferry: a transactional outbox and inbox that keeps its promise across crashes,
//! failovers and concurrent relays: no loss, no duplicates in effect, no reordering per key.
//!
//! The core (message model, contracts, relay loop) is re-exported from `ferry-core`; each
//! store and sink is a module behind a cargo feature, so an application that only enqueues
//! into PostgreSQL compiles no broker client.

pub use ferry_core::*;

pub mod tls;

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub mod sql;

#[cfg(feature = "postgres")]
pub mod postgres;

#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(feature = "mysql")]
pub mod mysql;

#[cfg(any(
    feature = "nats",
    feature = "kafka",
    feature = "mqtt",
    feature = "webhook",
    feature = "redis-stream",
    feature = "amqp"
))]
mod template;

#[cfg(any(
    feature = "mqtt",
    feature = "webhook",
    feature = "redis-stream",
    feature = "amqp"
))]
pub mod sink_config;

#[cfg(feature = "nats")]
pub mod nats;

#[cfg(feature = "kafka")]
pub mod kafka;

#[cfg(feature = "mqtt")]
pub mod mqtt;

#[cfg(feature = "webhook")]
pub mod webhook;

#[cfg(feature = "redis-stream")]
pub mod redis_stream;

#[cfg(feature = "amqp")]
pub mod amqp;

#[cfg(feature = "file")]
pub mod file;

#[cfg(feature = "redis-lease")]
pub mod redis_lease;

#[cfg(feature = "etcd-lease")]
pub mod etcd_lease;

#[cfg(feature = "redis-store")]
pub mod redis_store;

/// Trace context from and to OpenTelemetry spans (`tracing-opentelemetry`).
#[cfg(feature = "otel")]
pub mod otel;
