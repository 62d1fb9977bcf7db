#!/usr/bin/env bash
# Load bench: the same chat requests against the mock upstream directly,
# against nginx as a bare reverse proxy in front of it, and against Tollgate
# in front of it (keys, limits, metering and usage records all on), on
# loopback, on this machine, in one run.
#
#   bench/load.sh                      # as root the first time: installs wrk and nginx
#   DURATION=20 bench/load.sh          # seconds per measurement (default 10)
#
# For each target and load (non-streamed chat, streamed chat with 16
# chunks, and `messages`: an Anthropic Messages stream of 16 text deltas
# with pings and cache reads, through a `kind = "anthropic"` upstream) at
# 32 connections (wrk -t2) and at 1 connection (wrk -t1) it
# prints requests/s, p50 and p99 latency (wrk --latency), and the CPU time
# per request of the proxy process alone (utime+stime from /proc/PID/stat
# before and after; nginx: master + workers), and for Tollgate the store
# thread's share. The mock, wrk and the proxy share the machine's cores, as
# they would in any single-box comparison: compare the columns, not the
# absolute numbers across machines.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
MOCK_PORT=${MOCK_PORT:-19090}
NGINX_PORT=${NGINX_PORT:-19091}
GW_PORT=${GW_PORT:-19092}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/tollgate
WORK=$(mktemp -d /tmp/tollgate-load.XXXXXX)
ADMIN_TOKEN=load-bench-admin-$RANDOM$RANDOM$RANDOM
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [[ -f $WORK/nginx.pid ]]; then
        kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*" >&2; }

# --- tools ------------------------------------------------------------------
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
    say "installing wrk and nginx from Debian's packages"
    if [[ $(id -u) -ne 0 ]]; then
        echo "wrk or nginx is missing: run this script as root once, or: apt-get install -y wrk nginx-light" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq wrk nginx-light >/dev/null 2>&1 || apt-get install -y -qq wrk nginx >/dev/null
fi
for tool in wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done

say "building tollgate (release)"
cargo build --release --quiet
[[ -x $BIN ]] || { echo "no binary at $BIN" >&2; exit 1; }

wait_for() { # url
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing answers at $1" >&2
    exit 1
}

# --- the three targets --------------------------------------------------------
say "starting the mock upstream on 127.0.0.1:$MOCK_PORT"
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16 >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
wait_for "http://127.0.0.1:$MOCK_PORT/v1/models"

say "starting nginx (worker_processes 2, keepalive pool, proxy_buffering off) on 127.0.0.1:$NGINX_PORT"
mkdir -p "$WORK/nginx-tmp"
cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
nginx -p "$WORK" -c "$WORK/nginx.conf"
wait_for "http://127.0.0.1:$NGINX_PORT/v1/models"
NGINX_PID=$(cat "$WORK/nginx.pid")

say "starting tollgate (release, per-core) on 127.0.0.1:$GW_PORT"
cat >"$WORK/tollgate.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
[runtime]
mode = "per-core"
workers = 0
[storage]
path = "$WORK/data"
flush_ms = 50
[admin]
token_env = "LOAD_BENCH_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["demo-*"]
[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["claude-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
max_output_tokens = 256
[models."claude-sonnet-4-5"]
input = "3"
cache_write = "3.75"
cache_read = "0.30"
output = "15"
max_output_tokens = 256
EOF
LOAD_BENCH_ADMIN_TOKEN=$ADMIN_TOKEN TOLLGATE_LOG=warn \
    "$BIN" serve --config "$WORK/tollgate.toml" >"$WORK/tollgate.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for "http://127.0.0.1:$GW_PORT/healthz"
# A key with a limit (big enough for the run): reservation and settlement
# run on every request.
CREATED=$(curl -fsS -X POST "http://127.0.0.1:$GW_PORT/api/v1/keys" \
    -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{"name":"load bench","limit":"1000000"}')
KEY=$(printf '%s' "$CREATED" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
KEY_HASH=$(printf '%s' "$CREATED" | sed -n 's/.*"hash":"\([^"]*\)".*/\1/p')
[[ -n $KEY ]] || { echo "could not create a key: $CREATED" >&2; exit 1; }
STORE_TID=""
for task in /proc/"$GW_PID"/task/*; do
    if [[ $(cat "$task/comm" 2>/dev/null) == tollgate-store ]]; then
        STORE_TID=${task##*/}
    fi
done

# --- measuring ----------------------------------------------------------------
cat >"$WORK/chat.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TG_KEY")
wrk.body = '{"model":"demo-chat","messages":[{"role":"user","content":"Say hello to the gateway."}]}'
EOF
cat >"$WORK/stream.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TG_KEY")
wrk.body = '{"model":"demo-chat","stream":true,"messages":[{"role":"user","content":"Say hello to the gateway."}]}'
EOF
cat >"$WORK/messages.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = os.getenv("TG_KEY")
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-mock-cache-read-tokens"] = "4"
wrk.body = '{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hello to the gateway."}]}'
EOF
export TG_KEY=$KEY

# The API path of a load.
path_of() {
    case $1 in messages) echo /v1/messages ;; *) echo /v1/chat/completions ;; esac
}

TICK=$(getconf CLK_TCK)

