//! A check every dialect's unit tests run: each statement renders with no placeholder
//! left and uses exactly the arguments the generic code binds (`$1` to `$n`, each at least
//! once), so a statement that skips or adds an argument fails without a database.

use std::collections::BTreeSet;

use super::dialect::{Dialect, Enqueue, InboxQueries};
use super::{Statement, TablePrefix};

pub(crate) fn check<D: Dialect>() {
    let q = D::QUERIES;
    let mut statements = vec![
        ("meta_create", q.meta_create, 0),
        ("meta_read", q.meta_read, 1),
        ("meta_write", q.meta_write, 2),
        ("leases_create", q.leases_create, 1),
        ("outbox_requeue", q.outbox_requeue, 9),
        ("outbox_unkeep", q.outbox_unkeep, 1),
        ("fetch", q.fetch, 2),
        ("lease_check", q.lease_check, 4),
        ("mark_delete", q.mark_delete, 2),
        ("mark_keep", q.mark_keep, 2),
        ("unpublished", q.unpublished, 2),
        ("blocked_set", q.blocked_set, 4),
        ("retry_take", q.retry_take, 3),
        ("retry_request", q.retry_request, 1),
        ("blocked_list", q.blocked_list, 0),
        ("park_aggregate", q.park_aggregate, 5),
        ("outbox_delete_aggregate", q.outbox_delete_aggregate, 3),
        ("outbox_partition_of", q.outbox_partition_of, 1),
        ("park_one", q.park_one, 3),
        ("outbox_delete_one", q.outbox_delete_one, 1),
        ("parked_list", q.parked_list, 4),
        ("parked_get", q.parked_get, 1),
        ("parked_requeue", q.parked_requeue, 2),
        ("parked_delete_aggregate", q.parked_delete_aggregate, 2),
        ("purge_inbox", q.purge_inbox, 2),
        ("purge_parked", q.purge_parked, 2),
        ("retained_page", q.retained_page, 8),
        ("retained_summary", q.retained_summary, 7),
        ("adopt", q.adopt, 3),
        ("checkpoint_read", q.checkpoint_read, 1),
        ("epoch_highest", q.epoch_highest, 0),
        ("status", q.status, 0),
        ("purge", q.purge, 2),
        ("relay_heartbeat", q.relay_heartbeat, 2),
        ("relays_forget", q.relays_forget, 0),
        ("relays_live", q.relays_live, 0),
        ("leases_free", q.leases_free, 1),
        ("lease_grant", q.lease_grant, 4),
        ("lease_renew", q.lease_renew, 4),
        ("lease_release", q.lease_release, 4),
        ("relay_leave", q.relay_leave, 1),
    ];
    match D::ENQUEUE {
        Enqueue::Routine(call) => statements.push(("enqueue", call, 7)),
        Enqueue::Statements { bump, insert } => {
            statements.push(("version_bump", bump, 2));
            statements.push(("outbox_insert", insert, 9));
        }
    }
    match D::INBOX {
        InboxQueries::Routine(call) => statements.push(("inbox_admit", call, 5)),
        InboxQueries::Statements {
            record,
            last_version,
            advance,
        } => statements.extend([
            ("inbox_record", record, 5),
            ("inbox_last_version", last_version, 3),
            ("inbox_advance", advance, 4),
        ]),
    }
    let optional = [
        ("migration_lock", D::MIGRATION_LOCK, 1),
        ("migration_session", D::MIGRATION_SESSION, 0),
        ("fetch_begin", D::FETCH_BEGIN, 0),
    ];
    statements.extend(
        optional
            .into_iter()
            .filter_map(|(name, text, arity)| text.map(|text| (name, text, arity))),
    );
    if let Some(trigger) = D::NOTIFY_TRIGGER {
        statements.extend([
            ("notify_trigger_present", trigger.present, 0),
            ("notify_trigger_create", trigger.create, 0),
            ("notify_trigger_drop", trigger.drop, 0),
        ]);
    }
    let prefix = TablePrefix::default();
    for fence in [
        "epoch = $2 AND owner = $3 AND expires_at > {now}",
        "epoch = $2 AND owner = $3",
    ] {
        let fills = super::outbox::fills::<D>(&prefix, &[("{fence}", fence)]);
        for (name, text, arity) in &statements {
            let rendered = Statement::render(text, &fills, super::Placeholders::Dollar, None);
            let sql = rendered.sql();
            assert!(
                !sql.contains('{'),
                "{}: {name} keeps a placeholder: {sql}",
                D::NAME
            );
            let used = parameters(sql);
            let expected: BTreeSet<u8> = (1..=*arity).collect();
            assert_eq!(used, expected, "{}: {name} uses {used:?}: {sql}", D::NAME);
        }
    }
}

/// The `$n` parameters `sql` uses.
fn parameters(sql: &str) -> BTreeSet<u8> {
    sql.split('$')
        .skip(1)
        .filter_map(|after| {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}
