#!/usr/bin/env bash
# `make bench`: the service against the database's own limit and against a hand-written
# baseline without the session layer, on one throwaway PostgreSQL cluster, in one run.
#
#   scripts/bench.sh                 full run; writes BENCHMARKS.md (between its markers)
#                                    and docs/bench-concurrency.svg
#   scripts/bench.sh --smoke         a few seconds per step, tiny load, checks that the
#                                    output parses, the statement counts are as expected and
#                                    every 2xx ended in COMMIT (one at a time, exact);
#                                    writes only under target/bench-smoke
#   --bin PATH                       use this ledger binary (built with --features bench)
#                                    instead of building one (make test passes the one its
#                                    suite just built)
#
# Steps: build (release, --features bench); install wrk and gnuplot from Debian when
# missing; start a private cluster (scripts/pg.sh, own state file) with pg_stat_statements;
# create and migrate a fresh database; seed 1,000 accounts; then, interleaving repetitions
# (A B C A B C ...):
#   transfer  pgbench (the same SQL, no HTTP) | POST /transfers | POST /_bench/transfers
#             | POST /transfers with DB_STATEMENT_CACHE=false (as behind PgBouncer)
#             | the service with its defaults | the peer's POST /transfers
#   read      GET /accounts/{id} | GET /_bench/accounts/{id} | the same with
#             DB_STATEMENT_CACHE=false | the service with its defaults | the peer's
#             GET /accounts/{id}
#   mix       90 % reads, 10 % transfers, through either
#   sweep     POST /transfers at 1, 8, 32, 128 and 512 client connections
# Every slice runs a fresh process of the same binary (the sides differ only in the routes
# they load; for the out-of-the-box comparison, full runs only, the service with no tuning
# variables set, "defaults", and bench/peer, an axum + sqlx + axum-sqlx-tx service of the
# same routes and SQL, "peer"), warms up, resets pg_stat_statements, measures (throughput,
# latency, errors; the process's RSS and server connections, sampled; CPU time per request
# of the service, the cluster and the load generator), then reads the statements the
# server received.
#
# Knobs (environment): BENCH_DURATION (s per measured run), BENCH_WARMUP (s), BENCH_REPS
# (repetitions of each comparison), BENCH_SWEEP_REPS,
# BENCH_CLIENTS (HTTP connections for the comparisons), BENCH_SWEEP ("1 8 32 128 512"),
# BENCH_POOL_SIZE / BENCH_MAX_OVERFLOW (4 / 4), BENCH_WORKERS (HTTP_WORKERS of the service,
# 1), BENCH_RUST_LOG (info), BENCH_ACCOUNTS,
# BENCH_ONLY (a subset of "transfer read mix sweep", for exploring: the report, with gaps,
# then goes to target/bench-only).
set -euo pipefail

# The whole script is one block, which bash reads to its end before running any of it: a
# run is not thrown off by an edit of this file while it goes on.
{
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

SMOKE=0
BIN=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --bin) BIN=$2; shift ;;
    *) echo "usage: $0 [--smoke] [--bin PATH]" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  DURATION=${BENCH_DURATION:-1} WARMUP=${BENCH_WARMUP:-1} REPS=${BENCH_REPS:-1}
  SWEEP_REPS=${BENCH_SWEEP_REPS:-1}
  CLIENTS=${BENCH_CLIENTS:-8} SWEEP=${BENCH_SWEEP:-"1 16"}
  OUT=$ROOT/target/bench-smoke
  REPORT=$OUT/BENCHMARKS.md CHART=$OUT/bench-concurrency.svg CHART_LINK=bench-concurrency.svg
  export PG_STATE_FILE=.pgbench-cluster-smoke
else
  DURATION=${BENCH_DURATION:-2} WARMUP=${BENCH_WARMUP:-1} REPS=${BENCH_REPS:-11}
  SWEEP_REPS=${BENCH_SWEEP_REPS:-5}
  CLIENTS=${BENCH_CLIENTS:-32} SWEEP=${BENCH_SWEEP:-"1 8 32 128 512"}
  OUT=$ROOT/target/bench
  REPORT=$ROOT/BENCHMARKS.md CHART=$ROOT/docs/bench-concurrency.svg CHART_LINK=docs/bench-concurrency.svg
  export PG_STATE_FILE=.pgbench-cluster
fi
if [ -n "${BENCH_ONLY:-}" ]; then
  # A partial run explores; it leaves BENCHMARKS.md and the chart alone.
  OUT=$ROOT/target/bench-only
  REPORT=$OUT/BENCHMARKS.md CHART=$OUT/bench-concurrency.svg CHART_LINK=bench-concurrency.svg
fi
POOL_SIZE=${BENCH_POOL_SIZE:-4}
MAX_OVERFLOW=${BENCH_MAX_OVERFLOW:-4}
CONNS=$((POOL_SIZE + MAX_OVERFLOW))
ACCOUNTS=${BENCH_ACCOUNTS:-1000}
SERVICE_LOG_LEVEL=${BENCH_RUST_LOG:-info}
# One Actix worker: on 2 cores shared with PostgreSQL it serves more than two (BENCHMARKS.md).
WORKERS=${BENCH_WORKERS:-1}
DB_NAME=bench
RESULTS=$OUT/results.tsv
STARTED_AT=$(date +%s)

# --- tools ------------------------------------------------------------------------------

find_pg_bin() { # name: on PATH or in /usr/lib/postgresql/*/bin (Debian), newest first
  local dir
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/$1" ]; then echo "$dir/$1"; return 0; fi
  done
  return 1
}

APT_UPDATED=0
ensure_tool() { # command debian-package
  command -v "$1" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || die "$1 not found and no apt-get: install $2"
  local sudo=
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || die "$1 not found: install it (apt-get install $2)"
    sudo="sudo -n"
  fi
  log "installing $2"
  if [ "$APT_UPDATED" = 0 ]; then $sudo apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  command -v "$1" >/dev/null 2>&1 || die "$2 did not provide $1"
}

ensure_tool wrk wrk
ensure_tool curl curl
ensure_tool gnuplot gnuplot-nox
PSQL_BIN=$(find_pg_bin psql) || die "psql not found (apt-get install postgresql-client)"
PGBENCH=$(find_pg_bin pgbench) || die "pgbench not found (it comes with the PostgreSQL server packages)"

# wrk and the service each hold one descriptor per client connection.
MAX_CLIENTS=$CLIENTS
for c in $SWEEP; do [ "$c" -gt "$MAX_CLIENTS" ] && MAX_CLIENTS=$c; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((MAX_CLIENTS + 256)) ]; then
  die "ulimit -n is $NOFILE; $MAX_CLIENTS client connections need at least $((MAX_CLIENTS + 256))"
fi

# --- build ------------------------------------------------------------------------------

if [ -z "$BIN" ]; then
  if [ "$SMOKE" = 1 ]; then
    # The same build as `make test`'s (a plain `cargo build` would resolve other features
    # for the dependencies and rebuild them).
    log "building (debug, as make test does)"
    cargo test --quiet --no-run --features test-routes,bench
    BIN=$ROOT/target/debug/ledger
  else
    log "building (release, --features bench)"
    cargo build --quiet --release --features bench --bin ledger
    BIN=$ROOT/target/release/ledger
  fi
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
[ -x "$BIN" ] || die "no binary at $BIN"

# The out-of-the-box comparison: the service as a user starts it against the axum + sqlx +
# axum-sqlx-tx peer (bench/peer, a Cargo project of its own with its own target directory).
# A full run only: the smoke run in `make test` must not compile a second service.
OUTSIDE_SIDES=
if [ "$SMOKE" = 0 ]; then
  log "building the peer (release, bench/peer)"
  CARGO_TARGET_DIR=$ROOT/target/peer cargo build --quiet --release --manifest-path bench/peer/Cargo.toml
  PEER_BIN=$ROOT/target/peer/release/ledger-peer
  [ -x "$PEER_BIN" ] || die "no peer binary at $PEER_BIN"
  OUTSIDE_SIDES="defaults peer"
