//! The statements the PostgreSQL store runs, with `{p}` for the table prefix.

pub(super) const ENQUEUE: &str = "SELECT message_id, message_version, message_partition, message_sequence \
     FROM {p}enqueue_bytes($1, $2, $3, $4, $5, $6, $7)";

pub(super) const PARTITIONS: &str = "SELECT value FROM {p}meta WHERE key = 'partitions'";

/// Opens the transaction [`FETCH`] runs in. Only an ordered index scan reads a partition's
/// head without touching the rest of its backlog; with sorting off, a plan made from
/// missing or stale statistics (an outbox filled since autovacuum last analysed it) cannot
/// read and sort the whole partition for every batch instead, as PostgreSQL otherwise
/// does for the first executions on each connection.
pub(super) const FETCH_BEGIN: &str = "BEGIN READ ONLY; SET LOCAL enable_sort = off";

/// `{cols}` is `sql::OUTBOX_COLUMNS`.
pub(super) const FETCH: &str = "SELECT {cols} FROM {p}outbox \
     WHERE partition_no = $1 AND published_at IS NULL ORDER BY sequence LIMIT $2";

/// The fenced mark: the lease row is updated (and so locked) only if the lease is current
/// (`{fence}`), and rows change only if it was. `{mark}` deletes or stamps them.
pub(super) const MARK: &str = "WITH lease AS ( \
         UPDATE {p}leases SET checkpoint = greatest(checkpoint, $4) \
         WHERE partition_no = $1 AND {fence} RETURNING 1 \
     ), marked AS ( \
         {mark} AND EXISTS (SELECT 1 FROM lease) RETURNING 1 \
     ) SELECT (SELECT count(*) FROM lease) AS leased, (SELECT count(*) FROM marked) AS marked";

pub(super) const MARK_DELETE: &str =
    "DELETE FROM {p}outbox WHERE partition_no = $1 AND id = ANY($3)";

pub(super) const MARK_KEEP: &str = "UPDATE {p}outbox SET published_at = now() \
     WHERE partition_no = $1 AND id = ANY($3) AND published_at IS NULL";

pub(super) const SET_BLOCKED: &str =
    "UPDATE {p}leases SET blocked_reason = $3 WHERE partition_no = $1 AND {fence}";

/// `{fence}` of leases granted by this store: epoch `$2` is current and unexpired.
pub(super) const FENCE_OWN_LEASE: &str = "epoch = $2 AND expires_at > now()";

/// `{fence}` of adopted leases: epoch `$2` held by `{owner}` (the statement's owner
/// parameter) is the adopted one. Expiry is the lease backend's business: a newer owner
/// adopts before it touches anything, which moves the epoch on.
pub(super) const FENCE_ADOPTED_LEASE: &str = "epoch = $2 AND owner = {owner}";

/// Raises the fencing epoch to `$2` for owner `$3`, never lowering it; returns the
/// checkpoint, or no row when a newer epoch (or another owner of `$2`) is there. A new
/// epoch clears the previous owner's blocked reason: the new owner records it again if
/// the message still fails.
pub(super) const ADOPT: &str = "UPDATE {p}leases \
     SET owner = $3, epoch = $2, \
         blocked_reason = CASE WHEN epoch = $2 THEN blocked_reason END \
     WHERE partition_no = $1 AND (epoch < $2 OR (epoch = $2 AND owner = $3)) \
     RETURNING checkpoint";

pub(super) const HIGHEST_EPOCH: &str = "SELECT coalesce(max(epoch), 0) FROM {p}leases";

pub(super) const STATUS: &str = "SELECT l.partition_no, \
         CASE WHEN l.expires_at > now() THEN l.owner END AS owner, l.epoch, \
         CASE WHEN l.expires_at > now() THEN l.expires_at END AS expires_at, l.blocked_reason, \
         coalesce(o.backlog, 0) AS backlog, \
         extract(epoch FROM now() - o.oldest)::float8 AS oldest_age_secs \
     FROM {p}leases l LEFT JOIN ( \
         SELECT partition_no, count(*) AS backlog, min(created_at) AS oldest \
         FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no \
     ) o USING (partition_no) ORDER BY l.partition_no";

pub(super) const PURGE: &str = "DELETE FROM {p}outbox WHERE sequence IN ( \
         SELECT sequence FROM {p}outbox \
         WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)";

/// Upserts our heartbeat, forgets relays dead for an hour, counts the live ones (the
/// upsert is not visible to the count's snapshot, hence `+ 1` and `<> $1`).
pub(super) const HEARTBEAT: &str = "WITH me AS ( \
         INSERT INTO {p}relays (relay_id, expires_at) VALUES ($1, now() + make_interval(secs => $2)) \
         ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at RETURNING 1 \
     ), forgotten AS ( \
         DELETE FROM {p}relays WHERE expires_at < now() - interval '1 hour' RETURNING 1 \
     ) SELECT count(*) + 1 FROM {p}relays WHERE expires_at > now() AND relay_id <> $1";

/// Grants free or expired partitions (random order spreads relays that start together);
/// `old` holds the previous values, which say how the partition was left.
pub(super) const ACQUIRE: &str = "UPDATE {p}leases AS l \
     SET owner = $1, epoch = old.epoch + 1, \
         expires_at = now() + make_interval(secs => $3), clean = false \
     FROM ( \
         SELECT partition_no, epoch, expires_at, clean, checkpoint FROM {p}leases \
         WHERE owner IS NULL OR expires_at <= now() \
         ORDER BY random() LIMIT $2 FOR UPDATE SKIP LOCKED \
     ) AS old \
     WHERE l.partition_no = old.partition_no \
     RETURNING l.partition_no, l.epoch, old.clean AS previous_clean, \
         greatest(extract(epoch FROM now() - old.expires_at), 0)::float8 AS since_expiry_secs, \
         old.checkpoint";

pub(super) const RENEW: &str = "UPDATE {p}leases AS l \
     SET expires_at = now() + make_interval(secs => $4) \
     FROM unnest($1::int4[], $2::int8[]) AS held(partition_no, epoch) \
     WHERE l.partition_no = held.partition_no AND l.epoch = held.epoch \
       AND l.owner = $3 AND l.expires_at > now() \
     RETURNING l.partition_no";

pub(super) const RELEASE: &str = "UPDATE {p}leases \
     SET owner = NULL, expires_at = least(expires_at, now()), clean = $3 \
     WHERE partition_no = $1 AND epoch = $2";

pub(super) const LEAVE: &str = "DELETE FROM {p}relays WHERE relay_id = $1";

pub(super) const INBOX_RECORD: &str = "INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1";

pub(super) const INBOX_LAST_VERSION: &str = "SELECT version FROM {p}inbox_versions \
     WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3";

/// Advances only upwards; a concurrent consumer that advanced first makes this a no-op.
pub(super) const INBOX_ADVANCE: &str = "INSERT INTO {p}inbox_versions AS v (consumer, aggregate_type, aggregate_id, version) \
     VALUES ($1, $2, $3, $4) \
     ON CONFLICT (consumer, aggregate_type, aggregate_id) \
     DO UPDATE SET version = excluded.version WHERE v.version < excluded.version RETURNING 1";
