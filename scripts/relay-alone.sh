#!/usr/bin/env bash
# Measures the `ferry relay` daemon alone draining a PostgreSQL backlog (BENCHMARKS.md
# section 6): writes N messages with the SQL producer into tables of a fresh prefix, starts
# the relay, polls the backlog until it is empty, then prints the drain rate, the relay's
# peak memory (VmHWM) and the CPU seconds of the relay, PostgreSQL, nats-server and Redis.
#
#   cargo build --release -p ferry-cli --features kafka
#   scripts/relay-alone.sh examples/postgres-nats.toml 1000000
#
# Environment: FERRY_BIN (default target/release/ferry), FERRY_* config overrides passed to
# the relay, PERF=1 to record `perf record` of the relay into /tmp/perf.data for
# PERF_SECS (default 3) seconds with PERF_CALL_GRAPH (default fp; dwarf for release builds,
# which have no frame pointers), RELAY_ALONE_DB (default test): the database of the
# PostgreSQL at 127.0.0.1 (user postgres) that psql and the relay use, whatever the
# config's store URL says. Tables are dropped afterwards. PROGRESS_EVERY=M (e.g. 1000000)
# also prints the drain rate of each M messages marked (the outbox's deleted plus updated
# rows in pg_stat_user_tables: a /metrics scrape of the relay reads the backlog's status,
# a scan of a 10M-row outbox on the relay's own pool), and the outbox's table and
# index sizes and pg_stat_user_tables row before and after the drain (issue 16 §4).
# RELAY_ALONE_PORT (default 5432): the PostgreSQL's port (127.0.0.1:5434 is the one with
# wal_level = logical); its CPU is that cluster's postmaster and backends only.
# RELAY_ALONE_PER_TX=K writes the messages in transactions of K (default: all in one).
# RELAY_ALONE_FILL=during (for capture.mode = "log"): starts the relay first, waits until it
# streams, then writes the messages, so that they reach it through the log; a backlog
# written before the relay starts is published by the log relay's poll-path drain
# (crates/ferry-core/src/relay/capture.rs). The rate is then counted from the last commit
# when everything was one transaction, else from the first write. The relay's log goes to
# /tmp/relay-alone.log. The slot and publication of the run's prefix are dropped at the end.
# RELAY_ALONE_NAIVE=1 runs crates/ferry-bench/naive_poller.py (issue 16's naive Python
# poller, with the venv's Python: FERRY_TEST_PYTHON, default /opt/ferry-venv/bin/python)
# on the same backlog instead of `ferry relay` ("relay" below is then the poller).
set -euo pipefail
. "$(dirname "$0")/lib/drop-prefix.sh"
cfg=$1
n=$2
bin=${FERRY_BIN:-$(dirname "$0")/../target/release/ferry}
prefix=ra_$(date +%s)_
db=${RELAY_ALONE_DB:-test}
port=${RELAY_ALONE_PORT:-5432}
fill=${RELAY_ALONE_FILL:-before}
per_tx=${RELAY_ALONE_PER_TX:-$n}
export FERRY_OUTBOX__TABLE_PREFIX=$prefix FERRY_LOG=${FERRY_LOG:-error}
export FERRY_STORE__URL=postgres://postgres@127.0.0.1:$port/$db
sql() { psql -q -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
# CPU ticks of the processes named $1, with their reaped children's (the postmaster's
# cutime/cstime keep the time of backends that exited between the two samples).
ticks() {
  local total=0 pid used
  for pid in $(pgrep -x "$1"); do
    used=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + used))
  done
  echo "$total"
}
# The same for one PostgreSQL cluster: its postmaster (with its reaped backends) and the
# backends alive now.
pg_ticks() {
  local postmaster total used child
  postmaster=$(head -1 "$(sql -tA -c 'SHOW data_directory')/postmaster.pid")
  total=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$postmaster/stat")
  for child in $(pgrep -P "$postmaster"); do
    used=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$child/stat" 2>/dev/null || echo 0)
    total=$((total + used))
  done
  echo "$total"
}
field() { echo "$1" | awk -v k="$2" '{print $k}'; }

