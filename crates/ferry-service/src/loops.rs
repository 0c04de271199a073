//! The service's background work besides check-backs: noticing what the relay published
//! (confirmed → delivered), redelivering or dead-lettering what was not acknowledged in
//! time, and purging finished messages past retention.
//!
//! "Delivered" is read from the outbox itself, not from a hook in the relay: a confirmed
//! message whose outbox row is gone (or marked published) was published, whichever relay
//! did it (the one in this process or a separate `ferry relay`), and the check is one
//! indexed statement per poll. A message is therefore reported delivered up to one
//! `poll_interval` after its publish; its ack deadline starts then.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use ferry::ErrorChain;
use ferry::StoreError;
use ferry::backoff::Backoff;

use crate::config::ServiceSettings;
use crate::metrics::Metrics;
use crate::store::ServiceStore;

/// Messages moved per statement; a full batch is followed at once by the next.
const BATCH: u32 = 500;

/// How often finished messages past retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Runs delivery detection, redelivery and the purge until `shutdown`.
pub(crate) async fn run(
    store: Arc<dyn ServiceStore>,
    settings: ServiceSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.poll_interval, Duration::from_secs(30));
    let mut wait = Duration::ZERO;
    let mut next_purge = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let round = async {
            let busy = mark_delivered(&*store, &settings, &metrics).await?
                | redeliver(&*store, &settings, &metrics).await?;
            if Instant::now() >= next_purge {
                next_purge = Instant::now() + PURGE_INTERVAL;
                let purged = store.purge_finished(settings.finished_retention).await?;
                if purged > 0 {
                    info!(purged, "purged finished messages past retention");
                }
            }
            Ok::<bool, StoreError>(busy)
        };
        wait = match round.await {
            Ok(busy) => {
                backoff.reset();
                if busy {
                    Duration::ZERO
                } else {
                    settings.poll_interval
                }
            }
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(error = %ErrorChain(&err), retry_in_ms = delay.as_millis() as u64, "service maintenance failed");
                delay
            }
        };
    }
}

/// Returns whether a full batch was moved (more may be waiting).
async fn mark_delivered(
    store: &dyn ServiceStore,
    settings: &ServiceSettings,
    metrics: &Metrics,
) -> Result<bool, StoreError> {
    let ids = store.mark_delivered(BATCH, &settings.ack).await?;
    if !ids.is_empty() {
        metrics.count_delivered(ids.len());
        debug!(count = ids.len(), "messages delivered");
    }
    Ok(ids.len() == BATCH as usize)
}

async fn redeliver(
    store: &dyn ServiceStore,
    settings: &ServiceSettings,
    metrics: &Metrics,
) -> Result<bool, StoreError> {
    let round = store.redeliver_due(BATCH, &settings.ack).await?;
    for id in &round.redelivered {
        info!(message_id = %id, "not acknowledged in time: redelivering");
    }
    for id in &round.dead_lettered {
        warn!(message_id = %id, max_deliveries = settings.ack.max_deliveries, "not acknowledged after the last delivery: dead-lettered until an operator retries it");
    }
    metrics.count_redelivered(round.redelivered.len());
    metrics.count_dead_lettered(round.dead_lettered.len());
    Ok(round.redelivered.len() == BATCH as usize || round.dead_lettered.len() == BATCH as usize)
}
