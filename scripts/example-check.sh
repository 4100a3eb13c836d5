#!/usr/bin/env bash
# Runs the actix-diesel-session example service (crates/actix-diesel-session/examples/service.rs)
# against a throwaway database and checks it end to end: it starts and answers, POST /notes
# stores a note (201 with its id), GET /notes/{id} answers it back (200) and an unknown id
# 404, the row is in the database, and SIGTERM stops it cleanly (exit status 0).
#
#   scripts/example-check.sh [ADMIN_URL]
#
# ADMIN_URL (default: $DATABASE_URL) names a PostgreSQL server and a database on it from
# which another database may be created, e.g. postgres://postgres@127.0.0.1:5432/postgres.
# Needs cargo, psql, curl. Exits non-zero, saying what failed, on any failure; the
# database is dropped and the service stopped whatever happens.
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
START_TIMEOUT=${START_TIMEOUT:-60}  # seconds for the built service to answer
STOP_TIMEOUT=15                     # seconds for it to exit after SIGTERM

log() { echo "example-check: $*" >&2; }
fail() {
  log "FAILED: $*"
  if [ -n "${service_log:-}" ] && [ -s "$service_log" ]; then
    log "the service's output:"
    sed 's/^/  | /' "$service_log" >&2
  fi
  exit 1
}

admin=${1:-${DATABASE_URL:-}}
[ -n "$admin" ] || fail "no admin database URL: pass one as the argument or set DATABASE_URL"
for tool in "$CARGO" psql curl; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool not found on PATH"
done

# The URL of database $1 on the admin URL's server: its path replaced, its query kept.
url_for() {
  local base=${admin%%\?*} query=
  [[ $admin == *\?* ]] && query="?${admin#*\?}"
  local rest=${base#*://}
  [[ $rest == */* ]] && base=${base%/*}
  echo "$base/$1$query"
}

# A TCP port nothing listens on now: asked of the kernel when python3 is there, else
# tried at random in the range below the ephemeral ports.
free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port i
  for i in $(seq 1 50); do
    port=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  return 1
}

psql_admin() { psql "$admin" -XAtq -v ON_ERROR_STOP=1 "$@"; }

db="ads_example_$$_$(date +%s)"
db_url=$(url_for "$db")
work=$(mktemp -d "${TMPDIR:-/tmp}/example-check.XXXXXX")
service_log="$work/service.log"
pid=
created=

cleanup() {
  local status=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if [ -n "$created" ] && ! psql_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1; then
    log "warning: could not drop the database $db"
    [ "$status" -eq 0 ] && status=1
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql_admin -c 'SELECT 1' >/dev/null 2>&1 || fail "the server at the admin URL does not answer (psql)"
psql_admin -c "CREATE DATABASE \"$db\"" >/dev/null || fail "could not create the database $db"
created=1

log "building the example"
"$CARGO" build --quiet -p actix-diesel-session --example service || fail "the example does not build"

port=$(free_port) || fail "no free port found"
base="http://127.0.0.1:$port"
log "starting it on port $port (database $db)"
# `cargo run` replaces itself with the example (exec), so $! is the service's own pid.
DATABASE_URL=$db_url PORT=$port RUST_LOG=${RUST_LOG:-warn} \
  "$CARGO" run --quiet -p actix-diesel-session --example service >"$service_log" 2>&1 &
pid=$!

# Prints the status code of a request; its body goes to $work/body.
request() { # method path [body]
  local args=(-sS -o "$work/body" -w '%{http_code}' --max-time 10 -X "$1")
  [ $# -ge 3 ] && args+=(--data-binary "$3" -H 'Content-Type: text/plain')
  # On a failed connection curl prints 000 itself.
  curl "${args[@]}" "$base$2" 2>>"$work/curl.log" || true
}

deadline=$((SECONDS + START_TIMEOUT))
until [ "$(request GET /notes/0)" = 404 ]; do
  kill -0 "$pid" 2>/dev/null || { wait "$pid" || true; pid=; fail "the service exited before it answered"; }
  [ "$SECONDS" -lt "$deadline" ] || fail "the service did not answer within ${START_TIMEOUT}s"
  sleep 0.2
done

note="a note from example-check $$"
status=$(request POST /notes "$note")
[ "$status" = 201 ] || fail "POST /notes answered $status, not 201: $(cat "$work/body")"
id=$(cat "$work/body")
[[ $id =~ ^[0-9]+$ ]] || fail "POST /notes answered '$id', not a note id"

status=$(request GET "/notes/$id")
[ "$status" = 200 ] || fail "GET /notes/$id answered $status, not 200: $(cat "$work/body")"
[ "$(cat "$work/body")" = "$note" ] || fail "GET /notes/$id answered '$(cat "$work/body")', not the note"

status=$(request GET "/notes/$((id + 1000))")
[ "$status" = 404 ] || fail "GET of an unknown note answered $status, not 404"

stored=$(psql "$db_url" -XAtq -v ON_ERROR_STOP=1 -c "SELECT body FROM notes WHERE id = $id") \
  || fail "could not read the notes table"
[ "$stored" = "$note" ] || fail "the database holds '$stored' for note $id, not the note"

log "stopping it with SIGTERM"
kill -TERM "$pid"
deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$pid" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the service did not exit within ${STOP_TIMEOUT}s of SIGTERM"
  sleep 0.1
done
exit_status=0
wait "$pid" || exit_status=$?
pid=
[ "$exit_status" -eq 0 ] || fail "the service exited with status $exit_status after SIGTERM"

log "ok: POST, GET, 404, the stored row and a clean SIGTERM shutdown"
