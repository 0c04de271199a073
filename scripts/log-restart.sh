#!/usr/bin/env bash
# Measures how fast a log-capture relay gets back to the head of the log after a restart
# (BENCHMARKS.md section 16), PostgreSQL (127.0.0.1:5434, wal_level = logical) -> NATS:
#
#   cargo build --release -p ferry-cli
#   scripts/log-restart.sh replay     # N one-message transactions, then the relay
#   scripts/log-restart.sh restart    # the relay killed -9 and restarted under load
#
# replay: pgbench commits one-message transactions for SECS seconds at RATE per second
# with no relay running, then `ferry relay` starts; prints when its drain of the table
# ended and when the slot's confirmed position reached the WAL position the producers
# ended at (every transaction re-read and checked), and the database transactions
# committed meanwhile (the relay's queries).
# restart: the relay streams, pgbench commits RATE per second for SECS seconds, the relay
# is killed -9 at a third of them and restarted 10 s later; prints the backlog (rows
# unpublished in the table) and the relay's capture lag every 2 s until 15 s after the
# producers stopped.
#
# Environment: FERRY_BIN (default target/release/ferry), RATE (default 2000 for replay,
# 1500 for restart), SECS (default 10 for replay, 45 for restart), LOG_RESTART_DB
# (default ferry_bench_logrestart, made if missing). Tables, slot, publication and
# stream of the run's fresh prefix are dropped at the end. The relay's log goes to
# /tmp/log-restart-relay.log.
set -euo pipefail
. "$(dirname "$0")/lib/drop-prefix.sh"
mode=${1:?usage: log-restart.sh replay|restart}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${FERRY_BIN:-$root/target/release/ferry}
db=${LOG_RESTART_DB:-ferry_bench_logrestart}
prefix=lr_$(date +%s)_
stream=${prefix^^}
stream=${stream%_}
metrics=127.0.0.1:9479
case $mode in
  replay) rate=${RATE:-2000} secs=${SECS:-10} ;;
  restart) rate=${RATE:-1500} secs=${SECS:-45} ;;
  *) echo "unknown mode $mode: use replay or restart" >&2; exit 2 ;;
esac
sql() { psql -qtA -h 127.0.0.1 -p 5434 -U postgres -d "$db" -c "$1"; }
psql -qtA -h 127.0.0.1 -p 5434 -U postgres -d postgres \
  -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -q -h 127.0.0.1 -p 5434 -U postgres -d postgres -c "CREATE DATABASE \"$db\""

export FERRY_STORE__URL=postgres://postgres@127.0.0.1:5434/$db
export FERRY_OUTBOX__TABLE_PREFIX=$prefix FERRY_OUTBOX__WAKE=poll
export FERRY_SINK__STREAM=$stream FERRY_SINK__SUBJECTS='["'"$prefix"'.>"]'
export FERRY_SINK__SUBJECT_TEMPLATE="$prefix.{aggregate_type}.{event_type}"
export FERRY_METRICS__LISTEN=$metrics FERRY_LOG=${FERRY_LOG:-info}
cfg=$root/examples/postgres-log-nats.toml
"$bin" migrate --config "$cfg" >/dev/null 2>&1
enqueue=$(mktemp)
printf '%s\n' '\set a random(1, 10000)' \
  "SELECT ${prefix}enqueue_bytes('bench', :a::text, 'bench.event', convert_to(repeat('x', 200), 'UTF8'));" >"$enqueue"
produce() {
  pgbench -n -c 8 -j 2 -R "$rate" -T "$secs" -f "$enqueue" -h 127.0.0.1 -p 5434 -U postgres "$db" 2>&1 \
    | grep -E '^tps'
}
start_relay() {
  "$bin" relay --config "$cfg" >>/tmp/log-restart-relay.log 2>&1 &
  relay_pid=$!
}
: >/tmp/log-restart-relay.log
since() { echo "$(date +%s.%N) - $1" | bc; }

cleanup() {
  if [ -n "${relay_pid:-}" ]; then
    kill "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
  fi
  drop_prefix 5434 "$db" "$prefix"
  "${FERRY_TEST_PYTHON:-/opt/ferry-venv/bin/python}" - "$stream" <<'PY' || true
import asyncio, sys
import nats
async def main():
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        await nc.jetstream().delete_stream(sys.argv[1])
    finally:
        await nc.close()
asyncio.run(main())
PY
  rm -f "$enqueue"
}
trap cleanup EXIT

if [ "$mode" = replay ]; then
  produce
  end_lsn=$(sql "SELECT pg_current_wal_lsn()")
  xacts() { sql "SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'"; }
  before=$(xacts)
  echo "backlog $(sql "SELECT count(*) FROM ${prefix}outbox") rows; the slot is $(sql "SELECT pg_wal_lsn_diff('$end_lsn', confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = '${prefix}outbox'") bytes behind"
  start=$(date +%s.%N)
  start_relay
  until [ "$(sql "SELECT pg_wal_lsn_diff('$end_lsn', confirmed_flush_lsn) < 4096 FROM pg_replication_slots WHERE slot_name = '${prefix}outbox'")" = t ]; do
    sleep 0.05
  done
  caught_up=$(since "$start")
  drained=$(date -d "$(grep -m1 'table is drained' /tmp/log-restart-relay.log | cut -c1-26)" +%s.%N)
  printf 'table drained after %.2f s; every re-read transaction confirmed after %.2f s; database transactions meanwhile: %d\n' \
    "$(echo "$drained - $start" | bc)" "$caught_up" $(($(xacts) - before))
else
  start_relay
  until grep -q 'streaming$\|table is drained' /tmp/log-restart-relay.log; do sleep 0.1; done
  start=$(date +%s.%N)
  produce &
  producers=$!
  (
    while :; do
      backlog=$(sql "SELECT count(*) FROM ${prefix}outbox WHERE published_at IS NULL")
      lag=$(curl -s --max-time 0.5 "$metrics/metrics" | awk '/^ferry_capture_lag_seconds/{print $2}' || true)
      printf '%5.1f s  backlog %6d  capture lag %s s\n' "$(since "$start")" "$backlog" "${lag:--}"
      sleep 2
    done
  ) &
  sampler=$!
  sleep "$(echo "$secs / 3" | bc)"
  kill -9 "$relay_pid"
  echo "relay killed -9 at $(since "$start") s"
  sleep 10
  start_relay
  echo "relay restarted at $(since "$start") s"
  wait "$producers"
  sleep 15
  kill "$sampler"
fi
