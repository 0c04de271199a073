#!/usr/bin/env bash
# Builds the `ferry` binary exactly as the container image does: deploy/Dockerfile runs
# this script, and scripts/check-deploy.sh runs it too (with FERRY_PROFILE=dev, reusing
# the workspace's target), so the image's build step is checked without a container engine.
#
#   FERRY_FEATURES  ferry-cli's cargo features; default "etcd-lease". Add "kafka" for the
#                   Kafka sink (builds librdkafka from source: a C toolchain, several minutes).
#                   Every other store and sink (PostgreSQL, MySQL, SQLite, Redis, NATS,
#                   RabbitMQ, MQTT, webhook, file) is always built in.
#   FERRY_PROFILE   cargo profile: release (default) or dev.
#
# Prints the path of the binary it built.
set -euo pipefail
cd "$(dirname "$0")/.."

features=${FERRY_FEATURES-etcd-lease}
profile=${FERRY_PROFILE:-release}
case $profile in
  dev) dir=debug ;;
  *) dir=$profile ;;
esac
if [[ " $features " == *" etcd-lease "* ]] && ! command -v protoc >/dev/null; then
  echo "build.sh: the etcd-lease feature needs protoc (Debian: apt-get install protobuf-compiler)" >&2
  exit 1
fi

cargo build --locked --profile "$profile" -p ferry-cli --bin ferry --features "$features" >&2
echo "${CARGO_TARGET_DIR:-target}/$dir/ferry"
