#!/usr/bin/env bash
# ferry's whole test suite, from a fresh machine: starts PostgreSQL and NATS if they are
# down, makes a clean test database, installs cargo-nextest if missing, runs every test
# (unit, integration against the real services, crash and fencing end-to-end tests).
# Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh

export FERRY_TEST_PG_URL=${FERRY_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/ferry_test}
export FERRY_TEST_NATS_URL=${FERRY_TEST_NATS_URL:-nats://127.0.0.1:4222}
export FERRY_TEST_KAFKA_BROKERS=${FERRY_TEST_KAFKA_BROKERS:-127.0.0.1:9092}
export FERRY_TEST_KAFKA_TXN_BROKERS=${FERRY_TEST_KAFKA_TXN_BROKERS:-127.0.0.1:9192}
export FERRY_TEST_PYTHON=${FERRY_TEST_PYTHON:-${FERRY_SERVICES_VENV:-/opt/ferry-venv}/bin/python}
export FERRY_TEST_NOIDA_DB=${FERRY_TEST_NOIDA_DB:-${FERRY_SERVICES_VENV:-/opt/ferry-venv}/bin/noida-db}
# Tests leave their tables behind on failure; start each run from an empty database.
db=${FERRY_TEST_PG_URL##*/}
psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" \
  -c "CREATE DATABASE \"$db\""
# Log capture: the PostgreSQL cluster with wal_level = logical (scripts/services.sh, 5434).
export FERRY_TEST_PG_LOGICAL_URL=${FERRY_TEST_PG_LOGICAL_URL:-postgres://postgres@127.0.0.1:5434/ferry_test}
logicaldb=${FERRY_TEST_PG_LOGICAL_URL##*/}
psql -q -h 127.0.0.1 -p 5434 -U postgres -d postgres \
  -c "DROP DATABASE IF EXISTS \"$logicaldb\" WITH (FORCE)" -c "CREATE DATABASE \"$logicaldb\""
export FERRY_TEST_MYSQL_URL=${FERRY_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/ferry_test}
mydb=${FERRY_TEST_MYSQL_URL##*/}
mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS \`$mydb\`; CREATE DATABASE \`$mydb\`"
# The TLS endpoints of scripts/services.sh and the throwaway CA that issued their
# certificates (end_to_end_tls); MariaDB with TLS is a second server on 3307.
export FERRY_TEST_TLS_DIR=${FERRY_TEST_TLS_DIR:-${FERRY_TLS_DIR:-/var/lib/ferry-tls}}
export FERRY_TEST_MYSQL_TLS_URL=${FERRY_TEST_MYSQL_TLS_URL:-mysql://root@127.0.0.1:3307/ferry_test}
mytlsdb=${FERRY_TEST_MYSQL_TLS_URL##*/}
mysql -h 127.0.0.1 -P 3307 -u root -e "DROP DATABASE IF EXISTS \`$mytlsdb\`; CREATE DATABASE \`$mytlsdb\`"
# MariaDB with a row-format binlog (log-based capture) is a third server on 3308.
export FERRY_TEST_MYSQL_BINLOG_URL=${FERRY_TEST_MYSQL_BINLOG_URL:-mysql://root@127.0.0.1:3308/ferry_test}
mybinlogdb=${FERRY_TEST_MYSQL_BINLOG_URL##*/}
mysql -h 127.0.0.1 -P 3308 -u root -e "DROP DATABASE IF EXISTS \`$mybinlogdb\`; CREATE DATABASE \`$mybinlogdb\`"
# ... and a fourth with both TLS and a binlog on 3309 (the binlog connection over TLS).
export FERRY_TEST_MYSQL_BINLOG_TLS_URL=${FERRY_TEST_MYSQL_BINLOG_TLS_URL:-mysql://root@127.0.0.1:3309/ferry_test}
mybinlogtlsdb=${FERRY_TEST_MYSQL_BINLOG_TLS_URL##*/}
mysql -h 127.0.0.1 -P 3309 -u root -e "DROP DATABASE IF EXISTS \`$mybinlogtlsdb\`; CREATE DATABASE \`$mybinlogtlsdb\`"

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --all-features --profile ci "$@"