fi

# --- cluster and database ---------------------------------------------------------------

rm -rf "$OUT"
mkdir -p "$OUT/stmts" "$OUT/run"
declare -A SVC_PID=() SVC_PORT=()
stop_services() {
  local name
  for name in "${!SVC_PID[@]}"; do
    kill -TERM "${SVC_PID[$name]}" 2>/dev/null || true
    wait "${SVC_PID[$name]}" 2>/dev/null || true
  done
  SVC_PID=()
  SVC_PORT=()
}
cleanup() {
  stop_services
  scripts/pg.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Its own cluster: pg_stat_statements must be preloaded, which a shared server would need
# a restart for. A leftover from an interrupted run is replaced.
scripts/pg.sh down >/dev/null 2>&1 || true
export PG_SERVER_OPTS="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on -c pg_stat_statements.max=1000"
ADMIN_URL=$(scripts/pg.sh up)
DB_URL=${ADMIN_URL%/*}/$DB_NAME
psql() { "$PSQL_BIN" -XAtq -v ON_ERROR_STOP=1 "$@"; }

psql "$ADMIN_URL" -c "CREATE DATABASE $DB_NAME"
psql "$DB_URL" -c "CREATE EXTENSION pg_stat_statements"
(cd "$OUT/run" && env -i PATH="$PATH" DATABASE_URL="$DB_URL" RUST_LOG=warn "$BIN" migrate) \
  || die "migrations failed"
psql "$DB_URL" -c "INSERT INTO accounts (name, balance)
                   SELECT 'bench ' || g, 1000000000000000 FROM generate_series(1, $ACCOUNTS) AS g" \
  -c "VACUUM ANALYZE accounts"
[ "$(psql "$DB_URL" -c "SELECT count(*) = $ACCOUNTS AND min(id) = 1 AND max(id) = $ACCOUNTS FROM accounts")" = t ] \
  || die "seeding did not produce accounts 1..$ACCOUNTS"
PG_VERSION=$(psql "$DB_URL" -c "SHOW server_version")

# --- one run ----------------------------------------------------------------------------

PG_PORT=$(sed -E 's#.*:([0-9]+)/[^/]*$#\1#' <<<"$ADMIN_URL")

# A free local port (the service's own start-up line is not logged below RUST_LOG=info).
# Taken below the kernel's ephemeral range (32768+ by default), where the load generators'
# client sockets linger in TIME_WAIT and would make the service's bind fail; and no socket
# in any state may use it.
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 12000))
    [ -z "$(ss -Htan "sport = :$port" 2>/dev/null)" ] && { echo "$port"; return; }
  done
}

# The command line of a side's process and the path that answers 200 once it is ready.
# Sides without an entry run the service as configured for the comparisons.
side_command() { # side port -> sets CMD and READY_PATH
  # Start-up and shutdown only: none of these changes how a request is served.
  local common=(PATH="$PATH" DATABASE_URL="$DB_URL" HOST=127.0.0.1 PORT="$2"
    RUN_MIGRATIONS=false SHUTDOWN_DRAIN_SECS=0 SHUTDOWN_TIMEOUT_SECS=5)
  READY_PATH=/health/ready
  case $1 in
    # Out of the box: no HTTP_WORKERS, DB_POOL_SIZE, DB_MAX_OVERFLOW or RUST_LOG.
    defaults) CMD=(env -i "${common[@]}" "$BIN") ;;
    # The peer has no health route; a seeded account answers once it serves.
    peer) CMD=(env -i PATH="$PATH" DATABASE_URL="$DB_URL" HOST=127.0.0.1 PORT="$2" "$PEER_BIN")
          READY_PATH=/accounts/1 ;;
    # As configured for the comparisons, with the prepared statement cache off, as PgBouncer
    # in transaction mode before 1.21 needs it.
    nocache) CMD=(env -i "${common[@]}" DB_POOL_SIZE="$POOL_SIZE" DB_MAX_OVERFLOW="$MAX_OVERFLOW"
                  HTTP_WORKERS="$WORKERS" RUST_LOG="$SERVICE_LOG_LEVEL" DB_STATEMENT_CACHE=false "$BIN") ;;
    *) CMD=(env -i "${common[@]}" DB_POOL_SIZE="$POOL_SIZE" DB_MAX_OVERFLOW="$MAX_OVERFLOW"
            HTTP_WORKERS="$WORKERS" RUST_LOG="$SERVICE_LOG_LEVEL" "$BIN") ;;
  esac
}

# A service process, ready to serve.
start_service() { # name [side]
  local name=$1 logfile=$OUT/run/service-$1.log i port CMD READY_PATH
  port=$(free_port)
  side_command "${2:-}" "$port"
  (cd "$OUT/run" && exec "${CMD[@]}") >"$logfile" 2>&1 &
  SVC_PID[$name]=$!
  for i in $(seq 100); do
    kill -0 "${SVC_PID[$name]}" 2>/dev/null || { cat "$logfile" >&2; die "the service exited"; }
    if curl -sf -o /dev/null "http://127.0.0.1:$port$READY_PATH"; then
      SVC_PORT[$name]=$port
      return 0
    fi
    sleep 0.1
  done
  cat "$logfile" >&2
  die "the service did not become ready"
}

stats_reset() { psql "$DB_URL" -c "SELECT pg_stat_statements_reset()" >/dev/null; }

# calls<TAB>statement for everything the server ran in the bench database since the reset.
stats_read() {
  psql -F $'\t' "$DB_URL" -c "
    SELECT s.calls, regexp_replace(s.query, '\\s+', ' ', 'g')
    FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
    WHERE d.datname = '$DB_NAME' AND s.query NOT LIKE '%pg_stat_statements%'
    ORDER BY s.calls DESC, s.query"
}

# Requests, statements per request and pings per request from a stats_read file. A request
# is anchored on the one statement each kind runs exactly once: the INSERT of a transfer,
# the single-account SELECT of a read.
stats_per_request() { # file -> "requests stmts_per_req pings_per_req"
  awk -F'\t' '
    { total += $1 }
    $2 ~ /^INSERT INTO "transfers"/ { req += $1 }
    $2 ~ /FROM "accounts" WHERE \("accounts"\."id" = \$1\)/ { req += $1 }
    $2 == "SELECT $1" { ping += $1 }
    END {
      if (req == 0) { print "0 - -"; exit }
      printf "%d %.3f %.4f\n", req, total / req, ping / req
    }' "$1"
}

# The most server connections the process held while a run goes on (its established
# sockets to the cluster's port).
sample_connections() { # pid seconds
  local pid=$1 until=$(($(date +%s) + $2)) conns=0 c
  while [ "$(date +%s)" -lt "$until" ] && kill -0 "$pid" 2>/dev/null; do
    c=$(ss -Htnp state established "( dport = :$PG_PORT )" 2>/dev/null | grep -c "pid=$pid,") || c=0
    [ "${c:-0}" -gt "$conns" ] && conns=$c
    sleep 0.25
  done
  echo "$conns"
}

wrk_line() { # file -> "rps p50 p99 non2xx+socket_errors requests"
  local line
  line=$(grep '^WRK ' "$1" | tail -n 1) || { cat "$1" >&2; die "no summary line from wrk"; }
  awk '{
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["rps"], v["p50_ms"], v["p99_ms"], v["non2xx"] + v["socket_errors"], v["requests"]
  }' <<<"$line"
}

# CPU accounting. Throughput on a shared machine moves with everyone else's load; the CPU
# time each side spends per request barely does, so every slice also records it: the
# service process, the whole cluster (postmaster, backends, background processes) and the
# load generator, in microseconds per request, and the share of the machine's busy time
# that went to other processes ("foreign CPU").
CLK_TCK=$(getconf CLK_TCK)
PG_DATA=$(awk '{ print $1 "/data" }' "$PG_STATE_FILE")
PG_POSTMASTER=$(head -n 1 "$PG_DATA/postmaster.pid")
cpu_snapshot() { # service-pid (or 0) -> "service_ticks service_sys_ticks cluster_ticks busy_ticks"
  # Fields after the command name (which may hold spaces): state ppid ... utime stime
  # cutime cstime are $2 and $12..$15. `cat` goes on past processes that exit meanwhile.
  local svc="0 0" pg busy
  [ "$1" != 0 ] && svc=$(sed -E 's/^.*\) //' "/proc/$1/stat" | awk '{ print $12 + $13, $13 }')
  # The postmaster's own time and that of its exited children, plus the live children's.
  pg=$(sed -E 's/^.*\) //' "/proc/$PG_POSTMASTER/stat" | awk '{ print $12 + $13 + $14 + $15 }')
  pg=$( (cat /proc/[0-9]*/stat 2>/dev/null || true) | sed -E 's/^[0-9]+ \(.*\) //' |
    awk -v pm="$PG_POSTMASTER" -v s="$pg" '$2 == pm { s += $12 + $13 } END { print s }')
  busy=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat)
  echo "$svc $pg $busy"
}
# -> "service_us cluster_us client_us foreign_pct service_sys_us" per request, from two
# snapshots, the client's CPU seconds (user + sys) and the request count.
cpu_per_request() { # "before" "after" client_seconds requests
  awk -v b="$1" -v a="$2" -v client="$3" -v n="$4" -v tck="$CLK_TCK" 'BEGIN {
    split(b, x, " "); split(a, y, " ")
    svc = (y[1] - x[1]) / tck; sys = (y[2] - x[2]) / tck; pg = (y[3] - x[3]) / tck
    busy = (y[4] - x[4]) / tck
    foreign = busy - svc - pg - client; if (foreign < 0) foreign = 0
    if (n + 0 == 0 || busy <= 0) { print "- - - - -"; exit }
    printf "%.0f %.0f %.0f %.0f %.0f\n", svc * 1e6 / n, pg * 1e6 / n, client * 1e6 / n,
      100 * foreign / busy, sys * 1e6 / n
  }'
}
# Runs a command with its CPU time (user + sys seconds) written to the named file.
timed() { # file command...
  local file=$1 TIMEFORMAT='%3U %3S'
  shift
  { time "$@"; } 2>"$file.time"
  awk '{ print $1 + $2 }' "$file.time" >"$file"
}

