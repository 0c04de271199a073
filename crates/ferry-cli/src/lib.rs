//! What the `ferry` binary and `ferry-bench` share: the config file ([`config`]), turning
//! it into a store, leases and a sink ([`wiring`]), the process's logging and span export
//! ([`telemetry`]), its shutdown ([`process`]), its metrics and health endpoints
//! ([`health`]), its web dashboard ([`dashboard`]) and its async runtime ([`runtime`]).
//!
//! Errors are `anyhow`'s: this library is the binaries' own start-up path, not an API for
//! applications (those use the `ferry` crate).

pub mod config;
pub mod dashboard;
pub mod health;
pub mod process;
pub mod runtime;
pub mod telemetry;
pub mod wiring;
