#!/usr/bin/env bash
# Finds a PostgreSQL server for `make run` / `make test`, or starts a private, throwaway one.
#
#   scripts/pg.sh url     print a server-admin URL: $DATABASE_URL if it answers, else the
#                         local server at 127.0.0.1:5432 if it answers, else the private
#                         cluster (started on demand)
#   scripts/pg.sh up      start the private cluster (a no-op while it runs); print its URL
#   scripts/pg.sh down    stop the private cluster (and its replica) and delete it
#   scripts/pg.sh replica start a streaming replica of the private cluster (a no-op while it
#                         runs; pg_basebackup -R, hot standby, or the one `replica-stop`
#                         stopped); print its URL
#   scripts/pg.sh replica-stop
#                         stop the replica, keeping its data
#   scripts/pg.sh ensure-db URL NAME
#                         create database NAME on the server of URL if it is missing
#
# The private cluster lives in a mktemp directory under /tmp (reachable by the `postgres`
# account when we run as root, since initdb and postgres refuse to run as root); its path
# is remembered in .pgcluster (git-ignored). It runs with fsync off: it is for throwaway
# data only. The test suite starts private clusters of its own the same way
# (tests/api/support/pg_cluster.rs); keep the two recipes in step.
#
# Two variables let another script run a cluster of its own next to this one (the
# benchmark does): PG_STATE_FILE (default .pgcluster) names the file that remembers it, and
# PG_SERVER_OPTS adds server options (`-c name=value ...`) to the ones below.
set -euo pipefail

cd "$(dirname "$0")/.."
STATE_FILE=${PG_STATE_FILE:-.pgcluster}
log() { echo "pg.sh: $*" >&2; }

find_bin() {
  local name=$1 dir
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
  done
  return 1
}

