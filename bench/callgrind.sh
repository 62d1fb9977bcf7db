#!/usr/bin/env bash
# Instructions per request in the gateway's worker threads, counted by
# callgrind (repeatable on a busy machine, unlike seconds): the release
# binary under `valgrind --tool=callgrind --separate-threads=yes`, wrk at 4
# connections against the built-in mock, counters zeroed after a warm-up.
#
#   bench/callgrind.sh                  # chat; SCRIPT=stream for streamed chat
#
# Prints each busy thread's instructions per request; the store thread's
# share is mostly per commit (every flush_ms), so at this low rate it is
# far above what it costs per request under load. Needs valgrind and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release/tollgate
WORK=$(mktemp -d /tmp/tollgate-cg.XXXXXX)
MOCK_PORT=${MOCK_PORT:-19190}
GW_PORT=${GW_PORT:-19192}
TOKEN=callgrind-admin-$RANDOM$RANDOM
PIDS=()
# KEEP=dir copies the callgrind outputs there (for callgrind_annotate --inclusive=yes).
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [[ -n ${KEEP:-} ]] && mkdir -p "$KEEP" && cp "$WORK"/cg.out* "$KEEP"/; rm -rf "$WORK"' EXIT
for tool in valgrind callgrind_control wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
cargo build --release --quiet
# MOCK_BIN=path runs another mock (one that reads MOCK_PORT, such as the
# outside checks' mock_upstream) instead of the built-in one.
if [[ -n ${MOCK_BIN:-} ]]; then
    MOCK_PORT=$MOCK_PORT "$MOCK_BIN" >"$WORK/mock.log" 2>&1 &
else
    "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16 >"$WORK/mock.log" 2>&1 &
fi
PIDS+=($!)
cat >"$WORK/config.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
[runtime]
mode = "per-core"
[storage]
path = "$WORK/data"
flush_ms = 20
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "MOCK_UPSTREAM_KEY"
models = ["gpt-*"]
[models."gpt-4o-mini"]
input = "0.15"
output = "0.60"
EOF
TOLLGATE_ADMIN_TOKEN=$TOKEN MOCK_UPSTREAM_KEY=sk-mock valgrind --tool=callgrind \
    --separate-threads=yes --callgrind-out-file="$WORK/cg.out" \
    "$BIN" serve --config "$WORK/config.toml" >"$WORK/gw.log" 2>&1 &
GW=$!
PIDS+=($GW)
for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$GW_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.2
done
KEY=$(curl -fs -X POST "http://127.0.0.1:$GW_PORT/api/v1/keys" -H "authorization: Bearer $TOKEN" \
    -H 'content-type: application/json' -d '{"name":"cg","limit":1000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
if [[ ${SCRIPT:-chat} == stream ]]; then
    BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":true}'
else
    BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
fi
cat >"$WORK/req.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.body = '$BODY'
EOF
URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"
wrk -t1 -c4 -d3s -s "$WORK/req.lua" "$URL" >/dev/null
callgrind_control -z "$GW" >/dev/null
N=$(wrk -t1 -c4 -d"${DURATION:-10}"s -s "$WORK/req.lua" "$URL" | awk '/requests in/{print $1}')
callgrind_control -d "$GW" >/dev/null
sleep 0.5
echo "requests: $N"
for f in "$WORK"/cg.out*; do
    total=$(awk '/^(summary|totals):/{print $2; exit}' "$f")
    if [[ -n $total && $total -gt 1000000 ]]; then
        echo "$(basename "$f"): $((total / N)) instructions per request"
    fi
done