"$bin" migrate --config "$cfg" >/dev/null
# Redis streams of an earlier run hold entry ids this run's sequences would collide with.
if command -v redis-cli >/dev/null; then
  redis-cli --scan --pattern 'ferry.bench.*' | xargs -r redis-cli del >/dev/null
fi
# A NATS stream holding earlier runs' messages (and their ids in the duplicate window)
# makes the next drain slower: purge the configured stream first.
stream=$(sed -n 's/^stream *= *"\(.*\)"/\1/p' "$cfg" | head -1)
if [ -n "$stream" ] && grep -q '^type *= *"nats"' "$cfg"; then
  python3 - "$stream" <<'PY'
import socket, sys
with socket.create_connection(("127.0.0.1", 4222), timeout=10) as s:
    s.sendall(f"CONNECT {{}}\r\nSUB _INBOX.purge 1\r\nPUB $JS.API.STREAM.PURGE.{sys.argv[1]} _INBOX.purge 0\r\n\r\n".encode())
    reply = b""
    while b"purged" not in reply and b"error" not in reply:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
PY
fi
# The SQL producer: N messages over 10,000 aggregates, in transactions of per_tx.
fill_outbox() {
  sql -c "DO \$\$BEGIN FOR i IN 0..($n - 1) / $per_tx LOOP PERFORM count(*) FROM generate_series(i * $per_tx + 1, least((i + 1) * $per_tx, $n)) g, LATERAL ${prefix}enqueue_bytes('bench', (g % 10000)::text, 'bench.event', convert_to(repeat('x', 200), 'UTF8')); COMMIT; END LOOP; END\$\$" >/dev/null
}
if [ "$fill" = before ]; then
  fill_outbox
fi

# The outbox's sizes and what (auto)vacuum and analyze did to it so far.
table_report() {
  sql -c "SELECT pg_size_pretty(pg_table_size('${prefix}outbox')) AS heap_and_toast, pg_size_pretty(pg_indexes_size('${prefix}outbox')) AS indexes, n_live_tup, n_dead_tup, seq_scan, idx_scan, n_tup_del, vacuum_count, autovacuum_count, analyze_count, autoanalyze_count, last_autovacuum, last_autoanalyze FROM pg_stat_user_tables WHERE relname = '${prefix}outbox'"
  sql -c "SELECT indexrelname, pg_size_pretty(pg_relation_size(indexrelid)) AS size, idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE relname = '${prefix}outbox' ORDER BY indexrelname"
}
if [ -n "${PROGRESS_EVERY:-}" ]; then
  echo "before the drain:"
  table_report
fi

# The backend that wrote the backlog is reaped by the postmaster (its CPU joining the
# postmaster's cutime) shortly after psql exits: let that happen before the first sample.
sleep 1
if [ "$fill" = during ]; then
  FERRY_LOG=info "$bin" relay --config "$cfg" >/tmp/relay-alone.log 2>&1 &
  relay=$!
  until grep -q "the table is drained; streaming" /tmp/relay-alone.log; do
    kill -0 "$relay" || { cat /tmp/relay-alone.log; exit 1; }
    sleep 0.2
  done
fi
pg0=$(pg_ticks) nats0=$(ticks nats-server) redis0=$(ticks redis-server)
relay0=0
if [ "$fill" = during ]; then relay0=$(awk '{print $14 + $15}' "/proc/$relay/stat"); fi
stat0=$(head -1 /proc/stat)
start=$(date +%s.%N)
if [ "$fill" = during ]; then
  fill_outbox
  committed=$(date +%s.%N)
  echo "written: $n messages in transactions of $per_tx, $(python3 -c "import sys; s, e, n = map(float, sys.argv[1:]); print(f'{e - s:.2f} s, {n / (e - s):,.0f} msg/s')" "$start" "$committed" "$n")"
  # One transaction reaches the relay only at its commit: count (time and CPU) from there.
  if [ "$per_tx" -ge "$n" ]; then
    start=$committed stat0=$(head -1 /proc/stat)
    pg0=$(pg_ticks) nats0=$(ticks nats-server) redis0=$(ticks redis-server)
    relay0=$(awk '{print $14 + $15}' "/proc/$relay/stat")
  fi