RUN_NO=0
record() { # group side clients rep rps p50 p99 errors rss_kib conns stmts pings requests
           # service_us cluster_us client_us foreign_pct service_sys_us
  local IFS=$'\t'
  echo "$*" >>"$RESULTS"
}

# One measured slice against a running service: warm-up, reset, measure, read the
# statements the server received.
run_wrk() { # group side clients rep script args...
  local group=$1 side=$2 clients=$3 rep=$4 script=$5
  shift 5
  local tag="$group-$side-c$clients-r$rep"
  RUN_NO=$((RUN_NO + 1))
  # A fresh process per slice: whatever one process's placement or history does to its
  # speed becomes noise spread over the repetitions instead of a bias of one side, and
  # its VmHWM is the slice's own peak.
  start_service slice "$side"
  local url="http://127.0.0.1:${SVC_PORT[slice]}" pid=${SVC_PID[slice]}
  # One wrk thread: it drives far more requests per second than the service can answer
  # here, and every extra thread takes CPU from the service and the database.
  wrk -t1 -c"$clients" -d"${WARMUP}s" --timeout 10s -s "bench/wrk/$script" "$url" -- "$@" \
    >"$OUT/run/warmup.txt" 2>&1 || { cat "$OUT/run/warmup.txt" >&2; die "wrk failed (warm-up of $tag)"; }
  stats_reset
  sample_connections "$pid" "$DURATION" >"$OUT/run/conns.txt" &
  local sampler=$! before after status=0
  before=$(cpu_snapshot "$pid")
  timed "$OUT/run/client-cpu" wrk -t1 -c"$clients" -d"${DURATION}s" --timeout 10s \
    -s "bench/wrk/$script" "$url" -- "$@" >"$OUT/run/$tag.wrk" 2>&1 || status=$?
  after=$(cpu_snapshot "$pid")
  [ "$status" = 0 ] || { cat "$OUT/run/$tag.wrk" >&2; die "wrk failed ($tag)"; }
  wait "$sampler" || true
  # Let requests still in flight when wrk stopped finish before the statements are read.
  sleep 0.2
  stats_read >"$OUT/stmts/$tag.tsv"
  local rps p50 p99 errors requests counted per ping rss conns svc_us pg_us client_us foreign sys_us
  read -r rps p50 p99 errors requests < <(wrk_line "$OUT/run/$tag.wrk")
  read -r counted per ping < <(stats_per_request "$OUT/stmts/$tag.tsv")
  conns=$(cat "$OUT/run/conns.txt")
  rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
  stop_services
  read -r svc_us pg_us client_us foreign sys_us < <(cpu_per_request "$before" "$after" \
    "$(cat "$OUT/run/client-cpu")" "$requests")
  record "$group" "$side" "$clients" "$rep" "$rps" "$p50" "$p99" "$errors" "$rss" "$conns" \
    "$per" "$ping" "$counted" "$svc_us" "$pg_us" "$client_us" "$foreign" "$sys_us"
  log "$(printf '%-8s %-8s c=%-4s rep %s: %7.0f req/s p50 %6.2f p99 %7.2f ms err %s stmts %s RSS %s KiB conns %s CPU us/req svc %s pg %s wrk %s foreign %s%%' \
    "$group" "$side" "$clients" "$rep" "$rps" "$p50" "$p99" "$errors" "$per" "$rss" "$conns" \
    "$svc_us" "$pg_us" "$client_us" "$foreign")"
}

