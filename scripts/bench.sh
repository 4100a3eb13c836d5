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
#   replica   GET /accounts/{id} with one streaming replica of the cluster (pg_basebackup,
#             scripts/pg.sh replica) in DATABASE_REPLICA_URLS | the primary alone; the
#             service's db_reads_total must show 99 % of a replica slice's reads on the
#             replica, or the run fails
#   pinned    close to the database's limit: the cluster pinned (taskset) to CPU 0, the
#             service, wrk and pgbench to CPU 1; POST /transfers | pgbench at the same
#             server connections (the smoke run: one second of each)
#   sweep     POST /transfers at 1, 8, 32, 128 and 512 client connections
# Every slice runs a fresh process of the same binary (the sides differ only in the routes
# they load; for the out-of-the-box comparison, full runs only, the service with no tuning
# variables set, "defaults", and bench/peer, an axum + sqlx + axum-sqlx-tx service of the
# same routes and SQL, "peer"), warms up, resets pg_stat_statements, measures (throughput,
# latency, errors; the process's RSS and server connections, sampled; CPU time per request
# of the service, the cluster and the load generator), then reads the statements the
# server received.
#
# This script starts things and writes what they produce under $OUT (results.tsv, one
# line per slice; meta.tsv; stmts/); scripts/bench_report.py reads each slice's output,
# computes the medians, ranges and ratios, writes the report and runs the smoke checks.
#
# Knobs (environment): BENCH_DURATION (s per measured run), BENCH_WARMUP (s), BENCH_REPS
# (repetitions of each comparison), BENCH_SWEEP_REPS,
# BENCH_CLIENTS (HTTP connections for the comparisons), BENCH_SWEEP ("1 8 32 128 512"),
# BENCH_POOL_SIZE / BENCH_MAX_OVERFLOW (4 / 4), BENCH_WORKERS (HTTP_WORKERS of the service,
# 1), BENCH_RUST_LOG (info), BENCH_ACCOUNTS,
# BENCH_ONLY (a subset of "transfer read mix replica pinned sweep", for exploring: the report, with gaps,
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
ensure_tool taskset util-linux
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
ONLY=" ${BENCH_ONLY:-transfer read mix replica pinned sweep} "
wanted() { [[ $ONLY == *" $1 "* ]]; }

