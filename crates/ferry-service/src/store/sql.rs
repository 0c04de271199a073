//! [`SqlServiceStore`]: the service's store over ferry's SQL outbox, for any
//! [`ServiceDialect`]. It shares the outbox's pool and transactions: a confirmation enqueues
//! into the outbox in the transaction that moves the message, a redelivery requeues it
//! there through the outbox's own API.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use ferry::StoreError;
use ferry::sql::{Arg, RowExt, Schema, SqlOutbox, Statement, store_error};

use super::dialect::ServiceDialect;
use super::row::read_record;
use super::{
    AckPolicy, CheckClaim, ListQuery, Moved, Prepare, Prepared, Record, Redelivered,
    SCHEMA_VERSION_KEY, ServiceStore, Stats, TRANSITIONS, corrupt, dead_letter_reason,
    enqueue_error, prepared_before, refused, stats_from_rows, status_names, to_u32,
    transition_assignments,
};
use crate::state::{Status, Transition};

/// Rows deleted per statement by the retention purge.
const PURGE_BATCH: i64 = 5000;

type Row<D> = <<D as ferry::sql::Dialect>::Db as sqlx::Database>::Row;

/// The service's statements, rendered once for the outbox's dialect and prefix.
#[derive(Debug)]
struct Statements {
    prepare: Statement,
    get: Statement,
    transitions: Vec<(Transition, Statement)>,
    set_version: Statement,
    list: Statement,
    claim_checks: Statement,
    check_retry: Statement,
    check_failed: Statement,
    mark_delivered: Statement,
    dead_letter: Statement,
    redeliver: Statement,
    purge: Statement,
    stats: Statement,
}

impl Statements {
    fn new<D: ServiceDialect>(outbox: &SqlOutbox<D>) -> Self {
        let list_columns =
            D::RECORD_COLUMNS.replace("payload,", &format!("{} AS payload,", D::NULL_PAYLOAD));
        let r = |text: &str| {
            outbox.render(
                &text
                    .replace("{cols}", D::RECORD_COLUMNS)
                    .replace("{list_cols}", &list_columns),
            )
        };
        let q = D::SERVICE_QUERIES;
        Self {
            prepare: r(q.prepare),
            get: r(q.get),
            transitions: TRANSITIONS
                .into_iter()
                .map(|t| {
                    let text = q
                        .transition
                        .replace("{target}", t.target().as_str())
                        .replace("{assign}", transition_assignments(t));
                    (t, r(&text))
                })
                .collect(),
            set_version: r(q.set_version),
            list: r(q.list),
            claim_checks: r(q.claim_checks),
            check_retry: r(q.check_retry),
            check_failed: r(q.check_failed),
            mark_delivered: r(q.mark_delivered),
            dead_letter: r(q.dead_letter),
            redeliver: r(q.redeliver),
            purge: r(q.purge),
            stats: r(q.stats),
        }
    }

    fn transition(&self, transition: Transition) -> &Statement {
        self.transitions
            .iter()
            .find(|(t, _)| *t == transition)
            .map(|(_, statement)| statement)
            .expect("a statement is rendered for every transition")
    }
}

/// The service's messages in a SQL database, next to the outbox's tables (same prefix).
#[derive(Debug)]
pub struct SqlServiceStore<D: ServiceDialect> {
    outbox: Arc<SqlOutbox<D>>,
    statements: Statements,
}

impl<D: ServiceDialect> SqlServiceStore<D> {
    pub fn new(outbox: Arc<SqlOutbox<D>>) -> Self {
        let statements = Statements::new(&outbox);
        Self { outbox, statements }
    }

