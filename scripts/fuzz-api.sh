#!/usr/bin/env bash
# Fuzzes `ferry serve`'s HTTP API from its OpenAPI document with schemathesis (PyPI):
# every check (`--checks all`: no 5xx, responses as documented, valid requests accepted,
# invalid ones refused, auth enforced), against a `ferry serve` on a throwaway SQLite file.
# Exits non-zero on any failure. Extra arguments go to `schemathesis run`
# (e.g. `--max-examples 200`, `--seed 1`).
#
#   scripts/fuzz-api.sh
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv-tool.sh
schemathesis=$(venv_tool schemathesis 4.32.5)

export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo build -q -p ferry-cli --bin ferry
ferry=${CARGO_TARGET_DIR:-target}/debug/ferry

work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token=fuzz-admin-token-$RANDOM$RANDOM$RANDOM
# Check-backs go to the producers' check_url: schemathesis makes up hosts, so the run
# ends long before any prepared message is due (prepare_timeout_secs).
cat >"$work/ferry.toml" <<TOML
[store]
type = "sqlite"
path = "$work/fuzz.db"
[sink]
type = "file"
path = "$work/published.jsonl"
[service]
listen = "127.0.0.1:$port"
prepare_timeout_secs = 86400
[[service.tokens]]
name = "fuzz"
token_env = "FERRY_FUZZ_TOKEN"
scopes = ["admin"]
TOML

"$ferry" migrate --config "$work/ferry.toml" >/dev/null
FERRY_FUZZ_TOKEN=$token "$ferry" serve --config "$work/ferry.toml" 2>"$work/serve.log" &
serve_pid=$!
cleanup() {
  kill "$serve_pid" 2>/dev/null || true
  wait "$serve_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done

status=0
# From the work directory: schemathesis keeps its example database in ./.schemathesis.
(cd "$work" && "$schemathesis" run "http://127.0.0.1:$port/v1/openapi.json" \
  --checks all --header "Authorization: Bearer $token" \
  --wait-for-schema 10 --no-color "$@") || status=$?
if grep -q "panicked" "$work/serve.log"; then
  grep -B2 -A10 "panicked" "$work/serve.log"
  echo "fuzz-api: ferry serve panicked" >&2
  status=1
fi
exit "$status"
