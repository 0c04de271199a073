#!/usr/bin/env bash
# A throwaway certificate authority and a server certificate for 127.0.0.1 and localhost,
# for the TLS endpoints that scripts/services.sh starts and the TLS tests. Also a second,
# unrelated CA ("wrong-ca.pem") that the tests use to check that a server is refused when
# its certificate was not issued by the configured CA. Idempotent: existing files are kept.
#
#   FERRY_TLS_DIR (default /var/lib/ferry-tls): ca.pem, server.pem, server.key, wrong-ca.pem
set -euo pipefail

dir=${FERRY_TLS_DIR:-/var/lib/ferry-tls}
mkdir -p "$dir"
cd "$dir"

if [ ! -s ca.pem ] || [ ! -s ca.key ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
    -subj "/CN=ferry test CA" -keyout ca.key -out ca.pem 2>/dev/null
  rm -f server.pem
fi

if [ ! -s server.pem ] || [ ! -s server.key ]; then
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
    -keyout server.key -out server.csr 2>/dev/null
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -sha256 -extfile server.ext -out server.pem 2>/dev/null
  rm -f server.csr server.ext
fi

if [ ! -s wrong-ca.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
    -subj "/CN=ferry unrelated CA" -keyout wrong-ca.key -out wrong-ca.pem 2>/dev/null
fi

# Throwaway keys: readable by the services' own users (mosquitto, mysql, rabbitmq).
# PostgreSQL insists on a key only its user can read, so it gets its own copy.
chmod 0644 ./*.pem server.key
if id postgres >/dev/null 2>&1; then
  mkdir -p postgres
  cp server.pem server.key postgres/
  chown -R postgres:postgres postgres
  chmod 0600 postgres/server.key
fi