    /// The service's table as a versioned schema beside ferry's.
    fn schema() -> Schema {
        Schema {
            name: "ferry service",
            version_key: SCHEMA_VERSION_KEY,
            migrations: D::SERVICE_MIGRATIONS,
        }
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<D::Db>, StoreError> {
        self.outbox.pool().acquire().await.map_err(store_error::<D>)
    }

    /// Requeues `record` in the caller's transaction: the same id and version, its
    /// delivery attempt in the headers.
    async fn requeue(
        &self,
        conn: &mut ferry::sql::Connection<D>,
        record: &Record,
    ) -> Result<(), StoreError> {
        let version = record
            .version
            .ok_or_else(|| corrupt(record.id, "redelivery of a message without a version"))?;
        self.outbox
            .requeue(conn, record.new_message()?, version)
            .await
            .map_err(|err| enqueue_error(record.id, err))?;
        Ok(())
    }

    async fn records(
        &self,
        statement: &Statement,
        args: &[Arg<'_>],
    ) -> Result<Vec<Record>, StoreError> {
        statement
            .fetch_all::<D>(&mut *self.conn().await?, args)
            .await?
            .iter()
            .map(read_record::<D>)
            .collect()
    }
}

#[async_trait]
impl<D: ServiceDialect> ServiceStore for SqlServiceStore<D> {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.outbox.migrate_schema(&Self::schema(), &[]).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.outbox
            .render("SELECT 1")
            .execute::<D>(&mut *self.conn().await?, &[])
            .await?;
        Ok(())
    }

    async fn prepare(
        &self,
        prepare: &Prepare,
        check_after: Duration,
    ) -> Result<Prepared, StoreError> {
        let inserted = self
            .statements
            .prepare
            .fetch_optional::<D>(
                &mut *self.conn().await?,
                &[
                    Arg::Id(prepare.id),
                    Arg::Text(&prepare.aggregate_type),
                    Arg::Text(&prepare.aggregate_id),
                    Arg::Text(&prepare.event_type),
                    Arg::Bytes(&prepare.payload),
                    Arg::Headers(&prepare.headers),
                    Arg::OptText(prepare.partition_key.as_deref()),
                    Arg::Text(&prepare.check_url),
                    millis(check_after),
                ],
            )
            .await?;
        if let Some(row) = inserted {
            return Ok(Prepared::Created(read_record::<D>(&row)?));
        }
        prepared_before(prepare, self.get(prepare.id).await?)
    }

    async fn transition(
        &self,
        id: Uuid,
        transition: Transition,
        from: &[Status],
        reason: &str,
    ) -> Result<Moved, StoreError> {
        let statuses = status_array(from);
        let mut tx = self.outbox.begin_write().await?;
        let moved = self
            .statements
            .transition(transition)
            .fetch_optional::<D>(&mut tx, &[Arg::Id(id), Arg::Text(&statuses), reason.into()])
            .await?;
        let Some(row) = moved else {
            drop(tx);
            return refused(self, id).await;
        };
        let mut record = read_record::<D>(&row)?;
        match transition {
            Transition::Confirm => {
                let enqueued = self
                    .outbox
                    .enqueue(&mut tx, record.new_message()?)
                    .await
                    .map_err(|err| enqueue_error(id, err))?;
                let version = i64::try_from(enqueued.version)
                    .map_err(|_| corrupt(id, "version too large"))?;
                self.statements
                    .set_version
                    .execute::<D>(&mut tx, &[Arg::Id(id), version.into()])
                    .await?;
                record.version = Some(enqueued.version);
            }
            Transition::RetryDelivery => self.requeue(&mut tx, &record).await?,
            Transition::Cancel | Transition::Ack | Transition::RetryCheck => {}
        }
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(Moved::Moved(record))
    }

    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError> {
        Ok(self
            .records(&self.statements.get, &[Arg::Id(id)])
            .await?
            .pop())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let statuses = status_array(&query.statuses);
        self.records(
            &self.statements.list,
            &[
                Arg::Text(&statuses),
                Arg::OptId(query.after),
                query.limit.into(),
            ],
        )
        .await
    }

    async fn claim_check_backs(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<CheckClaim>, StoreError> {
        let mut tx = self.outbox.begin_write().await?;
        let rows = self
            .statements
            .claim_checks
            .fetch_all::<D>(&mut tx, &[limit.into(), millis(claim_for)])
            .await?;
        tx.commit().await.map_err(store_error::<D>)?;
        rows.iter()
            .map(|row| {
                let id: Uuid = row.col("id").map_err(store_error::<D>)?;
                let checks: i64 = row.col("checks").map_err(store_error::<D>)?;
                Ok(CheckClaim {
                    id,
                    check_url: row.col("check_url").map_err(store_error::<D>)?,
                    checks: to_u32(id, "checks", checks)?,
                })
            })
            .collect()
    }

    async fn check_inconclusive(
        &self,
        claim: &CheckClaim,
        retry_in: Option<Duration>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let claimed = [Arg::Id(claim.id), claim.checks.into()];
        let mut conn = self.conn().await?;
        let changed = match retry_in {
            Some(delay) => {
                self.statements
                    .check_retry
                    .execute::<D>(
                        &mut conn,
                        &[claimed[0], claimed[1], millis(delay), reason.into()],
                    )
                    .await?
            }
            None => {
                self.statements
                    .check_failed
                    .execute::<D>(&mut conn, &[claimed[0], claimed[1], reason.into()])
                    .await?
            }
        };
        Ok(changed > 0)
    }

    async fn mark_delivered(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.outbox.begin_write().await?;
        let rows = self
            .statements
            .mark_delivered
            .fetch_all::<D>(
                &mut tx,
                &[
                    limit.into(),
                    millis(policy.ack_timeout),
                    millis(policy.ack_timeout_max),
                ],
            )
            .await?;
        tx.commit().await.map_err(store_error::<D>)?;
        ids::<D>(&rows)
    }

    async fn redeliver_due(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Redelivered, StoreError> {
        let max_deliveries = policy.max_deliveries.into();
        let reason = dead_letter_reason(policy);
        let mut tx = self.outbox.begin_write().await?;
        let dead_lettered = self
            .statements
            .dead_letter
            .fetch_all::<D>(
                &mut tx,
                &[max_deliveries, limit.into(), reason.as_str().into()],
            )
            .await?;
        let due = self
            .statements
            .redeliver
            .fetch_all::<D>(&mut tx, &[max_deliveries, limit.into()])
            .await?;
        let mut redelivered = Vec::with_capacity(due.len());
        for row in &due {
            let record = read_record::<D>(row)?;
            self.requeue(&mut tx, &record).await?;
            redelivered.push(record.id);
        }
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(Redelivered {
            redelivered,
            dead_lettered: ids::<D>(&dead_lettered)?,
        })
    }

    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let mut purged = 0;
        loop {
            let deleted = self
                .statements
                .purge
                .execute::<D>(&mut conn, &[millis(older_than), Arg::Int(PURGE_BATCH)])
                .await?;
            purged += deleted;
            if deleted < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let rows = self
            .statements
            .stats
            .fetch_all::<D>(&mut *self.conn().await?, &[])
            .await?;
        let rows = rows
            .iter()
            .map(|row| -> Result<(String, i64, Option<f64>), sqlx::Error> {
                Ok((
                    row.col("status")?,
                    row.col("count")?,
                    row.col("oldest_age_secs")?,
                ))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error::<D>)?;
        stats_from_rows(rows)
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> Arg<'static> {
    Arg::Int(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
}

/// The statuses as the JSON array the statements read.
fn status_array(statuses: &[Status]) -> String {
    serde_json::Value::from(status_names(statuses)).to_string()
}

/// The `id` column of each row.
fn ids<D: ServiceDialect>(rows: &[Row<D>]) -> Result<Vec<Uuid>, StoreError> {
    rows.iter()
        .map(|row| row.col("id"))
        .collect::<Result<_, _>>()
        .map_err(store_error::<D>)
}
