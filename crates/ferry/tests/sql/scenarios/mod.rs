//! The behaviours every SQL dialect must have, each an `async fn` generic over the
//! dialect that `main.rs` runs as a test of each.

pub(crate) mod enqueue;
pub(crate) mod inbox;
pub(crate) mod leases;
pub(crate) mod marks;
pub(crate) mod operations;
pub(crate) mod relay;
pub(crate) mod schema;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod servers;
