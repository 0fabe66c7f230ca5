#!/usr/bin/env bash
# The README's walk-through with curl: send events, read features, predict, recommend, post an outcome,
# list models. Every step prints "## step" and then the JSON answer on one line; the script stops with a
# non-zero exit at the first answer that is not a 2xx (curl --fail-with-body prints rtml's error JSON).
#
#   RTML_INGEST_URL    default http://127.0.0.1:8001
#   RTML_FEATURES_URL  default http://127.0.0.1:8002
#   RTML_SERVING_URL   default http://127.0.0.1:8003
#   RTML_FEEDBACK_URL  default http://127.0.0.1:8004
#   RTML_API_KEY       optional; sent as "Authorization: Bearer KEY" (needs scopes ingest, predict, read)
#   RTML_USER_ID       default u1; RTML_ITEM_ID default t9
#
# jq is optional: used to pick prediction_id when present, else sed.
set -euo pipefail
shopt -s inherit_errexit

INGEST="${RTML_INGEST_URL:-http://127.0.0.1:8001}"
FEATURES="${RTML_FEATURES_URL:-http://127.0.0.1:8002}"
SERVING="${RTML_SERVING_URL:-http://127.0.0.1:8003}"
FEEDBACK="${RTML_FEEDBACK_URL:-http://127.0.0.1:8004}"
USER_ID="${RTML_USER_ID:-u1}"
ITEM_ID="${RTML_ITEM_ID:-t9}"

# Identifiers go into JSON and URLs below unescaped: keep them to a safe alphabet.
for value in "$USER_ID" "$ITEM_ID"; do
  if [[ ! "$value" =~ ^[A-Za-z0-9._:-]+$ ]]; then
    echo "RTML_USER_ID / RTML_ITEM_ID may hold only letters, digits and . _ : - (got '$value')" >&2
    exit 2
  fi
done

curl_args=(--silent --show-error --fail-with-body --connect-timeout 2 --max-time 10
           -H 'accept: application/json')
if [ -n "${RTML_API_KEY:-}" ]; then
  # Through a config on stdin rather than argv, so the key does not show in `ps`.
  auth_config="header = \"Authorization: Bearer ${RTML_API_KEY}\""
else
  auth_config=""
fi

rtml() {  # rtml METHOD URL [JSON]: one call, the answer on stdout followed by a newline
  local method="$1" url="$2" body="${3:-}"
  local args=("${curl_args[@]}" -X "$method" --config -)
  if [ -n "$body" ]; then
    args+=(-H 'content-type: application/json' --data-binary "$body")
  fi
  local rc=0
  printf '%s\n' "$auth_config" | curl "${args[@]}" "$url" || rc=$?
  echo
  if [ "$rc" -ne 0 ]; then
    echo "$method $url failed (curl exit $rc)" >&2
  fi
  return "$rc"
}

event_id() {  # a fresh id per event: resending the same batch (a retry) then counts once
  if [ -r /proc/sys/kernel/random/uuid ]; then cat /proc/sys/kernel/random/uuid
  else printf 'ev-%s-%s-%s\n' "$(date +%s)" "$$" "$RANDOM$RANDOM"; fi
}

echo "## 1. send events"
rtml POST "$INGEST/v1/events" "{\"events\": [
  {\"event_id\": \"$(event_id)\", \"type\": \"view\",  \"user_id\": \"$USER_ID\", \"item_id\": \"$ITEM_ID\"},
  {\"event_id\": \"$(event_id)\", \"type\": \"click\", \"user_id\": \"$USER_ID\", \"item_id\": \"$ITEM_ID\"},
  {\"event_id\": \"$(event_id)\", \"type\": \"view\",  \"user_id\": \"${USER_ID}-2\", \"item_id\": \"$ITEM_ID\"}]}"

sleep 0.2  # features are applied a few milliseconds after the 202

echo "## 2. read features"
rtml GET "$FEATURES/v1/features/user/$USER_ID"
rtml GET "$FEATURES/v1/features/item/$ITEM_ID"
rtml GET "$FEATURES/v1/features/user_item/${USER_ID}%7C${ITEM_ID}"

echo "## 3. predict"
prediction="$(rtml POST "$SERVING/v1/predict" \
  "{\"model\": \"ctr\", \"entities\": {\"user_id\": \"$USER_ID\", \"item_id\": \"$ITEM_ID\"}}")" \
  || { echo "$prediction"; exit 1; }
echo "$prediction"
if command -v jq >/dev/null 2>&1; then
  prediction_id="$(jq -er '.prediction_id' <<<"$prediction")"
else
  prediction_id="$(sed -n 's/.*"prediction_id":"\([^"]*\)".*/\1/p' <<<"$prediction")"
fi
if [ -z "$prediction_id" ]; then
  echo "no prediction_id in: $prediction" >&2
  exit 1
fi

echo "## 4. recommend"
rtml POST "$SERVING/v1/recommend" \
  "{\"user_id\": \"$USER_ID\", \"candidates\": [\"$ITEM_ID\", \"t4\", \"t7\"], \"k\": 2}"

echo "## 5. post an outcome"
rtml POST "$FEEDBACK/v1/outcomes" "{\"prediction_id\": \"$prediction_id\", \"label\": 1}"

echo "## 6. models"
rtml GET "$SERVING/v1/models"
rtml GET "$FEEDBACK/v1/models/ctr/quality"