# The database's own limit: the transfer's SQL through pgbench, same connection count.
run_pgbench() { # rep
  local rep=$1 tag="transfer-pgbench-c$CONNS-r$1"
  local args=(-n -M prepared -c "$CONNS" -j 1 -D accounts="$ACCOUNTS" -f bench/pgbench/transfer.sql)
  RUN_NO=$((RUN_NO + 1))
  "$PGBENCH" "${args[@]}" -T "$WARMUP" "$DB_URL" >"$OUT/run/warmup.txt" 2>&1 \
    || { cat "$OUT/run/warmup.txt" >&2; die "pgbench failed"; }
  stats_reset
  rm -rf "$OUT/run/pgb" && mkdir -p "$OUT/run/pgb"
  local before after status=0
  # pgbench's backends start and end with it. A backend that exits between the two reads
  # of a snapshot (the postmaster's reaped children, then the live ones) would be counted
  # in neither, so each snapshot waits until the previous run's backends are reaped.
  sleep 0.5
  before=$(cpu_snapshot 0)
  timed "$OUT/run/client-cpu" "$PGBENCH" "${args[@]}" -T "$DURATION" -l --log-prefix="$OUT/run/pgb/log" \
    "$DB_URL" >"$OUT/run/$tag.txt" 2>&1 || status=$?
  sleep 0.5
  after=$(cpu_snapshot 0)
  [ "$status" = 0 ] || { cat "$OUT/run/$tag.txt" >&2; die "pgbench failed ($tag)"; }
  sleep 0.2
  # PostgreSQL 15's pg_stat_statements counts a utility statement that pgbench prepared
  # (BEGIN, COMMIT) only at its first execution on each connection; the script runs each
  # once per transaction, so those two are counted from the transactions instead.
  stats_read | awk -F'\t' -v OFS='\t' '
    { calls[NR] = $1; query[NR] = $2 }
    $2 ~ /^INSERT INTO "transfers"/ { tx = $1 }
    END {
      for (i = 1; i <= NR; i++) {
        if ((query[i] == "BEGIN" || query[i] == "COMMIT") && calls[i] < tx) {
          calls[i] = tx; query[i] = query[i] " *"
        }
        print calls[i], query[i]
      }
    }' >"$OUT/stmts/$tag.tsv"
  local tps failed p50 p99 counted per ping
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$OUT/run/$tag.txt" | head -n 1)
  [ -n "$tps" ] || { cat "$OUT/run/$tag.txt" >&2; die "no tps from pgbench"; }
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$OUT/run/$tag.txt")
  # Per-transaction log: client, transaction, latency (µs), ...
  read -r p50 p99 < <(cat "$OUT/run/pgb"/log* | awk '{ print $3 }' | sort -n | awk '
    { v[NR] = $1 }
    END { i50 = int(NR * 0.50); i99 = int(NR * 0.99); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1
          printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
  read -r counted per ping < <(stats_per_request "$OUT/stmts/$tag.tsv")
  local done svc_us pg_us client_us foreign sys_us
  done=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$OUT/run/$tag.txt")
  read -r svc_us pg_us client_us foreign sys_us < <(cpu_per_request "$before" "$after" \
    "$(cat "$OUT/run/client-cpu")" "${done:-0}")
  record transfer pgbench "$CONNS" "$rep" "$tps" "$p50" "$p99" "${failed:-0}" - "$CONNS" \
    "$per" "$ping" "$counted" 0 "$pg_us" "$client_us" "$foreign" 0
  log "$(printf '%-8s %-8s c=%-4s rep %s: %7.0f tx/s  p50 %6.2f p99 %7.2f ms err %s stmts %s CPU us/tx pg %s pgbench %s foreign %s%%' \
    transfer pgbench "$CONNS" "$rep" "$tps" "$p50" "$p99" "${failed:-0}" "$per" "$pg_us" "$client_us" "$foreign")"
}

# --- the runs ---------------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "cluster: PostgreSQL $PG_VERSION; service pool $POOL_SIZE + $MAX_OVERFLOW; $REPS x ${DURATION}s per configuration"
T=/transfers B=/_bench/transfers RA=/accounts/ RB=/_bench/accounts/
ONLY=" ${BENCH_ONLY:-transfer read mix sweep} "
wanted() { [[ $ONLY == *" $1 "* ]]; }
# Every repetition runs each side once, in turn; the order flips from one repetition to
# the next (A B, B A, ...), so that neither side always follows the same neighbour.
in_order() { # rep first second...: the sides, reversed on even repetitions
  local rep=$1
  shift
  if [ $((rep % 2)) = 1 ]; then echo "$@"; else echo "$@" | tr ' ' '\n' | tac | tr '\n' ' '; fi
}
for rep in $(seq "$REPS"); do
  if wanted transfer; then
    for side in $(in_order "$rep" pgbench session baseline nocache $OUTSIDE_SIDES); do
      case $side in
        pgbench) run_pgbench "$rep" ;;
        session | nocache) run_wrk transfer "$side" "$CLIENTS" "$rep" transfer.lua "$T" "$ACCOUNTS" ;;
        baseline) run_wrk transfer baseline "$CLIENTS" "$rep" transfer.lua "$B" "$ACCOUNTS" ;;
        defaults | peer) run_wrk transfer "$side" "$CLIENTS" "$rep" transfer.lua "$T" "$ACCOUNTS" ;;
      esac
    done
  fi
  if wanted read; then
    for side in $(in_order "$rep" session baseline nocache $OUTSIDE_SIDES); do
      if [ "$side" = baseline ]; then path=$RB; else path=$RA; fi
      run_wrk read "$side" "$CLIENTS" "$rep" read.lua "$path" "$ACCOUNTS"
    done
  fi
  if wanted mix; then
    for side in $(in_order "$rep" session baseline); do
      if [ "$side" = session ]; then run_wrk mix session "$CLIENTS" "$rep" mix.lua "$RA" "$T" "$ACCOUNTS"
      else run_wrk mix baseline "$CLIENTS" "$rep" mix.lua "$RB" "$B" "$ACCOUNTS"; fi
    done
  fi
done
if wanted sweep; then
  for rep in $(seq "$SWEEP_REPS"); do
    for c in $(in_order "$rep" $SWEEP); do
      run_wrk sweep session "$c" "$rep" transfer.lua "$T" "$ACCOUNTS"
    done
  done
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - STARTED_AT))

# --- report -----------------------------------------------------------------------------

export LC_ALL=C
SUMMARY=$OUT/summary.tsv
# One line per configuration, in order of first appearance:
# group side clients n rps_med rps_min rps_max p50_med p99_med errors_sum rss_max conns_max
# stmts_med pings_med service_us_med cluster_us_med client_us_med foreign_pct_med
# service_sys_us_med
awk -F'\t' -v OFS='\t' '
  function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    k = $1 OFS $2 OFS $3
    if (!(k in n)) { order[++keys] = k; min[k] = $5; max[k] = $5; rss[k] = $9; conns[k] = $10 }
    n[k]++
    rps[k] = rps[k] " " $5; p50[k] = p50[k] " " $6; p99[k] = p99[k] " " $7
    st[k] = st[k] " " $11; pg[k] = pg[k] " " $12
    cs[k] = cs[k] " " $14; cp[k] = cp[k] " " $15; cc[k] = cc[k] " " $16; cf[k] = cf[k] " " $17
    cy[k] = cy[k] " " $18
    err[k] += $8
    if ($5 + 0 < min[k] + 0) min[k] = $5
    if ($5 + 0 > max[k] + 0) max[k] = $5
    if ($9 != "-" && $9 + 0 > rss[k] + 0) rss[k] = $9
    if ($10 + 0 > conns[k] + 0) conns[k] = $10
  }
  END {
    for (i = 1; i <= keys; i++) {
      k = order[i]
      print k, n[k], median(rps[k]), min[k], max[k], median(p50[k]), median(p99[k]), err[k],
        rss[k], conns[k], median(st[k]), median(pg[k]), median(cs[k]), median(cp[k]),
        median(cc[k]), median(cf[k]), median(cy[k])
    }
  }' "$RESULTS" >"$SUMMARY"

get() { # group side clients column-name -> value from the summary
  awk -F'\t' -v g="$1" -v s="$2" -v c="$3" -v col="$4" '
    BEGIN { split("group side clients n rps rps_min rps_max p50 p99 errors rss conns stmts pings svc_us pg_us client_us foreign sys_us", names, " ")
            for (i in names) idx[names[i]] = i }
    $1 == g && $2 == s && $3 == c { print $idx[col]; found = 1; exit }
    END { if (!found) print "" }' "$SUMMARY"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.3f", a / b }'; }
verdict() { # value op target -> yes/no
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "-" || v == "") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (op == "<=") ? (v + 0 <= t + 0) : (v + 0 == t + 0)
    print ok ? "met" : "**missed**" }'
}

