#!/usr/bin/env bash
# A producer of ferry's reliable message service (`ferry serve`), in curl:
#   1. prepare the message (stored, not sent);
#   2. run the local transaction;
#   3. confirm it if the transaction committed, cancel it if it rolled back.
# If this script dies between 1 and 3, the service asks CHECK_URL?id=<id> later and the
# producer answers {"status": "committed" | "rolled_back" | "unknown"}.
#
#   FERRY_URL=http://127.0.0.1:8080 FERRY_PRODUCER_TOKEN=dev-producer-token-change-me \
#     examples/service-producer.sh 42
#
# LOCAL_TRANSACTION is the command standing for the local transaction (default `true`);
# e.g. LOCAL_TRANSACTION='psql -c "UPDATE orders SET status = '"'"'paid'"'"' WHERE id = 42"'.
set -euo pipefail

url=${FERRY_URL:-http://127.0.0.1:8080}
token=${FERRY_PRODUCER_TOKEN:?set FERRY_PRODUCER_TOKEN to a token with the producer scope}
check_url=${CHECK_URL:-http://127.0.0.1:9000/ferry/check}
order=${1:-42}
# The producer chooses the id, so that retrying a prepare after a timeout is safe.
id=$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen | tr 'A-Z' 'a-z')

api() {
  # --retry covers the service restarting; prepare with the same id and body, confirm and
  # cancel are all idempotent.
  curl --fail-with-body --silent --show-error --retry 5 --retry-all-errors --retry-delay 1 \
    -H "Authorization: Bearer $token" "$@"
}

api -X POST "$url/v1/messages" -H 'Content-Type: application/json' -d @- >/dev/null <<JSON
{
  "id": "$id",
  "aggregate_type": "order",
  "aggregate_id": "$order",
  "event_type": "order.paid",
  "payload": {"order": "$order", "status": "paid"},
  "check_url": "$check_url"
}
JSON

if bash -c "${LOCAL_TRANSACTION:-true}"; then
  api -X POST "$url/v1/messages/$id/confirm" >/dev/null
  echo "confirmed $id"
else
  api -X POST "$url/v1/messages/$id/cancel" >/dev/null
  echo "cancelled $id"
fi
