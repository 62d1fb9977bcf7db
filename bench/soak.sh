#!/usr/bin/env bash
# Soak: the release gateway in front of the mock upstream under constant wrk
# load (non-streamed chat, one metered key) for DURATION seconds. Every 15 s
# it prints resident memory, usage records written, the data directory's
# size and requests/s; at the end, the slope of resident memory over the
# second half (least squares, MB per million requests and MB per minute).
#
#   bench/soak.sh                      # 600 s; as root the first time: installs wrk
#   DURATION=1800 bench/soak.sh        # the 30-minute run of issue 17
#   CACHE_MB=32 CONNS=32 bench/soak.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-15}
CONNS=${CONNS:-32}
CACHE_MB=${CACHE_MB:-64}
MOCK_PORT=${MOCK_PORT:-19190}
GW_PORT=${GW_PORT:-19192}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/tollgate
WORK=$(mktemp -d /tmp/tollgate-soak.XXXXXX)
ADMIN_TOKEN=soak-bench-admin-$RANDOM$RANDOM$RANDOM$RANDOM
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '== %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
    [[ $(id -u) -eq 0 ]] || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

if [[ -z ${NO_BUILD:-} ]]; then
    say "building tollgate (release)"
    cargo build --release --quiet --bin tollgate
fi
[[ -x $BIN ]] || { echo "no binary at $BIN" >&2; exit 1; }

wait_for() { # url
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing answers at $1" >&2
    exit 1
}

"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=("$!")
wait_for "http://127.0.0.1:$MOCK_PORT/v1/models"

cat >"$WORK/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[storage]
path = "$WORK/data"
flush_ms = 50
cache_mb = $CACHE_MB
[admin]
token_env = "SOAK_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
max_output_tokens = 256
TOML
SOAK_ADMIN_TOKEN=$ADMIN_TOKEN TOLLGATE_LOG=warn \
    "$BIN" serve --config "$WORK/tollgate.toml" >"$WORK/tollgate.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for "http://127.0.0.1:$GW_PORT/healthz"

CREATED=$(curl -sS -X POST "http://127.0.0.1:$GW_PORT/api/v1/keys" \
    -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{"name":"soak","limit":1000000,"rpm":1000000000,"concurrency":100000}')
KEY=$(printf '%s' "$CREATED" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
[[ -n $KEY ]] || { echo "could not create a key: $CREATED" >&2; exit 1; }

cat >"$WORK/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TG_KEY")
wrk.body = '{"model":"demo-chat","messages":[{"role":"user","content":"Say hello to the gateway."}]}'
LUA

rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' /proc/"$GW_PID"/status; }
records() { curl -fsS "http://127.0.0.1:$GW_PORT/metrics" | awk '$1 == "tollgate_store_records_total" { print $2 }'; }
disk_mb() { du -sm "$WORK/data" | awk '{ print $1 }'; }

say "load: wrk -t1 -c$CONNS for ${DURATION}s, sample every ${INTERVAL}s"
TG_KEY=$KEY wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/chat.lua" \
    "http://127.0.0.1:$GW_PORT/v1/chat/completions" >"$WORK/wrk.out" 2>&1 &
WRK_PID=$!
PIDS+=("$WRK_PID")

printf '%8s %10s %12s %9s %10s\n' "t_s" "rss_mb" "records" "disk_mb" "req_s"
START=$(date +%s)
last_t=0 last_r=$(records)
: >"$WORK/samples"
while kill -0 "$WRK_PID" 2>/dev/null; do
    sleep "$INTERVAL"
    kill -0 "$WRK_PID" 2>/dev/null || break
    t=$(($(date +%s) - START))
    r=$(records)
    rss=$(rss_mb)
    rate=$(( (r - last_r) / (t - last_t > 0 ? t - last_t : 1) ))
    printf '%8d %10s %12d %9s %10d\n' "$t" "$rss" "$r" "$(disk_mb)" "$rate"
    echo "$t $rss $r" >>"$WORK/samples"
    last_t=$t last_r=$r
done
wait "$WRK_PID" || true

# Least-squares slope of RSS over the samples of the second half, against
# records (MB per million) and against time (MB per minute).
awk -v half=$((DURATION / 2)) '
    $1 >= half { n++; x += $3; y += $2; xx += $3 * $3; xy += $3 * $2; t += $1; tt += $1 * $1; ty += $1 * $2
                 if ($2 > peak) peak = $2 }
    { if ($2 > allpeak) allpeak = $2 }
    END {
        if (n < 2) { print "too few samples for a slope"; exit }
        sr = (n * xy - x * y) / (n * xx - x * x)
        st = (n * ty - t * y) / (n * tt - t * t)
        printf "second half: %d samples, RSS slope %.3f MB per million records, %.3f MB per minute; peak RSS %.1f MB\n", n, sr * 1e6, st * 60, allpeak
    }' "$WORK/samples"
grep -E "Requests/sec|requests in" "$WORK/wrk.out" || true

# Recovery: kill -9 the loaded gateway and time a restart on the same data
# directory until it answers /readyz (open must not read the records).
RECS=$(records)
kill -9 "$GW_PID" 2>/dev/null || true
wait "$GW_PID" 2>/dev/null || true
T0=$(date +%s%N)
SOAK_ADMIN_TOKEN=$ADMIN_TOKEN TOLLGATE_LOG=warn \
    "$BIN" serve --config "$WORK/tollgate.toml" >>"$WORK/tollgate.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for "http://127.0.0.1:$GW_PORT/readyz"
T1=$(date +%s%N)
printf 'restart after kill -9 on %d records (%s MB on disk): ready in %d ms\n' \
    "$RECS" "$(disk_mb)" $(( (T1 - T0) / 1000000 ))