# Sweep: throughput peak, 512 versus peak, errors, RSS at the largest level.
LAST_LEVEL=${SWEEP##* }
PEAK=0 SWEEP_ERRORS=0
for c in $SWEEP; do
  r=$(get sweep session "$c" rps)
  PEAK=$(awk -v a="$PEAK" -v b="$r" 'BEGIN { print (b + 0 > a + 0) ? b : a }')
  e=$(get sweep session "$c" errors)
  SWEEP_ERRORS=$((SWEEP_ERRORS + ${e:-0}))
done
# The tail ratio is taken within each repetition (its last level over its own peak), then
# the median over the repetitions: the levels of one repetition run back to back, so a slow
# spell of the machine that hits one repetition does not pit its 512 against another's peak.
SWEEP_TAIL=$(awk -F'\t' -v last="$LAST_LEVEL" '
  $1 == "sweep" { seen[$4] = 1; if ($5 + 0 > peak[$4] + 0) peak[$4] = $5; if ($3 == last) tail[$4] = $5 }
  END {
    n = 0
    for (r in seen) if (peak[r] + 0 > 0 && (r in tail)) v[++n] = tail[r] / peak[r]
    if (n == 0) { print "-"; exit }
    for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
    med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    printf "%.3f (%.3f – %.3f)\n", med, v[1], v[n]
  }' "$RESULTS")
RSS_LAST_MIB=$(awk -v k="$(get sweep session "$LAST_LEVEL" rss)" 'BEGIN { printf "%.1f", k / 1024 }')

# Paired ratios: side A over side B within each repetition (adjacent slices), then the
# median and the range over the repetitions.
paired() { # group sideA clientsA sideB clientsB measure -> "median min max"
  # measure: rps, p99 (ratios A / B); capacity (B's total CPU per request over A's: the
  # throughput ratio a machine with no other load would see if CPU is what limits);
  # layer (the same, for two sides that send the same statements: the cluster's and the
  # client's CPU per request are taken as the pair's mean, so that only the service's own
  # CPU differs and their noise does not swamp it); svc_diff (A's service CPU per request
  # minus B's, µs).
  awk -F'\t' -v g="$1" -v a="$2" -v ca="$3" -v b="$4" -v cb="$5" -v m="$6" '
    function value(    ) {
      if (m == "rps") return $5
      if (m == "p99") return $7
      if (m == "svc_diff") return $14
      return $14 + $15 + $16
    }
    $1 == g && $2 == a && $3 == ca { va[$4] = value(); sa[$4] = $14 }
    $1 == g && $2 == b && $3 == cb { vb[$4] = value(); sb[$4] = $14 }
    END {
      for (r in va) {
        if (!(r in vb)) continue
        if (m == "svc_diff") x[++n] = va[r] - vb[r]
        else if (m == "capacity") { if (va[r] + 0 > 0) x[++n] = vb[r] / va[r] }
        else if (m == "layer") {
          rest = (va[r] - sa[r] + vb[r] - sb[r]) / 2
          if (sa[r] + rest > 0) x[++n] = (sb[r] + rest) / (sa[r] + rest)
        }
        else if (vb[r] + 0 > 0) x[++n] = va[r] / vb[r]
      }
      if (n == 0) { print "- - -"; exit }
      for (i = 2; i <= n; i++) { t = x[i]; for (j = i - 1; j >= 1 && x[j] > t; j--) x[j + 1] = x[j]; x[j + 1] = t }
      md = n % 2 ? x[(n + 1) / 2] : (x[n / 2] + x[n / 2 + 1]) / 2
      f = (m == "svc_diff") ? "%.0f %.0f %.0f\n" : "%.3f %.3f %.3f\n"
      printf f, md, x[1], x[n]
    }' "$RESULTS"
}
read -r TX_RATIO TX_RATIO_LO TX_RATIO_HI < <(paired transfer session "$CLIENTS" baseline "$CLIENTS" rps)
read -r TX_P99 TX_P99_LO TX_P99_HI < <(paired transfer session "$CLIENTS" baseline "$CLIENTS" p99)
read -r RD_RATIO RD_RATIO_LO RD_RATIO_HI < <(paired read session "$CLIENTS" baseline "$CLIENTS" rps)
read -r RD_P99 RD_P99_LO RD_P99_HI < <(paired read session "$CLIENTS" baseline "$CLIENTS" p99)
read -r MX_RATIO MX_RATIO_LO MX_RATIO_HI < <(paired mix session "$CLIENTS" baseline "$CLIENTS" rps)
read -r MX_P99 MX_P99_LO MX_P99_HI < <(paired mix session "$CLIENTS" baseline "$CLIENTS" p99)
read -r PG_RATIO PG_RATIO_LO PG_RATIO_HI < <(paired transfer session "$CLIENTS" pgbench "$CONNS" rps)
read -r BP_RATIO BP_RATIO_LO BP_RATIO_HI < <(paired transfer baseline "$CLIENTS" pgbench "$CONNS" rps)
read -r TX_CAP TX_CAP_LO TX_CAP_HI < <(paired transfer session "$CLIENTS" baseline "$CLIENTS" layer)
read -r RD_CAP RD_CAP_LO RD_CAP_HI < <(paired read session "$CLIENTS" baseline "$CLIENTS" layer)
read -r MX_CAP MX_CAP_LO MX_CAP_HI < <(paired mix session "$CLIENTS" baseline "$CLIENTS" layer)
read -r PG_CAP PG_CAP_LO PG_CAP_HI < <(paired transfer session "$CLIENTS" pgbench "$CONNS" capacity)
read -r TX_SVC TX_SVC_LO TX_SVC_HI < <(paired transfer session "$CLIENTS" baseline "$CLIENTS" svc_diff)
read -r RD_SVC RD_SVC_LO RD_SVC_HI < <(paired read session "$CLIENTS" baseline "$CLIENTS" svc_diff)
# What DB_STATEMENT_CACHE=false (PgBouncer in transaction mode) costs: that side over the
# session's, paired within each repetition like the others.
read -r NC_TX_RATIO NC_TX_RATIO_LO NC_TX_RATIO_HI < <(paired transfer nocache "$CLIENTS" session "$CLIENTS" rps)
read -r NC_TX_CAP NC_TX_CAP_LO NC_TX_CAP_HI < <(paired transfer nocache "$CLIENTS" session "$CLIENTS" capacity)
read -r NC_TX_SVC NC_TX_SVC_LO NC_TX_SVC_HI < <(paired transfer nocache "$CLIENTS" session "$CLIENTS" svc_diff)
read -r NC_RD_RATIO NC_RD_RATIO_LO NC_RD_RATIO_HI < <(paired read nocache "$CLIENTS" session "$CLIENTS" rps)
read -r NC_RD_CAP NC_RD_CAP_LO NC_RD_CAP_HI < <(paired read nocache "$CLIENTS" session "$CLIENTS" capacity)
read -r NC_RD_SVC NC_RD_SVC_LO NC_RD_SVC_HI < <(paired read nocache "$CLIENTS" session "$CLIENTS" svc_diff)
ST_TX_S=$(get transfer session "$CLIENTS" stmts) ST_TX_B=$(get transfer baseline "$CLIENTS" stmts)
ST_TX_P=$(get transfer pgbench "$CONNS" stmts)
ST_RD_S=$(get read session "$CLIENTS" stmts) ST_RD_B=$(get read baseline "$CLIENTS" stmts)
PING_RD_S=$(get read session "$CLIENTS" pings) PING_TX_S=$(get transfer session "$CLIENTS" pings)
TX_EXTRA=$(awk -v s="$ST_TX_S" -v b="$ST_TX_B" 'BEGIN { if (s == "" || b == "" || s == "-" || b == "-") print "-"; else printf "%.3f", s - b }')

# The pgbench comparison in CPU time (medians, µs per transfer): what each side costs the
# machine, and what the service could spend for the 0.85 target.
CPU_PG_P=$(get transfer pgbench "$CONNS" pg_us) CPU_CL_P=$(get transfer pgbench "$CONNS" client_us)
CPU_PG_S=$(get transfer session "$CLIENTS" pg_us) CPU_SVC_S=$(get transfer session "$CLIENTS" svc_us)
CPU_SYS_S=$(get transfer session "$CLIENTS" sys_us) CPU_CL_S=$(get transfer session "$CLIENTS" client_us)
cpu_budget() {
  awk -v pp="$CPU_PG_P" -v cp="$CPU_CL_P" -v ps="$CPU_PG_S" -v ss="$CPU_SVC_S" -v ys="$CPU_SYS_S" \
      -v cs="$CPU_CL_S" -v cores="$(nproc)" 'BEGIN {
    if (pp == "" || ps == "" || pp == "-" || ps == "-") { print "(not measured in this run)"; exit }
    tp = pp + cp; ts = ps + ss + cs; budget = tp / 0.85 - ps - cs
    print "| per transfer, CPU µs (medians) | PostgreSQL | client side | total | capacity of " cores " cores |"
    print "|---|---:|---:|---:|---:|"
    printf "| pgbench | %d | %d (pgbench) | %d | %.0f tx/s |\n", pp, cp, tp, cores * 1e6 / tp
    printf "| service | %d | %d (service, %d of it in the kernel) + %d (wrk) | %d | %.0f req/s |\n", \
      ps, ss, ys, cs, ts, cores * 1e6 / ts
    print ""
    printf "CPU-bound ratio: %.2f. For 0.85 the service could spend at most %d µs per transfer (%d µs / 0.85,\n", tp / ts, budget, tp
    printf "minus PostgreSQL'"'"'s and wrk'"'"'s share); it spends %d µs, %d µs of them in the kernel alone (the HTTP\n", ss, ys
    print "socket and five PostgreSQL round trips). pgbench has neither HTTP, JSON nor a load generator of its own"
    print "in front, and on this machine all three share the same cores with PostgreSQL."
  }'
}

mib() { awk -v k="$1" 'BEGIN { if (k == "-" || k == "") print "-"; else printf "%.1f", k / 1024 }'; }
spread() { awk -v lo="$1" -v hi="$2" -v m="$3" 'BEGIN { if (m + 0 == 0) print "-"; else printf "±%.1f %%", 50 * (hi - lo) / m }'; }

table() {
  echo "| workload | side | HTTP clients | DB conns | req/s (median) | min – max | spread | p50 ms | p99 ms | non-2xx | peak RSS MiB | statements/req | pings/req | CPU µs/req: service | PostgreSQL | client | foreign CPU |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  while IFS=$'\t' read -r g s c n r lo hi p50 p99 e rss conns st pg cs cp cc cf _; do
    local label=$s clients=$c
    [ "$s" = pgbench ] && { label="pgbench (no HTTP)"; clients="–"; cs="–"; }
    [ "$s" = session ] && label="service (DbSession)"
    [ "$s" = baseline ] && label="hand-written baseline"
    [ "$s" = nocache ] && label="service, \`DB_STATEMENT_CACHE=false\`"
    [ "$s" = defaults ] && label="service, defaults"
    [ "$s" = peer ] && label="axum + sqlx + axum-sqlx-tx peer"
    printf '| %s | %s | %s | %s | %.0f | %.0f – %.0f | %s | %.2f | %.2f | %s | %s | %s | %s | %s | %s | %s | %s %% |\n' \
      "$g" "$label" "$clients" "$conns" "$r" "$lo" "$hi" "$(spread "$lo" "$hi" "$r")" "$p50" "$p99" "$e" \
      "$(mib "$rss")" "$st" "$pg" "$cs" "$cp" "$cc" "$cf"
  done <"$SUMMARY"
}

targets() {
  echo "| target | measured: median (range) over the $REPS repetitions | goal | |"
  echo "|---|---:|---:|---|"
  echo "| transfer req/s, session / baseline | $TX_RATIO ($TX_RATIO_LO – $TX_RATIO_HI) | ≥ 0.97 | $(verdict "$TX_RATIO" '>=' 0.97) |"
  echo "| transfer p99, session / baseline | $TX_P99 ($TX_P99_LO – $TX_P99_HI) | ≤ 1.10 | $(verdict "$TX_P99" '<=' 1.10) |"
  echo "| read req/s, session / baseline | $RD_RATIO ($RD_RATIO_LO – $RD_RATIO_HI) | ≥ 0.97 | $(verdict "$RD_RATIO" '>=' 0.97) |"
  echo "| read p99, session / baseline | $RD_P99 ($RD_P99_LO – $RD_P99_HI) | ≤ 1.10 | $(verdict "$RD_P99" '<=' 1.10) |"
  echo "| 90/10 mix req/s, session / baseline | $MX_RATIO ($MX_RATIO_LO – $MX_RATIO_HI) | ≥ 0.97 | $(verdict "$MX_RATIO" '>=' 0.97) |"
  echo "| 90/10 mix p99, session / baseline | $MX_P99 ($MX_P99_LO – $MX_P99_HI) | ≤ 1.10 | $(verdict "$MX_P99" '<=' 1.10) |"
  echo "| transfer req/s, service / pgbench tx/s | $PG_RATIO ($PG_RATIO_LO – $PG_RATIO_HI) | ≥ 0.85 | $(verdict "$PG_RATIO" '>=' 0.85) |"
  echo "| (for reference) transfer req/s, baseline / pgbench tx/s | $BP_RATIO ($BP_RATIO_LO – $BP_RATIO_HI) | | |"
  echo "| in CPU time (robust to other load): transfer capacity, session / baseline¹ | $TX_CAP ($TX_CAP_LO – $TX_CAP_HI) | ≥ 0.97 | $(verdict "$TX_CAP" '>=' 0.97) |"
  echo "| in CPU time: read capacity, session / baseline¹ | $RD_CAP ($RD_CAP_LO – $RD_CAP_HI) | ≥ 0.97 | $(verdict "$RD_CAP" '>=' 0.97) |"
  echo "| in CPU time: 90/10 mix capacity, session / baseline¹ | $MX_CAP ($MX_CAP_LO – $MX_CAP_HI) | ≥ 0.97 | $(verdict "$MX_CAP" '>=' 0.97) |"
  echo "| in CPU time: transfer capacity, service / pgbench² | $PG_CAP ($PG_CAP_LO – $PG_CAP_HI) | ≥ 0.85 | $(verdict "$PG_CAP" '>=' 0.85) |"
  echo "| service CPU per request, session − baseline, µs: transfer | $TX_SVC ($TX_SVC_LO – $TX_SVC_HI) | | |"
  echo "| service CPU per request, session − baseline, µs: read | $RD_SVC ($RD_SVC_LO – $RD_SVC_HI) | | |"
  echo "| statements per transfer, session − baseline (session $ST_TX_S, baseline $ST_TX_B, pgbench $ST_TX_P): the transaction-id query pipelined with COMMIT, no round trip | $TX_EXTRA | ≤ 1 | $(verdict "$TX_EXTRA" '<=' 1.005) |"
  echo "| pings per read inside a session | $PING_RD_S | 0 | $(verdict "$PING_RD_S" '<=' 0.001) |"
  echo "| errors (non-2xx and socket) over the whole sweep | $SWEEP_ERRORS | 0 | $(verdict "$SWEEP_ERRORS" '<=' 0) |"
  echo "| req/s at $LAST_LEVEL clients / the peak of the same sweep repetition | $SWEEP_TAIL | ≥ 0.90 | $(verdict "${SWEEP_TAIL%% *}" '>=' 0.90) |"
  echo "| peak RSS at $LAST_LEVEL clients (MiB) | $RSS_LAST_MIB | ≤ 50 | $(verdict "$RSS_LAST_MIB" '<=' 50) |"
  echo "| (the cost of PgBouncer's transaction mode) transfer req/s, \`DB_STATEMENT_CACHE=false\` / session | $NC_TX_RATIO ($NC_TX_RATIO_LO – $NC_TX_RATIO_HI) | | |"
  echo "| in CPU time: transfer capacity, \`DB_STATEMENT_CACHE=false\` / session² | $NC_TX_CAP ($NC_TX_CAP_LO – $NC_TX_CAP_HI) | | |"
  echo "| service CPU per transfer, \`DB_STATEMENT_CACHE=false\` − session, µs | $NC_TX_SVC ($NC_TX_SVC_LO – $NC_TX_SVC_HI) | | |"
  echo "| read req/s, \`DB_STATEMENT_CACHE=false\` / session | $NC_RD_RATIO ($NC_RD_RATIO_LO – $NC_RD_RATIO_HI) | | |"
  echo "| in CPU time: read capacity, \`DB_STATEMENT_CACHE=false\` / session² | $NC_RD_CAP ($NC_RD_CAP_LO – $NC_RD_CAP_HI) | | |"
  echo "| service CPU per read, \`DB_STATEMENT_CACHE=false\` − session, µs | $NC_RD_SVC ($NC_RD_SVC_LO – $NC_RD_SVC_HI) | | |"
  echo
  echo "¹ The throughput a machine with no other load would reach if CPU is what limits it: the total CPU per"
  echo "request of the baseline over the session's, where the cluster's and wrk's share is the pair's mean (both"
  echo "sides send the same statements, below), so that only the service's own CPU differs."
  echo "² The same with every share as measured: (PostgreSQL + pgbench) over (PostgreSQL + service + wrk); for"
  echo "\`DB_STATEMENT_CACHE=false\`, (PostgreSQL + service + wrk) of the session over the same of that side: the"
  echo "server's extra work (a parse and a plan per statement) counts too."
}

# Out of the box: the service with no tuning variables set against the peer (bench/peer),
# paired within each repetition like the other comparisons. Full runs only.
outside() {
  local g what goal_rps rps rps_lo rps_hi p99 p99_lo p99_hi
  if [ -z "$OUTSIDE_SIDES" ]; then
    echo "(not measured in this run: a smoke run does not build the peer)"
    return
  fi
  echo "| target | measured: median (range) over the $REPS repetitions | goal | |"
  echo "|---|---:|---:|---|"
  for g in transfer read; do
    if [ "$g" = transfer ]; then what="transfer (\`POST /transfers\`)" goal_rps=1.10
    else what="read (\`GET /accounts/{id}\`)" goal_rps=1.30; fi
    read -r rps rps_lo rps_hi < <(paired "$g" defaults "$CLIENTS" peer "$CLIENTS" rps)
    read -r p99 p99_lo p99_hi < <(paired "$g" defaults "$CLIENTS" peer "$CLIENTS" p99)
    echo "| $what req/s, service defaults / peer | $rps ($rps_lo – $rps_hi) | ≥ $goal_rps | $(verdict "$rps" '>=' "$goal_rps") |"
    echo "| $what p99, service defaults / peer | $p99 ($p99_lo – $p99_hi) | ≤ 1.00 | $(verdict "$p99" '<=' 1.00) |"
  done
  for g in transfer read; do
    read -r rps rps_lo rps_hi < <(paired "$g" session "$CLIENTS" peer "$CLIENTS" rps)
    echo "| (for reference) $g req/s, service as configured above / peer | $rps ($rps_lo – $rps_hi) | | |"
  done
}

statements() { # tag title
  local f
  f=$(ls "$OUT/stmts/$1"-r1.tsv 2>/dev/null) || return 0
  local n
  n=$(awk '{print $1}' <<<"$(stats_per_request "$f")")
  echo "$2 ($n requests):"
  echo
  echo '| per request | statement |'
  echo '|---:|---|'
  awk -F'\t' -v n="$n" '{ q = $2; if (length(q) > 160) q = substr(q, 1, 157) "..."; gsub(/\|/, "\\|", q)
                         printf "| %.3f | `%s` |\n", $1 / n, q }' "$f"
  echo
}

