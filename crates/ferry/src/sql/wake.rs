//! How the relay learns that rows were committed: notified by the database (PostgreSQL's
//! LISTEN/NOTIFY, through a trigger on the outbox table) or by polling alone. The trigger
//! is not free: PostgreSQL serialises the commits of notifying transactions, so producers
//! of one-message transactions commit about twice as fast without it (BENCHMARKS.md
//! sections 12 and 14). `migrate` makes the trigger's presence follow [`Wake`].

use serde::Deserialize;
use tracing::{info, warn};

use ferry_core::StoreError;

use super::dialect::Dialect;
use super::driver::RowExt;
use super::error::store_error;
use super::outbox::Connection;
use super::statement::Statement;

/// `outbox.wake`: how the relay learns of committed rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wake {
    /// Every producing statement notifies the relay, which fetches at once (PostgreSQL;
    /// other SQL databases cannot notify, and their relays poll).
    #[default]
    Notify,
    /// No trigger: producers commit without the notification's serialisation, and the
    /// relay finds new rows at its next poll (`RelayConfig::poll_interval`).
    Poll,
}

/// A dialect's notification trigger on the outbox table; `{p}` is the table prefix.
#[derive(Debug, Clone, Copy)]
pub struct NotifyTrigger {
    /// `→ present`: whether the outbox table has the trigger.
    pub present: &'static str,
    /// Creates it (its function comes with the first migration).
    pub create: &'static str,
    /// Drops it if it is there.
    pub drop: &'static str,
}

/// [`NotifyTrigger`] rendered for a table prefix.
#[derive(Debug)]
pub(crate) struct NotifyTriggerStatements {
    present: Statement,
    create: Statement,
    drop: Statement,
}

impl NotifyTriggerStatements {
    pub(crate) fn new(trigger: NotifyTrigger, render: impl Fn(&str) -> Statement) -> Self {
        Self {
            present: render(trigger.present),
            create: render(trigger.create),
            drop: render(trigger.drop),
        }
    }

    /// Whether the outbox table has the trigger.
    pub(crate) async fn present<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
    ) -> Result<bool, StoreError> {
        let row = self.present.fetch_one::<D>(conn, &[]).await?;
        row.col("present").map_err(store_error::<D>)
    }

    /// Creates or drops the trigger so that it is there exactly when `wake` is
    /// [`Wake::Notify`]. The table is altered (which locks producers out for a moment) only
    /// when its state changes, not at every `migrate`.
    pub(crate) async fn follow<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
        wake: Wake,
    ) -> Result<(), StoreError> {
        let wanted = wake == Wake::Notify;
        if self.present::<D>(conn).await? == wanted {
            return Ok(());
        }
        let change = if wanted { &self.create } else { &self.drop };
        change.execute::<D>(conn, &[]).await?;
        info!(
            database = D::NAME,
            trigger = if wanted { "created" } else { "dropped" },
            ?wake,
            "outbox notify trigger follows outbox.wake"
        );
        Ok(())
    }
}

/// Warns when the table's trigger does not match what the relay was configured with: it
/// was migrated with another `outbox.wake` (`ferry migrate` with this setting fixes it).
pub(crate) fn warn_if_unlike(wake: Wake, trigger_present: bool, table: &str) {
    match (wake, trigger_present) {
        (Wake::Notify, false) => warn!(
            table,
            "outbox.wake = \"notify\", but the table has no notify trigger (it was migrated with outbox.wake = \"poll\"): new rows are found at each poll (relay.poll_interval_ms) until `ferry migrate` runs with this config"
        ),
        (Wake::Poll, true) => warn!(
            table,
            "outbox.wake = \"poll\", but the table still has its notify trigger, which serialises producers' commits: run `ferry migrate` with this config to drop it"
        ),
        _ => {}
    }
}
