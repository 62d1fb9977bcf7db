#!/usr/bin/env bash
# Cluster bench: one node, then three nodes over one throwaway PostgreSQL
# (initdb in a temp dir, loopback port), in front of the built-in mock
# upstream, on this machine. Non-streamed chat with a key whose account
# has plenty of credit, so every request reserves against a lease and
# settles into the database's batches.
#
#   bench/cluster.sh                          # builds the release binary
#   DURATION=20 CONNS=48 bench/cluster.sh     # seconds per run, connections in all
#   BIN=target/debug/tollgate DURATION=2 bench/cluster.sh   # check the script itself
#
# For each setup it prints requests/s (all nodes together; with three nodes
# wrk runs one process per node, CONNS/3 connections each), the CPU time per
# request of all gateway processes together and of PostgreSQL (utime+stime
# from /proc/PID/stat before and after; PostgreSQL: the postmaster and its
# children), and the database round trips per 1,000 requests from the
# nodes' `tollgate_cluster_db_roundtrips_total` (by kind, after the last
# batch is written). The nodes, PostgreSQL, the mock and wrk share the
# machine's cores: three nodes on one box measure the cost of the cluster
# (CPU and round trips per request), not its scale-out.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-30}
MOCK_PORT=${MOCK_PORT:-19290}
PG_PORT=${PG_PORT:-19291}
BASE_PORT=${BASE_PORT:-19300}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /tmp/tollgate-cluster.XXXXXX)
ADMIN_TOKEN=cluster-bench-admin-$RANDOM$RANDOM$RANDOM
PIDS=()
PG_CTL=""

say() { printf '\n== %s\n' "$*" >&2; }

# PostgreSQL's tools run as `postgres` when we are root (initdb refuses root).
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -n $PG_CTL ]]; then
        as_pg "$PG_CTL" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is required (apt-get install -y wrk curl python3)" >&2; exit 1; }
done
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[[ -x $PG_BIN/initdb ]] || { echo "PostgreSQL is required (apt-get install -y postgresql), or set PG_BIN" >&2; exit 1; }
PG_CTL=$PG_BIN/pg_ctl

if [[ -z ${BIN:-} ]]; then
    say "building tollgate (release)"
    cargo build --release --quiet
    BIN=$TARGET_DIR/release/tollgate
fi
[[ -x $BIN ]] || { echo "no binary at $BIN" >&2; exit 1; }

wait_for() { # url
    for _ in $(seq 1 400); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing answers at $1" >&2
    exit 1
}

# --- PostgreSQL and the mock --------------------------------------------------
say "starting a throwaway PostgreSQL on 127.0.0.1:$PG_PORT"
mkdir -p "$WORK/pg"
chmod 755 "$WORK"
if [[ $(id -u) -eq 0 ]]; then
    chown -R postgres:postgres "$WORK/pg"
fi
as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" --auth=trust -U postgres -E UTF8 >"$WORK/initdb.log" 2>&1
as_pg "$PG_CTL" -D "$WORK/pg/data" -l "$WORK/pg/log" \
    -o "-p $PG_PORT -k $WORK/pg -h 127.0.0.1 -c fsync=off" -w start >/dev/null
PG_PID=$(head -n 1 "$WORK/pg/data/postmaster.pid")

say "starting the mock upstream on 127.0.0.1:$MOCK_PORT"
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$MOCK_PORT/v1/models"

cat >"$WORK/chat.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TG_KEY")
wrk.body = '{"model":"demo-chat","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the gateway."}]}'
EOF

TICK=$(getconf CLK_TCK)

