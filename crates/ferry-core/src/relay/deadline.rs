//! The local view of when a lease runs out, shared by the lease loop (which extends it on
//! every renewal) and the partition's worker (which checks it before touching the
//! partition).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The instant before the last successful renewal was sent, plus the TTL. The store's own
/// expiry is never earlier, so a worker that stops at this deadline stops before another
/// relay can be granted the partition.
#[derive(Debug)]
pub(super) struct LeaseDeadline {
    origin: Instant,
    nanos_after_origin: AtomicU64,
}

impl LeaseDeadline {
    pub(super) fn new(deadline: Instant) -> Self {
        let origin = Instant::now();
        let me = Self {
            origin,
            nanos_after_origin: AtomicU64::new(0),
        };
        me.extend_to(deadline);
        me
    }

    pub(super) fn extend_to(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(self.origin).as_nanos() as u64;
        self.nanos_after_origin.fetch_max(nanos, Ordering::Release);
    }

    pub(super) fn expire(&self) {
        self.nanos_after_origin.store(0, Ordering::Release);
    }

    pub(super) fn is_valid(&self) -> bool {
        let deadline =
            self.origin + Duration::from_nanos(self.nanos_after_origin.load(Ordering::Acquire));
        Instant::now() < deadline
    }
}