# The read side's replica: a streaming copy of the seeded cluster, with the same server
# options (pg_stat_statements, so that the reads it serves are counted there).
REPLICA_URL=
if wanted replica; then
  REPLICA_ADMIN_URL=$(scripts/pg.sh replica) || die "the replica did not start"
  REPLICA_URL=${REPLICA_ADMIN_URL%/*}/$DB_NAME
  [ "$(psql "$REPLICA_URL" -c "SELECT pg_is_in_recovery() AND count(*) = $ACCOUNTS FROM accounts")" = t ] \
    || die "the replica is not a hot standby with the seeded accounts"
  # It runs during the replica slices only, so that the other groups measure the primary
  # alone, with no walsender woken at every commit and no replay on the shared cores.
  scripts/pg.sh replica-stop
fi
# Starts the replica again and waits until it has replayed everything the primary wrote
# while it was stopped, so that its lag lets the service route reads to it.
replica_up() {
  scripts/pg.sh replica >/dev/null || die "the replica did not start again"
  local target i
  target=$(psql "$DB_URL" -c "SELECT pg_current_wal_flush_lsn()")
  for i in $(seq 300); do
    [ "$(psql "$REPLICA_URL" -c "SELECT pg_last_wal_replay_lsn() >= '$target'")" = t ] && return 0
    sleep 0.1
  done
  die "the replica did not catch up within 30 s"
}

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
    # As configured for the comparisons, its reads sent to the replica.
    replica) CMD=(env -i "${common[@]}" DB_POOL_SIZE="$POOL_SIZE" DB_MAX_OVERFLOW="$MAX_OVERFLOW"
                  HTTP_WORKERS="$WORKERS" RUST_LOG="$SERVICE_LOG_LEVEL" DATABASE_REPLICA_URLS="$REPLICA_URL" "$BIN") ;;
    *) CMD=(env -i "${common[@]}" DB_POOL_SIZE="$POOL_SIZE" DB_MAX_OVERFLOW="$MAX_OVERFLOW"
            HTTP_WORKERS="$WORKERS" RUST_LOG="$SERVICE_LOG_LEVEL" "$BIN") ;;
  esac
}

# A service process, ready to serve.
start_service() { # name [side]
  local name=$1 logfile=$OUT/run/service-$1.log i port CMD READY_PATH
  port=$(free_port)
  side_command "${2:-}" "$port"
  (cd "$OUT/run" && exec "${CLIENT_CPU[@]}" "${CMD[@]}") >"$logfile" 2>&1 &
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

# On the primary, or on the server named (the replica, for the side whose reads go there).
stats_reset() { psql "${1:-$DB_URL}" -c "SELECT pg_stat_statements_reset()" >/dev/null; }

# calls<TAB>statement for everything the server ran in the bench database since the reset.
stats_read() { # [url]
  psql -F $'\t' "${1:-$DB_URL}" -c "
    SELECT s.calls, regexp_replace(s.query, '\\s+', ' ', 'g')
    FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
    WHERE d.datname = '$DB_NAME' AND s.query NOT LIKE '%pg_stat_statements%'
    ORDER BY s.calls DESC, s.query"
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
# Runs a command with its CPU time ("user sys" seconds, the file's last line; the
# command's own stderr comes before it) written to the named file.
timed() { # file command...
  local file=$1 TIMEFORMAT='%3U %3S'
  shift
  { time "$@"; } 2>"$file"
}

# One slice's line of results.tsv, from its raw files (scripts/bench_report.py slice).
RUN_NO=0
record() { # wrk|pgbench group side clients rep --output F --stmts F --before S --after S ...
  python3 scripts/bench_report.py slice "$@" --client-cpu "$OUT/run/client-cpu" \
    --clk-tck "$CLK_TCK" >>"$RESULTS" || die "could not read the results of $2 $3"
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
  if [ ${#CLIENT_CPU[@]} -gt 0 ] && [ "$(taskset -p -c "$pid" | sed 's/.*: //')" != "${CLIENT_CPU[-1]}" ]; then
    die "the service of $group $side is not pinned to CPU ${CLIENT_CPU[-1]}"
  fi
  # The replica side's reads are counted where they run; the replica group's slices read
  # the service's db_reads_total before and after (where its reads went).
  local stats_url=$DB_URL metrics=()
  [ "$side" = replica ] && stats_url=$REPLICA_URL
  # One wrk thread: it drives far more requests per second than the service can answer
  # here, and every extra thread takes CPU from the service and the database.
  "${CLIENT_CPU[@]}" wrk -t1 -c"$clients" -d"${WARMUP}s" --timeout 10s -s "bench/wrk/$script" "$url" -- "$@" \
    >"$OUT/run/warmup.txt" 2>&1 || { cat "$OUT/run/warmup.txt" >&2; die "wrk failed (warm-up of $tag)"; }
  stats_reset "$stats_url"
  if [ "$group" = replica ]; then
    curl -sf "$url/metrics" >"$OUT/run/$tag.metrics-before" || die "no /metrics ($tag)"
  fi
  sample_connections "$pid" "$DURATION" >"$OUT/run/conns.txt" &
  local sampler=$! before after status=0
  before=$(cpu_snapshot "$pid")
  timed "$OUT/run/client-cpu" "${CLIENT_CPU[@]}" wrk -t1 -c"$clients" -d"${DURATION}s" --timeout 10s \
    -s "bench/wrk/$script" "$url" -- "$@" >"$OUT/run/$tag.wrk" 2>&1 || status=$?
  after=$(cpu_snapshot "$pid")
  [ "$status" = 0 ] || { cat "$OUT/run/$tag.wrk" >&2; die "wrk failed ($tag)"; }
  wait "$sampler" || true
  # Let requests still in flight when wrk stopped finish before the statements are read.
  sleep 0.2
  stats_read "$stats_url" >"$OUT/stmts/$tag.tsv"
  if [ "$group" = replica ]; then
    curl -sf "$url/metrics" >"$OUT/run/$tag.metrics-after" || die "no /metrics ($tag)"
    metrics=(--metrics-before "$OUT/run/$tag.metrics-before" --metrics-after "$OUT/run/$tag.metrics-after")
    [ "$side" = replica ] && metrics+=(--min-replica-share 0.99)
  fi
  local rss
  rss=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$pid/status")
  stop_services
  record wrk "$group" "$side" "$clients" "$rep" --output "$OUT/run/$tag.wrk" \
    --stmts "$OUT/stmts/$tag.tsv" --before "$before" --after "$after" \
    --conns "$(cat "$OUT/run/conns.txt")" --rss "$rss" "${metrics[@]}"
}

# The database's own limit: the transfer's SQL through pgbench, same connection count.
run_pgbench() { # rep [group]
  local rep=$1 group=${2:-transfer}
  local tag="$group-pgbench-c$CONNS-r$1"
  local args=(-n -M prepared -c "$CONNS" -j 1 -D accounts="$ACCOUNTS" -f bench/pgbench/transfer.sql)
  RUN_NO=$((RUN_NO + 1))
  "${CLIENT_CPU[@]}" "$PGBENCH" "${args[@]}" -T "$WARMUP" "$DB_URL" >"$OUT/run/warmup.txt" 2>&1 \
    || { cat "$OUT/run/warmup.txt" >&2; die "pgbench failed"; }
  stats_reset
  rm -rf "$OUT/run/pgb" && mkdir -p "$OUT/run/pgb"
  local before after status=0
  # pgbench's backends start and end with it. A backend that exits between the two reads
  # of a snapshot (the postmaster's reaped children, then the live ones) would be counted
  # in neither, so each snapshot waits until the previous run's backends are reaped.
  sleep 0.5
  before=$(cpu_snapshot 0)
  timed "$OUT/run/client-cpu" "${CLIENT_CPU[@]}" "$PGBENCH" "${args[@]}" -T "$DURATION" -l --log-prefix="$OUT/run/pgb/log" \
    "$DB_URL" >"$OUT/run/$tag.txt" 2>&1 || status=$?
  sleep 0.5
  after=$(cpu_snapshot 0)
  [ "$status" = 0 ] || { cat "$OUT/run/$tag.txt" >&2; die "pgbench failed ($tag)"; }
  sleep 0.2
  # The BEGIN and COMMIT counts are corrected there (see pgbench_statements).
  stats_read >"$OUT/stmts/$tag.tsv"
  record pgbench "$group" pgbench "$CONNS" "$rep" --output "$OUT/run/$tag.txt" \
    --stmts "$OUT/stmts/$tag.tsv" --before "$before" --after "$after" \
    --latency-log-dir "$OUT/run/pgb"
}

# The pinned group's placement: the cluster on CPU 0, the service, wrk and pgbench on CPU 1
# (CLIENT_CPU, a taskset prefix of their command lines). Pinning the postmaster and its
# children pins the backends forked later too (they inherit it); the slices of the other
# groups run with the cluster's own affinity, restored after each pinned repetition.
CLIENT_CPU=()
PG_AFFINITY=$(taskset -p -c "$PG_POSTMASTER" | sed 's/.*: //')
# (The replica is stopped outside the replica slices, so it is not in the way.)
pin_cluster() { # cpu-list
  local pid
  for pid in "$PG_POSTMASTER" $(ps -o pid= --ppid "$PG_POSTMASTER"); do
    taskset -a -p -c "$1" "$pid" >/dev/null 2>&1 || true
  done
  [ "$(taskset -p -c "$PG_POSTMASTER" | sed 's/.*: //')" = "$1" ] \
    || die "could not pin the cluster ($PG_POSTMASTER) to CPU $1"
}
PINNED=1
if wanted pinned && [ "$(nproc)" -lt 2 ]; then
  log "one CPU only: the pinned group is skipped"
  PINNED=0
fi

# --- the runs ---------------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "cluster: PostgreSQL $PG_VERSION; service pool $POOL_SIZE + $MAX_OVERFLOW; $REPS x ${DURATION}s per configuration"
T=/transfers B=/_bench/transfers RA=/accounts/ RB=/_bench/accounts/
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
  if wanted replica; then
    replica_up
    for side in $(in_order "$rep" primary replica); do
      run_wrk replica "$side" "$CLIENTS" "$rep" read.lua "$RA" "$ACCOUNTS"
    done
    scripts/pg.sh replica-stop
  fi
  if wanted pinned && [ "$PINNED" = 1 ]; then
    pin_cluster 0
    CLIENT_CPU=(taskset -c 1) # the CPU last: run_wrk checks the service is on it
    for side in $(in_order "$rep" pgbench session); do
      if [ "$side" = pgbench ]; then run_pgbench "$rep" pinned
      else run_wrk pinned session "$CLIENTS" "$rep" transfer.lua "$T" "$ACCOUNTS"; fi
    done
    CLIENT_CPU=()
    pin_cluster "$PG_AFFINITY"
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

# The run's settings and the machine, for the report (key<TAB>value).
meta() { printf '%s\t%s\n' "$1" "$2" >>"$OUT/meta.tsv"; }
: >"$OUT/meta.tsv"
meta measured_at "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta nproc "$(nproc)"
meta cpu_model "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
meta mem_mib "$(free -m | awk '/^Mem:/ { print $2 }')"
meta uname "$(uname -sr)"
meta pg_version "$PG_VERSION"
meta wrk_version "$(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2)"
meta commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
meta local_changes "$(git diff --quiet HEAD -- src 2>/dev/null && echo 0 || echo 1)"
meta load_before "$LOAD_BEFORE"
meta load_after "$LOAD_AFTER"
meta elapsed "$ELAPSED"
meta runs "$RUN_NO"
meta reps "$REPS"
meta sweep_reps "$SWEEP_REPS"
meta duration "$DURATION"
meta warmup "$WARMUP"
meta clients "$CLIENTS"
meta sweep "$SWEEP"
meta conns "$CONNS"
meta pool_size "$POOL_SIZE"
meta max_overflow "$MAX_OVERFLOW"
meta workers "$WORKERS"
meta log_level "$SERVICE_LOG_LEVEL"
meta outside_sides "$OUTSIDE_SIDES"
meta report "$REPORT"
meta chart "$CHART"
meta chart_link "$CHART_LINK"

# The summary, the chart's data and the report, written from the raw results.
python3 scripts/bench_report.py report "$OUT" || die "the report failed"
if wanted sweep && command -v gnuplot >/dev/null 2>&1; then
  mkdir -p "$(dirname "$CHART")"
  gnuplot -e "datafile='$OUT/sweep.dat'; outfile='$CHART'; conns=$CONNS; cores=$(nproc)" bench/concurrency.gp \
    || die "gnuplot failed"
fi
log "report: $REPORT; chart: $CHART; raw results: $RESULTS (took ${ELAPSED} s)"

# --- smoke checks -----------------------------------------------------------------------

if [ "$SMOKE" = 1 ]; then
  # Which statements, not only how many: a ROLLBACK in place of the COMMIT costs as many.
  # Requests one at a time, so that none is in flight at the reset or the read and the
  # counts are exact: transfers, every fifth naming an account that does not exist (404,
  # which must roll back), then reads. Writes run/commit-check.counts ("2xx other
  # transfers_2xx") and stmts/commit-check.tsv.
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
    echo "$ok $other $transfers_ok" >"$OUT/run/commit-check.counts"
  }
  commit_check 50
  python3 scripts/bench_report.py check "$OUT" || die "smoke run failed (see $OUT)"
  log "smoke run passed in ${ELAPSED} s"
fi
exit
}