# utime+stime (ticks) of one process or thread: /proc/PID/stat fields 14 and
# 15, counted after the ")" that ends the command name.
ticks_of() {
    local stat
    stat=$(cat "$1" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}

# CPU ticks of a target's proxy process(es); the mock directly: none.
proxy_ticks() {
    case $1 in
    mock) echo 0 ;;
    nginx)
        local total=0 pid
        for pid in $NGINX_PID $(cat /proc/"$NGINX_PID"/task/*/children 2>/dev/null); do
            total=$((total + $(ticks_of /proc/"$pid"/stat)))
        done
        echo "$total" ;;
    tollgate) ticks_of /proc/"$GW_PID"/stat ;;
    esac
}

store_ticks() {
    if [[ -n $STORE_TID ]]; then ticks_of /proc/"$GW_PID"/task/"$STORE_TID"/stat; else echo 0; fi
}

# wrk's latency text (e.g. 45.12us, 1.20ms, 2.00s) in µs.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) u = n; else if (v ~ /ms$/) u = n * 1000;
        else if (v ~ /m$/) u = n * 60e6; else if (v ~ /s$/) u = n * 1e6; else u = n
        printf "%.0f", u }'
}

port_of() {
    case $1 in mock) echo "$MOCK_PORT" ;; nginx) echo "$NGINX_PORT" ;; tollgate) echo "$GW_PORT" ;; esac
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

measure() { # target load conns
    local target=$1 load=$2 conns=$3 threads=$THREADS url out
    if ((conns < threads)); then threads=$conns; fi
    url="http://127.0.0.1:$(port_of "$target")$(path_of "$load")"
    local p0 s0 p1 s1
    p0=$(proxy_ticks "$target"); s0=$(store_ticks)
    out=$(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency -s "$WORK/$load.lua" "$url")
    p1=$(proxy_ticks "$target"); s1=$(store_ticks)
    local requests rps p50 p99 cpu store
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
        echo "warning: $target $load c$conns: $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')" >&2
    fi
    if [[ $target == mock ]]; then
        cpu="-"
    else
        cpu=$(awk -v t=$((p1 - p0)) -v hz="$TICK" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    fi
    if [[ $target == tollgate && -n $STORE_TID ]]; then
        store=$(awk -v t=$((s1 - s0)) -v hz="$TICK" -v n="$requests" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    else
        store="-"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$load" "$conns" "$rps" "$p50" "$p99" "$cpu" "$store" >>"$RESULTS"
    printf '  %-8s %-8s c%-3s %8s req/s  p50 %6s µs  p99 %6s µs  cpu/req %6s µs  store/req %s µs\n' \
        "$target" "$load" "$conns" "$rps" "$p50" "$p99" "$cpu" "$store" >&2
}

for target in mock nginx tollgate; do
    say "$target (${DURATION}s per measurement)"
    for load in chat stream messages; do
        url="http://127.0.0.1:$(port_of "$target")$(path_of "$load")"
        wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s "$WORK/$load.lua" "$url" >/dev/null
        measure "$target" "$load" "$CONNS"
        measure "$target" "$load" 1
    done
done

# Metering was on: the key was charged for what went through Tollgate.
sleep 0.2
USAGE=$(curl -fsS "http://127.0.0.1:$GW_PORT/api/v1/keys/$KEY_HASH" -H "authorization: Bearer $ADMIN_TOKEN" |
    sed -n 's/.*"usage":"\{0,1\}\([0-9.]*\).*/\1/p')
RECORDS=$(curl -fsS "http://127.0.0.1:$GW_PORT/metrics" | awk '/^tollgate_store_records_total/ { print $2 }')

# --- the table ------------------------------------------------------------------
echo
echo "Load bench: $(nproc) cores, wrk -t$THREADS -d${DURATION}s (-t1 at 1 connection), $(nginx -v 2>&1 | sed 's/.*: //'), tollgate $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "Tollgate: per-core, keys + limit + metering + usage records on; key charged ${USAGE:-?} USD over ${RECORDS:-?} usage records."
echo
printf '%-10s %-8s %5s %10s %9s %9s %12s %14s\n' target load conns "req/s" "p50 µs" "p99 µs" "CPU µs/req" "store µs/req"
printf '%-10s %-8s %5s %10s %9s %9s %12s %14s\n' ---------- -------- ----- ---------- --------- --------- ------------ --------------
sort -t$'\t' -k2,2 -k3,3nr -s "$RESULTS" | while IFS=$'\t' read -r target load conns rps p50 p99 cpu store; do
    printf '%-10s %-8s %5s %10s %9s %9s %12s %14s\n' "$target" "$load" "$conns" "$rps" "$p50" "$p99" "$cpu" "$store"
done
echo
echo "Added latency at 1 connection (p50, proxy − mock direct):"
for load in chat stream messages; do
    mock50=$(awk -F'\t' -v l="$load" '$1 == "mock" && $2 == l && $3 == 1 { print $5 }' "$RESULTS")
    for target in nginx tollgate; do
        t50=$(awk -F'\t' -v l="$load" -v t="$target" '$1 == t && $2 == l && $3 == 1 { print $5 }' "$RESULTS")
        printf '  %-7s %-9s +%s µs\n' "$load" "$target" "$((t50 - mock50))"
    done
done
echo "Tollgate vs nginx requests/s at $CONNS connections:"
for load in chat stream messages; do
    n=$(awk -F'\t' -v l="$load" -v c="$CONNS" '$1 == "nginx" && $2 == l && $3 == c { print $4 }' "$RESULTS")
    g=$(awk -F'\t' -v l="$load" -v c="$CONNS" '$1 == "tollgate" && $2 == l && $3 == c { print $4 }' "$RESULTS")
    awk -v l="$load" -v n="$n" -v g="$g" 'BEGIN { printf "  %-7s %.0f%%\n", l, 100 * g / n }'
done
