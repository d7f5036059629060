#!/bin/sh
# Initialise the cluster on first start, then run postgres in the foreground.
#   POSTGRES_PASSWORD (required)  POSTGRES_USER (screener)  POSTGRES_DB (screener)
#   PGPORT (5432)  POSTGRES_LISTEN (*; 127.0.0.1 on a host network)
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set (see .env.example)}"
user="${POSTGRES_USER:-screener}"
db="${POSTGRES_DB:-screener}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' \
    >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
  echo "postgres-entrypoint: initialised $PGDATA (database $db, role $user)"
fi
exec postgres -D "$PGDATA" -p "${PGPORT:-5432}" -c listen_addresses="${POSTGRES_LISTEN:-*}" \
  -c unix_socket_directories=/tmp
