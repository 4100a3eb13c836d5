#!/usr/bin/env bash
# The API check (`make api-check`, part of `make test`): the built service on a fresh
# database, its OpenAPI document validated, Schemathesis let loose on it, and a client
# generated from the document used for a smoke test.
#
#   scripts/api-check.sh [ADMIN_URL]
#
# ADMIN_URL (default: $DATABASE_URL) names a PostgreSQL server and a database on it from
# which another database may be created. Needs the ops-tools venv (the Makefile installs
# it), psql, curl and target/debug/ledger (built by the suite, or `cargo build`). The
# database is dropped and the service stopped whatever happens.
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS=${OPS_TOOLS:-target/ops-tools}/bin
BIN=${BIN:-target/debug/ledger}
# Test cases per operation and phase; with two workers the whole run takes about a minute
# on two cores.
EXAMPLES=${API_CHECK_EXAMPLES:-200}
START_TIMEOUT=60
work=target/api-check

log() { echo "api-check: $*" >&2; }
fail() {
  log "FAILED: $*"
  if [ -s "$work/service.log" ]; then
    log "the service's last lines:"
    tail -n 30 "$work/service.log" | sed 's/^/  | /' >&2
  fi
  exit 1
}

admin=${1:-${DATABASE_URL:-}}
[ -n "$admin" ] || fail "no ADMIN_URL and no DATABASE_URL"
[ -x "$BIN" ] || fail "$BIN not built (cargo build)"
for tool in schemathesis openapi-spec-validator openapi-python-client; do
  [ -x "$TOOLS/$tool" ] || fail "$TOOLS/$tool missing (make api-check installs it)"
done

db="ledger_api_check_$$"
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  psql "$admin" -Xqc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

rm -rf "$work" && mkdir -p "$work"
psql "$admin" -Xqc "CREATE DATABASE \"$db\"" >/dev/null || fail "cannot create database $db"
port=$("$TOOLS/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
DATABASE_URL="${admin%/*}/$db" HOST=127.0.0.1 PORT=$port HTTP_WORKERS=2 RUST_LOG=warn \
  "$BIN" >"$work/service.log" 2>&1 &
pid=$!
for _ in $(seq $((START_TIMEOUT * 10))); do
  curl -fsS "$base/health/ready" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || fail "the service exited"
  sleep 0.1
done
curl -fsS "$base/health/ready" >/dev/null || fail "the service is not ready after ${START_TIMEOUT}s"

curl -fsS "$base/openapi.json" -o "$work/openapi.json" || fail "GET /openapi.json"
"$TOOLS/openapi-spec-validator" "$work/openapi.json" || fail "the document is not valid OpenAPI"
log "the document is valid OpenAPI"

# Every operation, positive and negative data, the stateful links; every check, with the
# exclusions of tests/api-check/hooks.py. `--no-shrink` keeps the run bounded; a failure
# prints its reproduction anyway.
started=$(date +%s)
(cd tests/api-check && "$OLDPWD/$TOOLS/schemathesis" --config-file schemathesis.toml run \
  "$base/openapi.json" --checks all --max-examples "$EXAMPLES" --workers 2 --no-shrink \
  --seed "${API_CHECK_SEED:-$RANDOM}" \
  --report junit --report-dir "$OLDPWD/$work/report") || fail "the fuzzer found failures"
log "the fuzzer found nothing in $(( $(date +%s) - started ))s"

PATH="$PWD/$TOOLS:$PATH" "$TOOLS/openapi-python-client" generate --path "$work/openapi.json" \
  --output-path "$work/client" --meta none --overwrite >"$work/generate.log" 2>&1 \
  || { cat "$work/generate.log" >&2; fail "client generation"; }
PYTHONPATH="$work" "$TOOLS/python" tests/api-check/smoke.py "$base" || fail "the generated client's smoke test"
log "the generated client's smoke test passed"