# utime+stime (ticks) of the given PIDs together.
cpu_ticks() {
    local sum=0 pid f
    for pid in "$@"; do
        f=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        f=${f##*) }
        read -r -a a <<<"$f"
        # After the command: state is a[0], utime a[11], stime a[12].
        sum=$((sum + a[11] + a[12]))
    done
    echo "$sum"
}

# The postmaster and its children (backends, checkpointer, walwriter…).
pg_pids() {
    echo "$PG_PID"
    local p
    for p in /proc/[0-9]*; do
        [[ $(awk '{print $4}' "$p/stat" 2>/dev/null) == "$PG_PID" ]] && echo "${p#/proc/}"
    done
}

# Σ of tollgate_cluster_db_roundtrips_total per kind over the given ports,
# as "kind count" lines.
roundtrips() {
    local port
    for port in "$@"; do
        curl -fsS "http://127.0.0.1:$port/metrics"
    done | python3 -c '
import re, sys
sums = {}
for line in sys.stdin:
    m = re.match(r"tollgate_cluster_db_roundtrips_total\{kind=\"(\w+)\"\} (\d+)", line)
    if m:
        sums[m.group(1)] = sums.get(m.group(1), 0) + int(m.group(2))
for k, v in sums.items():
    print(k, v)
'
}

# --- one setup: N nodes -------------------------------------------------------
run() { # nodes
    local n=$1 i port db url
    db=tollgate_$n
    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db"
    url="postgres://postgres@127.0.0.1:$PG_PORT/$db?sslmode=disable"
    local ports=() pids=()
    for i in $(seq 1 "$n"); do
        port=$((BASE_PORT + 10 * n + i))
        mkdir -p "$WORK/node-$n-$i"
        cat >"$WORK/node-$n-$i/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[runtime]
mode = "per-core"
[storage]
path = "$WORK/node-$n-$i/data"
flush_ms = 50
[admin]
token_env = "CLUSTER_BENCH_ADMIN_TOKEN"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
[cluster]
postgres_url_env = "CLUSTER_BENCH_POSTGRES_URL"
node_id = "bench-$n-$i"
lease_ttl = "30s"
sync_interval = "1s"
EOF
        CLUSTER_BENCH_ADMIN_TOKEN=$ADMIN_TOKEN CLUSTER_BENCH_POSTGRES_URL=$url TOLLGATE_LOG=warn \
            "$BIN" serve --config "$WORK/node-$n-$i/config.toml" >"$WORK/node-$n-$i/log" 2>&1 &
        pids+=($!)
        PIDS+=($!)
        ports+=("$port")
    done
    for port in "${ports[@]}"; do
        wait_for "http://127.0.0.1:$port/healthz"
    done
    local admin="http://127.0.0.1:${ports[0]}/api/v1"
    local auth="authorization: Bearer $ADMIN_TOKEN"
    curl -fsS -X POST "$admin/accounts" -H "$auth" -H 'content-type: application/json' \
        -d '{"id":"bench","email":"bench@example.com"}' >/dev/null
    curl -fsS -X POST "$admin/accounts/bench/credits" -H "$auth" -H 'content-type: application/json' \
        -d '{"amount":"100000","kind":"topup","reason":"bench"}' >/dev/null
    local created key
    created=$(curl -fsS -X POST "$admin/keys" -H "$auth" -H 'content-type: application/json' \
        -d '{"name":"cluster bench","owner":"bench"}')
    key=$(printf '%s' "$created" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
    export TG_KEY=$key
    # Every node knows the key (sync_interval) before the load starts.
    sleep 2
    local per=$((CONNS / n))
    ((per >= 1)) || per=1
    if ((WARMUP > 0)); then
        for port in "${ports[@]}"; do
            wrk -t1 -c"$per" -d"${WARMUP}s" -s "$WORK/chat.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null &
        done
        wait_wrk
        sleep 1.5
    fi
    local trips_before cpu_before pg_before
    trips_before=$(roundtrips "${ports[@]}")
    cpu_before=$(cpu_ticks "${pids[@]}")
    pg_before=$(cpu_ticks $(pg_pids))
    for port in "${ports[@]}"; do
        wrk -t1 -c"$per" -d"${DURATION}s" -s "$WORK/chat.lua" \
            "http://127.0.0.1:$port/v1/chat/completions" >"$WORK/wrk-$n-$port.txt" &
    done
    wait_wrk
    local cpu_after pg_after
    cpu_after=$(cpu_ticks "${pids[@]}")
    pg_after=$(cpu_ticks $(pg_pids))
    # The last charges are written within sync_interval / 4.
    sleep 1.5
    local trips_after
    trips_after=$(roundtrips "${ports[@]}")
    python3 - "$n" "$DURATION" "$TICK" "$((cpu_after - cpu_before))" "$((pg_after - pg_before))" \
        "$trips_before" "$trips_after" "$WORK"/wrk-"$n"-*.txt <<'EOF'
import re, sys
n, duration, tick, cpu, pg = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def parse(text):
    return {k: int(v) for k, v in (l.split() for l in text.splitlines() if l.strip())}
before, after = parse(sys.argv[6]), parse(sys.argv[7])
requests = errors = 0
rps = 0.0
for f in sys.argv[8:]:
    t = open(f).read()
    requests += int(re.search(r"(\d+) requests in", t).group(1))
    rps += float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    errors += int(m.group(1)) if m else 0
trips = {k: after.get(k, 0) - before.get(k, 0) for k in after}
total = sum(trips.values())
per = lambda x: x / requests * 1000 if requests else 0.0
us = lambda ticks: ticks / tick / requests * 1e6 if requests else 0.0
print(f"{n} node(s): {rps:,.0f} requests/s ({requests} in {duration:g}s, {errors} not 2xx); "
      f"CPU per request: gateways {us(cpu):.1f} µs, PostgreSQL {us(pg):.1f} µs; "
      f"round trips per 1,000 requests: {per(total):.1f}")
print("    by kind: " + ", ".join(f"{k} {per(v):.1f}" for k, v in sorted(trips.items()) if v))
EOF
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}

# Waits for the wrk processes started in the background (not the nodes).
wait_wrk() {
    local p
    for p in $(jobs -p); do
        if [[ $(cat "/proc/$p/comm" 2>/dev/null) == wrk ]]; then
            wait "$p" || true
        fi
    done
}

say "1 node"
run 1
say "3 nodes"
run 3