port_taken() { # port: a socket on it in any state (ss), or at least a listener
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Hatn "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

answers() { # URL
  local psql
  psql=$(find_bin psql) || return 1
  PGCONNECT_TIMEOUT=3 "$psql" "$1" -XAtqc 'SELECT 1' >/dev/null 2>&1
}

as_owner() { # run a command as the cluster owner (postgres when we are root)
  if [ "$(id -u)" = 0 ]; then
    if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

cluster_url() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

up() {
  if [ -f "$STATE_FILE" ]; then
    read -r dir port _ <"$STATE_FILE" || true
    if [ -n "${dir:-}" ] && answers "$(cluster_url "$port")"; then
      cluster_url "$port"; return 0
    fi
    log "stale $STATE_FILE (cluster not answering); starting a new one"
    rm -f "$STATE_FILE"
  fi
  local initdb pg_ctl
  initdb=$(find_bin initdb) || { log "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin."; log "Install them (Debian: apt-get install postgresql) or set DATABASE_URL to a reachable server."; exit 1; }
  pg_ctl=$(find_bin pg_ctl) || { log "pg_ctl not found next to initdb"; exit 1; }
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "running as root and there is no 'postgres' account to run the server as; create one (useradd -r postgres) or run as a normal user"
    exit 1
  fi
  local dir port
  dir=$(mktemp -d /tmp/ledger-pg.XXXXXX)
  chmod 755 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  # Below the kernel's ephemeral range (32768 and up by default): there, any client socket
  # that happens to hold the port (one of the test suite's, lingering in TIME_WAIT) makes
  # the server's bind fail although nothing listens. A port that still turns out taken
  # when the server binds is skipped too.
  port=25432
  while port_taken "$port"; do port=$((port + 1)); done
  log "initialising a private cluster in $dir on port $port"
  as_owner "$initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  local attempt
  for attempt in 1 2 3 4 5; do
    if as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 ${PG_SERVER_OPTS:-}" \
      start >/dev/null 2>&1; then
      break
    fi
    if [ "$attempt" = 5 ] || ! grep -q "Address already in use" "$dir/server.log"; then
      cat "$dir/server.log" >&2
      exit 1
    fi
    port=$((port + 1))
    while port_taken "$port"; do port=$((port + 1)); done
    log "port taken meanwhile; trying $port"
  done
  echo "$dir $port" >"$STATE_FILE"
  cluster_url "$port"
}

# The replica lives beside the primary's data directory ($dir/replica) and listens on a
# port of its own; it is remembered in the state file's third field. The private cluster's
# defaults allow it as they are: wal_level=replica, max_wal_senders=10, and initdb's
# pg_hba.conf trusts replication connections from 127.0.0.1. It streams through a
# replication slot, so that a replica stopped with `replica-stop` (streaming costs the
# primary CPU at every commit) starts again where it stopped and catches up.
REPLICA_SLOT=pg_sh_replica
replica_opts() { # dir rport
  echo "-p $2 -k $1 -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c hot_standby=on ${PG_SERVER_OPTS:-}"
}
replica() {
  [ -f "$STATE_FILE" ] || { log "no private cluster running: start one with \`$0 up\`"; exit 1; }
  local dir port rport
  read -r dir port rport <"$STATE_FILE" || true
  if [ -n "${rport:-}" ] && answers "$(cluster_url "$rport")"; then
    cluster_url "$rport"; return 0
  fi
  local basebackup pg_ctl
  basebackup=$(find_bin pg_basebackup) || { log "pg_basebackup not found"; exit 1; }
  pg_ctl=$(find_bin pg_ctl) || { log "pg_ctl not found"; exit 1; }
  # Stopped by `replica-stop`: start it again (its slot kept the WAL it has not received).
  if [ -n "${rport:-}" ] && [ -f "$dir/replica/standby.signal" ] && ! port_taken "$rport" \
    && as_owner "$pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w -t 30 \
      -o "$(replica_opts "$dir" "$rport")" start >/dev/null 2>&1; then
    cluster_url "$rport"; return 0
  fi
  if [ -d "$dir/replica" ]; then
    as_owner "$pg_ctl" -D "$dir/replica" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir/replica"
  fi
  rport=$((port + 1))
  while port_taken "$rport"; do rport=$((rport + 1)); done
  log "starting a streaming replica in $dir/replica on port $rport"
  # A slot left by an earlier replica of this cluster would make -C fail.
  psql -qXAt -h 127.0.0.1 -p "$port" -U postgres -d postgres -c \
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$REPLICA_SLOT'" \
    >/dev/null 2>&1 || true
  as_owner "$basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$dir/replica" -R -X stream \
    -C -S "$REPLICA_SLOT" -c fast --no-sync >"$dir/basebackup.log" 2>&1 \
    || { cat "$dir/basebackup.log" >&2; exit 1; }
  as_owner "$pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w -t 30 \
    -o "$(replica_opts "$dir" "$rport")" start >/dev/null 2>&1 || { cat "$dir/replica.log" >&2; exit 1; }
  echo "$dir $port $rport" >"$STATE_FILE"
  cluster_url "$rport"
}

# Stops the replica and keeps its data: `replica` starts it again.
replica_stop() {
  [ -f "$STATE_FILE" ] || return 0
  local dir
  read -r dir _ <"$STATE_FILE" || true
  if [ -n "${dir:-}" ] && [ -f "$dir/replica/postmaster.pid" ]; then
    as_owner "$(find_bin pg_ctl)" -D "$dir/replica" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

down() {
  [ -f "$STATE_FILE" ] || { log "no private cluster running"; return 0; }
  read -r dir port _ <"$STATE_FILE" || true
  if [ -n "${dir:-}" ] && [ -d "$dir/replica" ]; then
    as_owner "$(find_bin pg_ctl)" -D "$dir/replica" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ -n "${dir:-}" ] && [ -d "$dir/data" ]; then
    as_owner "$(find_bin pg_ctl)" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
  fi
  rm -f "$STATE_FILE"
  log "private cluster stopped and removed"
}

url() {
  if [ -n "${DATABASE_URL:-}" ]; then
    if answers "$DATABASE_URL"; then echo "$DATABASE_URL"; return 0; fi
    log "DATABASE_URL is set but the server does not answer; falling back"
  fi
  local local_url="postgres://postgres@127.0.0.1:5432/postgres"
  if answers "$local_url"; then echo "$local_url"; return 0; fi
  up
}

ensure_db() { # URL NAME
  local psql exists
  psql=$(find_bin psql) || { log "psql not found"; exit 1; }
  exists=$("$psql" "$1" -XAtqc "SELECT 1 FROM pg_database WHERE datname = '$2'")
  [ "$exists" = 1 ] || "$psql" "$1" -Xqc "CREATE DATABASE \"$2\"" >/dev/null
}

case "${1:-}" in
  url) url ;;
  up) up ;;
  down) down ;;
  replica) replica ;;
  replica-stop) replica_stop ;;
  ensure-db) ensure_db "$2" "$3" ;;
  *) echo "usage: $0 url|up|down|replica|replica-stop|ensure-db URL NAME" >&2; exit 2 ;;
esac