elif [ -n "${RELAY_ALONE_NAIVE:-}" ]; then
  "${FERRY_TEST_PYTHON:-/opt/ferry-venv/bin/python}" "$(dirname "$0")/../crates/ferry-bench/naive_poller.py" \
    --pg-url "$FERRY_STORE__URL" --table "${prefix}outbox" --stream "$stream" &
  relay=$!
else
  "$bin" relay --config "$cfg" &
  relay=$!
fi
if [ -n "${PROGRESS_EVERY:-}" ]; then
  (
    step=$PROGRESS_EVERY next=$PROGRESS_EVERY last_t=$start last_n=0
    while [ "$next" -le "$n" ] && kill -0 "$relay" 2>/dev/null; do
      marked=$(sql -tA -c "SELECT n_tup_del + n_tup_upd FROM pg_stat_user_tables WHERE relname = '${prefix}outbox'")
      now=$(date +%s.%N)
      if [ -n "$marked" ] && [ "${marked%.*}" -ge "$next" ]; then
        python3 -c "import sys; n, t, ln, lt, s = map(float, sys.argv[1:]); print(f'progress: {int(n):,} marked at {t - s:.1f} s, {(n - ln) / (t - lt):,.0f} msg/s since {int(ln):,}')" "${marked%.*}" "$now" "$last_n" "$last_t" "$start"
        last_n=${marked%.*} last_t=$now
        while [ "$next" -le "$last_n" ]; do next=$((next + step)); done
      fi
      sleep 0.5
    done
  ) &
fi
if [ -n "${PERF:-}" ]; then
  perf record -F 499 --call-graph "${PERF_CALL_GRAPH:-fp}" -p "$relay" -o /tmp/perf.data -- sleep "${PERF_SECS:-3}" >/dev/null 2>&1 &
fi
# The probe walks the relay's own partial index to its first entry: a count(*) of the table
# at each probe would cost PostgreSQL more CPU than the drain it measures. It asks one psql
# session every 0.1 s: a psql and a backend started for each probe cost the box ~3% of the
# drain's CPU, and probing every 0.5 s added 0.25 s to a drain on average.
pending="SELECT count(*) FROM (SELECT 1 FROM ${prefix}outbox WHERE published_at IS NULL ORDER BY partition_no, sequence LIMIT 1) AS head;"
coproc PROBE { sql -tA; }
probe_in=${PROBE[1]} probe_out=${PROBE[0]}
while echo "$pending" >&"$probe_in" && read -r head <&"$probe_out" && [ "$head" != 0 ]; do
  sleep 0.1
done
end=$(date +%s.%N)
exec {probe_in}>&-
[ "$head" = 0 ] || {
  kill "$relay"
  echo "the probe's psql session ended before the outbox was empty" >&2
  exit 1
}
stat1=$(head -1 /proc/stat)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$relay/status")
relay_ticks=$(($(awk '{print $14 + $15}' "/proc/$relay/stat") - relay0))
pg=$(($(pg_ticks) - pg0)) nats=$(($(ticks nats-server) - nats0)) redis=$(($(ticks redis-server) - redis0))
kill "$relay"
wait "$relay" || true
wait
idle=$(($(field "$stat1" 5) - $(field "$stat0" 5)))
if [ -n "${PROGRESS_EVERY:-}" ]; then
  echo "after the drain:"
  table_report
fi
drop_prefix "$port" "$db" "$prefix"
python3 - "$cfg" "$n" "$start" "$end" "$hwm" "$relay_ticks" "$pg" "$nats" "$redis" "$idle" <<'PY'
import sys
cfg, n, start, end, hwm, relay, pg, nats, redis, idle = sys.argv[1:]
secs = float(end) - float(start)
print(f"{cfg}: {int(n):,} drained in {secs:.2f} s, {int(n) / secs:,.0f} msg/s, relay VmHWM "
      f"{int(hwm) / 1024:.1f} MiB; CPU s relay {int(relay) / 100:.2f} / PostgreSQL {int(pg) / 100:.2f} "
      f"/ nats-server {int(nats) / 100:.2f} / redis {int(redis) / 100:.2f}; box idle {int(idle) / 100:.2f} CPU-s")
PY
