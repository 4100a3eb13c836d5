#!/usr/bin/env bash
# Instructions per request, counted with callgrind: what a request costs the service, and
# what the session layer adds to it, in a unit that does not move with the machine's load.
#
#   scripts/callgrind.sh                 build (release, --features bench) and measure
#   --bin PATH                           measure this ledger binary (built with --features
#                                        bench) instead of building one
#   --requests N                         requests per batch (default 2000)
#   --reps R                             batches per route (default 3)
#   --admin-url URL                      a server-admin URL of a running PostgreSQL to
#                                        create the (throwaway) database on, instead of a
#                                        private cluster started with scripts/pg.sh
#   --env NAME=VALUE                     one more setting for the service (repeatable),
#                                        to measure what a setting costs
#
# What it measures: the service runs under `valgrind --tool=callgrind` with one HTTP
# worker (HTTP_WORKERS=1: one thread serves the requests and drives their connections),
# against a fresh database of 1,000 accounts. After a warm-up (every route, first from as
# many clients as the pool has connections, then from one), each of the four routes gets
# a batch of exactly N requests, sent one at a time over one keep-alive connection; the
# counters are zeroed just before the batch (`callgrind_control --zero`) and dumped just
# after it (`--dump`). A batch's instructions (Ir, all of the process's threads) over N
# are its instructions per request. The four batches run R times in turn (A B C D A B C D
# ...):
#
#   read      GET /accounts/{id}             through the session layer
#             GET /_bench/accounts/{id}      the hand-written baseline
#   transfer  POST /transfers                through the session layer
#             POST /_bench/transfers         the hand-written baseline
#
# How to read it: `instructions per request` is the median over the R batches, `range`
# their smallest and largest; `session − baseline` is what the session layer costs a
# request over the same handler written by hand (both send the same statements, except
# the session's transaction-id query pipelined with its COMMIT). Only the service process
# is counted: not PostgreSQL, not the client, not the kernel. The count does not depend on
# the speed of the machine, but it is not exact to the instruction: how often a request's
# task is woken (and with it the HTTP dispatcher polled, several thousand instructions
# each time) depends on whether PostgreSQL's answer is complete when the service reads
# it, and malloc's work on the state of the heap. So that every answer and every request
# is complete when the service reads it, the service, its own cluster and the client
# share one CPU (taskset), the cluster and the client with a real-time priority where
# that is allowed (root): a backend woken by a query runs to its answer, and the client
# sends its next request, before the service goes on. (Unpinned, on a busy machine, runs
# of the same binary differed by 1.5 % on the session's transfer, whose COMMIT's two
# answers arrived together or apart.) So set up, the batches of a run agree to about
# 0.05 %, and runs to about 0.3 % even with both cores kept busy by other work: compare
# two builds by their medians, over two runs each when they differ by less than 0.5 %.
# With --admin-url the server is neither pinned nor prioritised, and the counts are
# higher (on a stock local server, 10 % and more: the service more often finds no answer
# yet and parks): compare such runs only with each other. The requests mirror
# bench/wrk: reads walk the accounts in turn, transfers move 1 to 100 units from one
# account to the next, without an Idempotency-Key; both sides get the same sequence. The
# environment is the benchmark's (pool 4 + 4, RUST_LOG=info with the access log going to
# a file), plus timeouts long enough for a process that runs some 50 times slower than
# natively.
#
# The dumps stay in target/callgrind (callgrind.out.1 ... in the order of
# results.tsv, one per batch; the table is summary.tsv); `callgrind_annotate
# target/callgrind/callgrind.out.1` shows where a batch's instructions went. A run takes
# two to five minutes with the defaults, depending on the other load on the machine.
set -euo pipefail

# One block, read to its end before any of it runs: an edit of this file during a run
# does not disturb it.
{
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { echo "callgrind: $*" >&2; }
die() { log "$*"; exit 1; }

BIN=
REQUESTS=2000
REPS=3
ADMIN_URL=
EXTRA_ENV=()
while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=$2; shift ;;
    --requests) REQUESTS=$2; shift ;;
    --reps) REPS=$2; shift ;;
    --admin-url) ADMIN_URL=$2; shift ;;
    --env) [[ $2 =~ ^[A-Z_]+=.*$ ]] || die "--env takes NAME=VALUE"; EXTRA_ENV+=("$2"); shift ;;
    *) echo "usage: $0 [--bin PATH] [--requests N] [--reps R] [--admin-url URL] [--env NAME=VALUE]..." >&2; exit 2 ;;
  esac
  shift
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "--requests must be a positive number"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive number"
WARMUP=200
ACCOUNTS=1000
POOL_SIZE=4
OUT=$ROOT/target/callgrind