# The chart: throughput (median, min–max) and p99 against client connections.
CHART_DATA=$OUT/sweep.dat
for c in $SWEEP; do
  echo "$c $(get sweep session "$c" rps) $(get sweep session "$c" rps_min) $(get sweep session "$c" rps_max) $(get sweep session "$c" p99)"
done >"$CHART_DATA"
if wanted sweep && command -v gnuplot >/dev/null 2>&1; then
  mkdir -p "$(dirname "$CHART")"
  gnuplot -e "datafile='$CHART_DATA'; outfile='$CHART'; conns=$CONNS; cores=$(nproc)" bench/concurrency.gp \
    || die "gnuplot failed"
fi

{
  echo "<!-- bench:results:begin (written by scripts/bench.sh; edit outside the markers) -->"
  echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)),"
  echo "$(free -m | awk '/^Mem:/ { printf "%.0f GiB RAM", $2 / 1024 }'), $(uname -sr), PostgreSQL $PG_VERSION, $(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2),"
  echo "commit \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (with local changes)')."
  echo "Shared machine: load average $LOAD_BEFORE before, $LOAD_AFTER after; the whole run took ${ELAPSED} s."
  echo
  echo "Service: \`DB_POOL_SIZE=$POOL_SIZE DB_MAX_OVERFLOW=$MAX_OVERFLOW\` ($CONNS connections), \`HTTP_WORKERS=$WORKERS\`,"
  echo "\`RUST_LOG=$SERVICE_LOG_LEVEL\` (access log on, to a file), release build with \`--features bench\`, a fresh process"
  echo "for every slice. pgbench: \`-M prepared -c $CONNS -j 1\`, no HTTP. wrk: one thread, \`HTTP clients\` connections."
  echo "Comparisons: $REPS repetitions, each running every side for ${DURATION} s after a ${WARMUP} s warm-up, the order"
  echo "flipping between repetitions (A B, B A, ...); the sweep: $SWEEP_REPS repetitions. The table shows the median,"
  echo "the range and the spread (half the range over the median). \`DB conns\`: the most server connections the"
  echo "process held (pool and readiness probe); \`peak RSS\`: its VmHWM. \`statements/req\`: from"
  echo "pg_stat_statements, reset after the warm-up, divided by the requests the server saw; \`pings/req\`: of those,"
  echo "\`SELECT 1\` check-out pings. \`CPU µs/req\`: user and system time per request of the service process, of"
  echo "the whole cluster and of the load generator; \`foreign CPU\`: the share of the machine's busy time that"
  echo "went to other processes during the slice."
  echo
  table
  echo
  echo "### Targets"
  echo
  targets
  echo
  echo "### Out of the box: the service against an axum + sqlx + axum-sqlx-tx peer"
  echo
  echo "\`service, defaults\`: the same binary with no \`HTTP_WORKERS\`, \`DB_POOL_SIZE\`, \`DB_MAX_OVERFLOW\` or"
  echo "\`RUST_LOG\` set ($(nproc) workers here, 5 + 10 connections, access log on), as a user starts it. \`peer\`:"
  echo "bench/peer, the same routes and SQL on axum, sqlx and axum-sqlx-tx as their documentation shows (sqlx pool"
  echo "5 to 15 connections, Tokio's default runtime, no per-request logging), release build. Both run in the"
  echo "same interleaved slices as the sides above; the ratios are paired within each repetition."
  echo
  outside
  echo
  echo "### The pgbench ratio in CPU time"
  echo
  cpu_budget
  echo
  echo "### Round trips: what the server received (first run of each)"
  echo
  statements "transfer-session-c$CLIENTS" "Transfer through the service (\`POST /transfers\`)"
  statements "transfer-baseline-c$CLIENTS" "Transfer through the hand-written baseline"
  statements "transfer-pgbench-c$CONNS" "Transfer through pgbench"
  statements "read-session-c$CLIENTS" "Read through the service (\`GET /accounts/{id}\`)"
  statements "read-baseline-c$CLIENTS" "Read through the hand-written baseline"
  statements "transfer-peer-c$CLIENTS" "Transfer through the peer"
  statements "read-peer-c$CLIENTS" "Read through the peer"
  echo "\\* Counted from pgbench's transactions: PostgreSQL 15's pg_stat_statements counts a BEGIN or COMMIT"
  echo "that pgbench prepared only at its first execution on each connection."
  echo
  echo "### Concurrency sweep (\`POST /transfers\`)"
  echo
  echo "![throughput and p99 versus client connections]($CHART_LINK)"
  echo "<!-- bench:results:end -->"
} >"$OUT/results.md"

