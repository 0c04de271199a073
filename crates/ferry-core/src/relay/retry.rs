//! The relay's one retry loop: a step that talks to the store or the sink is tried until it
//! succeeds, with the config's backoff between attempts, for as long as its bounds allow
//! (the lease lasts, no stop was asked for).

use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::deadline::LeaseDeadline;
use crate::backoff::Backoff;
use crate::error::ErrorChain;

/// Why a worker, or a step it retries, could not go on.
#[derive(Debug)]
pub(super) enum Interrupted {
    /// Graceful stop requested while waiting to retry.
    Stopped,
    /// The lease ran out or was taken: touch nothing more in this partition.
    LeaseLost,
    /// The sink can no longer publish the partition under this lease.
    SinkFenced,
    /// The worker panicked (a bug, in ferry or a driver), logged and counted where it was
    /// caught: like a stop, it leaves the partition to be released unclean and taken over.
    Panicked,
}

/// Why one attempt of a retried step did not succeed.
pub(super) enum Failed<E> {
    /// Worth another attempt after a delay; logged with the delay.
    Retry(E),
    /// No attempt can succeed: give up for this reason.
    Stop(Interrupted),
}

/// A step to retry. Each failure is logged as `what` (with the partition, if set), then the
/// next backoff delay is waited, cut short by the stop token if set, and the lease, if
/// set, is checked before the next attempt. The first attempt checks nothing: a step that
/// must not start on a lapsed lease checks it before.
pub(super) struct Retry<'a> {
    what: &'static str,
    partition: Option<u32>,
    backoff: Backoff,
    stop: Option<&'a CancellationToken>,
    lease: Option<&'a LeaseDeadline>,
}

impl<'a> Retry<'a> {
    pub(super) fn new(what: &'static str, backoff: Backoff) -> Self {
        Self {
            what,
            partition: None,
            backoff,
            stop: None,
            lease: None,
        }
    }

    pub(super) fn in_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Gives up ([`Interrupted::LeaseLost`]) once the lease has run out.
    pub(super) fn while_held(mut self, lease: &'a LeaseDeadline) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Gives up ([`Interrupted::Stopped`]) when `stop` fires while waiting to retry.
    pub(super) fn until(mut self, stop: &'a CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Runs `attempt` until it succeeds, fails with [`Failed::Stop`], or the retry's bounds
    /// end it.
    pub(super) async fn run<
        T,
        E: std::error::Error + 'static,
        F: Future<Output = Result<T, Failed<E>>>,
    >(
        mut self,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, Interrupted> {
        loop {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(Failed::Stop(why)) => return Err(why),
                Err(Failed::Retry(err)) => {
                    let delay = self.backoff.next_delay();
                    let retry_in_ms = delay.as_millis() as u64;
                    match self.partition {
                        Some(partition) => {
                            warn!(partition, error = %ErrorChain(&err), retry_in_ms, "{}", self.what)
                        }
                        None => warn!(error = %ErrorChain(&err), retry_in_ms, "{}", self.what),
                    }
                    wait(delay, self.stop, self.lease).await?;
                }
            }
        }
    }
}

/// Waits `delay`, cut short by `stop` if given; then checks `lease` if given.
pub(super) async fn wait(
    delay: Duration,
    stop: Option<&CancellationToken>,
    lease: Option<&LeaseDeadline>,
) -> Result<(), Interrupted> {
    let slept = match stop {
        Some(stop) => sleep_unless(delay, stop).await,
        None => {
            sleep(delay).await;
            true
        }
    };
    if !slept {
        return Err(Interrupted::Stopped);
    }
    lease.map_or(Ok(()), ensure_held)
}

/// Whether the worker may still touch its partition.
pub(super) fn ensure_held(lease: &LeaseDeadline) -> Result<(), Interrupted> {
    if lease.is_valid() {
        Ok(())
    } else {
        Err(Interrupted::LeaseLost)
    }
}

/// Sleeps for `delay`; returns false if `stop` fired first.
async fn sleep_unless(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = sleep(delay) => true,
        _ = stop.cancelled() => false,
    }
}