find_pg_bin() { # name: on PATH or in /usr/lib/postgresql/*/bin (Debian), newest first
  local dir
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/$1" ]; then echo "$dir/$1"; return 0; fi
  done
  return 1
}
for tool in valgrind callgrind_control python3 curl taskset; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (valgrind and callgrind_control: apt-get install valgrind)"
done
PSQL_BIN=$(find_pg_bin psql) || die "psql not found (apt-get install postgresql-client)"
psql() { "$PSQL_BIN" -XAtq -v ON_ERROR_STOP=1 "$@"; }

# --- build ------------------------------------------------------------------------------

if [ -z "$BIN" ]; then
  log "building (release, --features bench)"
  cargo build --quiet --release --features bench --bin ledger
  BIN=$ROOT/target/release/ledger
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
[ -x "$BIN" ] || die "no binary at $BIN"
if [ "$BIN" = "$ROOT/target/release/ledger" ]; then
  BUILT="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src crates Cargo.toml Cargo.lock 2>/dev/null || echo ' with local changes')"
else
  BUILT=${BIN#"$ROOT"/}
fi

# --- database ---------------------------------------------------------------------------

rm -rf "$OUT"
mkdir -p "$OUT/run"
SVC_PID=
DB_NAME=ledger_callgrind
OWN_CLUSTER=0
PIN=()
PIN_CPU=$(($(nproc) - 1))
export PG_STATE_FILE=.pgcallgrind-cluster
cleanup() {
  if [ -n "$SVC_PID" ]; then
    kill -TERM "$SVC_PID" 2>/dev/null || true
    wait "$SVC_PID" 2>/dev/null || true
  fi
  if [ "$OWN_CLUSTER" = 1 ]; then
    scripts/pg.sh down >/dev/null 2>&1 || true
  elif [ -n "$ADMIN_URL" ]; then
    psql "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB_NAME" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$ADMIN_URL" ]; then
  # A leftover from an interrupted run is replaced.
  scripts/pg.sh down >/dev/null 2>&1 || true
  OWN_CLUSTER=1
  ADMIN_URL=$(scripts/pg.sh up)
  # The cluster and the service share one CPU (see the header): the postmaster's new
  # backends inherit its affinity, the service is started under PIN.
  read -r PG_DIR _ <"$PG_STATE_FILE"
  PG_PID=$(head -n 1 "$PG_DIR/data/postmaster.pid")
  taskset -a -cp "$PIN_CPU" "$PG_PID" >/dev/null || die "could not pin the cluster to CPU $PIN_CPU"
  PIN=(taskset -c "$PIN_CPU")
  # Where allowed (root), the cluster and the client also run with a real-time priority:
  # then no other process on the CPU can delay them while the service (which has none)
  # waits, and an answer or a request is always complete when the service reads it.
  if chrt -f 1 true 2>/dev/null && chrt -a -f -p 1 "$PG_PID" >/dev/null 2>&1; then
    PIN=(chrt -f 1 taskset -c "$PIN_CPU")
  fi
else
  # A name of its own on a shared server, so that runs of several checkouts can overlap.
  DB_NAME=${DB_NAME}_$$
fi
DB_URL=${ADMIN_URL%/*}/$DB_NAME
PGOPTIONS="-c client_min_messages=warning" psql "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB_NAME" \
  -c "CREATE DATABASE $DB_NAME"
(cd "$OUT/run" && env -i PATH="$PATH" DATABASE_URL="$DB_URL" RUST_LOG=warn "$BIN" migrate) \
  || die "migrations failed"
psql "$DB_URL" -c "INSERT INTO accounts (name, balance)
                   SELECT 'callgrind ' || g, 1000000000000000 FROM generate_series(1, $ACCOUNTS) AS g" \
  -c "VACUUM ANALYZE accounts"
[ "$(psql "$DB_URL" -c "SELECT count(*) = $ACCOUNTS AND min(id) = 1 AND max(id) = $ACCOUNTS FROM accounts")" = t ] \
  || die "seeding did not produce accounts 1..$ACCOUNTS"

# --- the service under callgrind --------------------------------------------------------

free_port() { # below the ephemeral range, no socket in any state on it (as bench.sh)
  local port
  while :; do
    port=$((20000 + RANDOM % 12000))
    [ -z "$(ss -Htan "sport = :$port" 2>/dev/null)" ] && { echo "$port"; return; }
  done
}
PORT=$(free_port)
# The benchmark's settings (scripts/bench.sh, start_service), and timeouts far beyond what
# a request takes under valgrind: none may fire, nor an idle connection be closed, while a
# batch runs.
(cd "$OUT/run" && exec env -i PATH="$PATH" DATABASE_URL="$DB_URL" HOST=127.0.0.1 PORT="$PORT" \
  DB_POOL_SIZE="$POOL_SIZE" DB_MAX_OVERFLOW=4 HTTP_WORKERS=1 \
  RUN_MIGRATIONS=false SHUTDOWN_DRAIN_SECS=0 SHUTDOWN_TIMEOUT_SECS=60 RUST_LOG=info \
  DB_POOL_TIMEOUT=300 DB_HEALTH_TIMEOUT=60 DB_POOL_IDLE_TIMEOUT=3600 \
  DB_IDLE_IN_TX_TIMEOUT=600000 "${EXTRA_ENV[@]}" \
  taskset -c "$PIN_CPU" valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" --dump-instr=no \
  --vgdb-prefix="$OUT/run/vgdb" "$BIN") >"$OUT/run/service.log" 2>&1 &
SVC_PID=$!
log "service under callgrind (pid $SVC_PID, port $PORT); waiting until it is ready"
ready=0
for _ in $(seq 600); do
  kill -0 "$SVC_PID" 2>/dev/null || { cat "$OUT/run/service.log" >&2; die "the service exited"; }
  if curl -sf -m 30 -o /dev/null "http://127.0.0.1:$PORT/health/ready"; then ready=1; break; fi
  sleep 0.5
done
[ "$ready" = 1 ] || { cat "$OUT/run/service.log" >&2; die "the service did not become ready"; }

# The client: one keep-alive connection per client, one request at a time on it, and every
# answer must be a 2xx. `warm` runs `clients` such clients side by side; `measure` one,
# which sends one request first (the connection's set-up stays out of the count), lets the
# service go idle, zeroes the counters, sends the batch, lets the service finish (its
# access log line, the connection back in the pool) and dumps.
cat >"$OUT/run/client.py" <<'EOF'
import http.client, os, subprocess, sys, threading, time

port, pid, prefix, mode, clients, method, path, n, accounts, label = sys.argv[1:11]
clients, n, accounts = int(clients), int(n), int(accounts)
failed = []

def one(conn, i):
    # Only the headers wrk sends: Host, and for a transfer its body's.
    if method == "GET":
        conn.putrequest("GET", "%s%d" % (path, i % accounts + 1), skip_accept_encoding=True)
        conn.endheaders()
    else:
        source = i % accounts + 1
        body = ('{"from_account_id":%d,"to_account_id":%d,"amount":%d}'
                % (source, source % accounts + 1, i % 100 + 1)).encode()
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    if not 200 <= response.status < 300:
        sys.exit("%s: request %d answered %d: %r" % (label, i, response.status, data[:300]))

def connect():
    return http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)

def control(*args):
    # Without the client's real-time priority, if it has one.
    done = subprocess.run(["callgrind_control", "--vgdb-prefix=" + prefix, *args, pid],
                          capture_output=True, text=True, preexec_fn=lambda: os.sched_setscheduler(
                              0, os.SCHED_OTHER, os.sched_param(0)))
    if done.returncode != 0 or "OK." not in done.stdout:
        sys.exit("callgrind_control %s failed: %s%s" % (" ".join(args), done.stdout, done.stderr))

def client(first):
    try:
        conn = connect()
        for i in range(first, first + n):
            one(conn, i)
    except BaseException as e:
        failed.append(e)

if mode == "warm":
    threads = [threading.Thread(target=client, args=(c * accounts // clients,))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.exit(str(failed[0]))
else:
    conn = connect()
    one(conn, 0)
    time.sleep(0.5)
    control("--zero")
    for i in range(n):
        one(conn, i)
    time.sleep(0.5)
    control("--dump=" + label)
EOF

ROUTES=(
  "read session GET /accounts/"
  "read baseline GET /_bench/accounts/"
  "transfer session POST /transfers"
  "transfer baseline POST /_bench/transfers"
)
# callgrind_control finds the process by the prefix, the user and the host names that
# valgrind took from its environment (LOGNAME or USER, and HOST), so it runs with the
# service's.
client() { # mode clients method path n accounts label
  env -u LOGNAME -u USER HOST=127.0.0.1 "${PIN[@]}" python3 "$OUT/run/client.py" "$PORT" "$SVC_PID" \
    "$OUT/run/vgdb" "$@" || die "the client failed ($7)"
}
# The warm-up fills the pool: POOL_SIZE clients side by side make the worker open that
# many connections, each of which then has prepared every route's statements. Without
# spare connections the idempotency-key purge (a task on the main runtime, once a minute)
# would find none idle and open one of its own, driven by the main thread; once that one
# came back on top of the pool (LIFO), every request would pay two thread wake-ups per
# round trip (some 10 % more instructions) from then on.
log "warm-up: $WARMUP requests per route from each of $POOL_SIZE clients, then $WARMUP from one"
for route in "${ROUTES[@]}"; do
  read -r _ _ method path <<<"$route"
  client warm "$POOL_SIZE" "$method" "$path" "$WARMUP" "$ACCOUNTS" warm
done
for route in "${ROUTES[@]}"; do
  read -r _ _ method path <<<"$route"
  client warm 1 "$method" "$path" "$WARMUP" "$ACCOUNTS" warm
done

RESULTS=$OUT/results.tsv
printf 'rep\tgroup\tside\troute\trequests\tinstructions\tper_request\tdump\n' >"$RESULTS"
dump=0
for rep in $(seq "$REPS"); do
  for route in "${ROUTES[@]}"; do
    read -r group side method path <<<"$route"
    label="$group-$side-r$rep"
    started=$(date +%s)
    client measure 1 "$method" "$path" "$REQUESTS" "$ACCOUNTS" "$label"
    dump=$((dump + 1))
    file=$OUT/callgrind.out.$dump
    for _ in $(seq 100); do grep -q '^totals:' "$file" 2>/dev/null && break; sleep 0.1; done
    grep -q "^desc: Trigger: dump $label\$" "$file" || die "$file is not the dump of $label"
    total=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$file")
    [ -n "$total" ] || die "no totals in $file"
    route_name="$method $path"
    [ "$method" = GET ] && route_name="$method $path{id}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$group" "$side" "$route_name" "$REQUESTS" \
      "$total" "$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN { printf "%.0f", t / n }')" \
      "$(basename "$file")" >>"$RESULTS"
    log "$(printf 'rep %s %-28s %d requests in %3d s: %s instructions' "$rep" "$route_name" \
      "$REQUESTS" $(($(date +%s) - started)) "$total")"
  done
done

kill -TERM "$SVC_PID" 2>/dev/null || true
wait "$SVC_PID" 2>/dev/null || true
SVC_PID=

# --- report -----------------------------------------------------------------------------

# One line per route: group side route median min max (instructions per request).
SUMMARY=$OUT/summary.tsv
awk -F'\t' -v OFS='\t' '
  NR == 1 { next }
  { k = $2 OFS $3; if (!(k in n)) { order[++keys] = k; route[k] = $4 }
    v[k, ++n[k]] = $7 }
  END {
    for (i = 1; i <= keys; i++) {
      k = order[i]; m = n[k]
      for (a = 1; a <= m; a++) x[a] = v[k, a]
      for (a = 2; a <= m; a++) { t = x[a]; for (b = a - 1; b >= 1 && x[b] > t; b--) x[b + 1] = x[b]; x[b + 1] = t }
      med = m % 2 ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
      printf "%s\t%s\t%.0f\t%d\t%d\n", k, route[k], med, x[1], x[m]
    }
  }' "$RESULTS" >"$SUMMARY"

echo
echo "Instructions per request ($BUILT; callgrind, one worker, $REPS x $REQUESTS sequential"
echo "requests per route; median and range over the repetitions):"
echo
awk -F'\t' -v reps="$REPS" '
  { route[$1, $2] = $3; med[$1, $2] = $4; lo[$1, $2] = $5; hi[$1, $2] = $6 }
  function range(k, s) { return reps > 1 ? sprintf("%d – %d", lo[k, s], hi[k, s]) : "–" }
  END {
    print "| route | side | instructions per request | range | session − baseline |"
    print "|---|---|---:|---:|---:|"
    split("read transfer", groups, " ")
    for (g = 1; g <= 2; g++) {
      k = groups[g]
      printf "| %s | session | %d | %s | %+d (%+.1f %%) |\n", route[k, "session"], med[k, "session"],
        range(k, "session"), med[k, "session"] - med[k, "baseline"],
        100 * (med[k, "session"] - med[k, "baseline"]) / med[k, "baseline"]
      printf "| %s | baseline | %d | %s | |\n", route[k, "baseline"], med[k, "baseline"],
        range(k, "baseline")
    }
  }' "$SUMMARY"
echo
log "dumps, results.tsv (every batch) and summary.tsv (the table) in $OUT"
exit
}