if [ -f "$REPORT" ] && grep -q '<!-- bench:results:begin' "$REPORT"; then
  awk -v results="$OUT/results.md" '
    /<!-- bench:results:begin/ { while ((getline line < results) > 0) print line; skip = 1; next }
    /<!-- bench:results:end/ { skip = 0; next }
    !skip { print }' "$REPORT" >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
else
  { echo "# Benchmarks"; echo; cat "$OUT/results.md"; } >"$REPORT"
fi

echo
table
echo
targets
echo
outside
echo
log "report: $REPORT; chart: $CHART; raw results: $RESULTS (took ${ELAPSED} s)"

# --- smoke checks -----------------------------------------------------------------------

if [ "$SMOKE" = 1 ]; then
  fail=0
  check() { # description condition-result
    if [ "$2" = yes ]; then log "ok: $1"; else log "FAILED: $1"; fail=1; fi
  }
  # yes if the awk expression over v1, v2, ... holds; no if it does not or if any value
  # is missing or not a number.
  yes_if() {
    local expr=$1
    shift
    awk "BEGIN {
      ok = 1
      for (i = 1; i < ARGC; i++) { if (ARGV[i] !~ /^-?[0-9]+([.][0-9]+)?\$/) ok = 0; v[i] = ARGV[i] + 0 }
      v1 = v[1]; v2 = v[2]; v3 = v[3]; v4 = v[4]
      print (ok && ($expr)) ? \"yes\" : \"no\"
    }" "$@"
  }
  # The pgbench script's statement count is the reference a transfer must not exceed.
  EXPECTED_TX=$(grep -cE '^(BEGIN|SELECT|UPDATE|INSERT|COMMIT)' bench/pgbench/transfer.sql)
  # Which statements, not only how many: a ROLLBACK in place of the COMMIT costs as many.
  # Requests one at a time, so that none is in flight at the reset or the read and the
  # counts are exact: transfers, every fifth naming an account that does not exist (404,
  # which must roll back), then reads. Read: "2xx other commits rollbacks inserts
  # transfers_2xx".
  commit_check() { # requests
    local i code from ok=0 other=0 transfers_ok
    local url="http://127.0.0.1:"
    start_service commits
    url=$url${SVC_PORT[commits]}
    stats_reset
    for i in $(seq "$1"); do
      from=$((i % ACCOUNTS + 1))
      [ $((i % 5)) = 0 ] && from=$((ACCOUNTS + 1))
      code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "{\"from_account_id\":$from,\"to_account_id\":$((from % ACCOUNTS + 1)),\"amount\":1}" \
        "$url/transfers") || code=000
      case $code in 2??) ok=$((ok + 1)) ;; *) other=$((other + 1)) ;; esac
    done
    transfers_ok=$ok
    for i in $(seq "$1"); do
      code=$(curl -s -o /dev/null -w '%{http_code}' "$url/accounts/$((i % ACCOUNTS + 1))") || code=000
      case $code in 2??) ok=$((ok + 1)) ;; *) other=$((other + 1)) ;; esac
    done
    stats_read >"$OUT/stmts/commit-check.tsv"
    stop_services
    awk -F'\t' -v ok="$ok" -v other="$other" -v tx="$transfers_ok" '
      $2 == "COMMIT" { commits += $1 }
      $2 == "ROLLBACK" { rollbacks += $1 }
      $2 ~ /^INSERT INTO "transfers"/ { inserts += $1 }
      END { printf "%d %d %d %d %d %d\n", ok, other, commits, rollbacks, inserts, tx }' \
      "$OUT/stmts/commit-check.tsv"
  }
  read -r CC_OK CC_OTHER CC_COMMITS CC_ROLLBACKS CC_INSERTS CC_TX_OK < <(commit_check 50)
  check "one result line per run ($RUN_NO)" "$(yes_if 'v1 == v2' "$(wc -l <"$RESULTS")" "$RUN_NO")"
  check "every run parsed with throughput > 0" \
    "$(awk -F'\t' '$5 + 0 <= 0 || $7 == "" { bad = 1 } END { print bad ? "no" : "yes" }' "$RESULTS")"
  check "no errors in any run" "$(awk -F'\t' '$8 != 0 { bad = 1 } END { print bad ? "no" : "yes" }' "$RESULTS")"
  check "pgbench runs $EXPECTED_TX statements per transfer ($ST_TX_P)" \
    "$(yes_if 'v1 == v2' "$ST_TX_P" "$EXPECTED_TX")"
  # The session adds one statement to every transaction: the transaction-id query
  # pipelined ahead of COMMIT (the session crate's session/commit.rs), which costs no round
  # trip.
  check "a transfer through the session costs $EXPECTED_TX statements and the id query besides pings ($ST_TX_S, pings $PING_TX_S)" \
    "$(yes_if 'v1 - v2 > v3 + 0.999 && v1 - v2 < v3 + 1.001' "$ST_TX_S" "$PING_TX_S" "$EXPECTED_TX")"
  check "every 2xx committed: COMMITs = 2xx ($CC_COMMITS, $CC_OK); transfer INSERTs = 2xx transfers ($CC_INSERTS, $CC_TX_OK)" \
    "$(yes_if 'v1 == v2 && v3 == v4 && v4 > 0 && v2 > v4' "$CC_COMMITS" "$CC_OK" "$CC_INSERTS" "$CC_TX_OK")"
  check "every other answer rolled back: ROLLBACKs = non-2xx ($CC_ROLLBACKS, $CC_OTHER)" \
    "$(yes_if 'v1 == v2 && v2 > 0' "$CC_ROLLBACKS" "$CC_OTHER")"
  check "the baseline transfer costs one fewer: no id query ($ST_TX_B)" \
    "$(yes_if 'v2 - v1 > 0.95 && v2 - v1 < 1.05' "$ST_TX_B" "$ST_TX_S")"
  # A read runs read-only: no transaction id to learn, so no id query either.
  check "a read costs BEGIN READ ONLY, SELECT, COMMIT and no ping, as the baseline (session $ST_RD_S, pings $PING_RD_S; baseline $ST_RD_B)" \
    "$(yes_if 'v1 - v2 > 2.999 && v1 - v2 < 3.001 && v2 < 0.01 && v3 < 3.05' "$ST_RD_S" "$PING_RD_S" "$ST_RD_B")"
  check "the chart was drawn" "$([ -s "$CHART" ] && grep -q '<svg' "$CHART" && echo yes || echo no)"
  check "the report and its tables were written" \
    "$(grep -q '| transfer req/s, session / baseline |' "$REPORT" && echo yes || echo no)"
  [ "$fail" = 0 ] || die "smoke run failed (see $OUT)"
  log "smoke run passed in ${ELAPSED} s"
fi
exit
}
