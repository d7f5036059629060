#!/bin/sh
# Write the Redis configuration from the environment (the password never appears on a
# command line) and start redis-server in the foreground.
#   REDIS_PASSWORD (required)  REDIS_PORT (6379)  REDIS_BIND (0.0.0.0; 127.0.0.1 on a host network)
#   REDIS_DIR (/var/lib/redis)
set -eu
: "${REDIS_PASSWORD:?REDIS_PASSWORD is not set (see .env.example)}"
conf="$(mktemp /tmp/redis.XXXXXX.conf)"
chmod 600 "$conf"
cat >"$conf" <<CONF
bind ${REDIS_BIND:-0.0.0.0}
port ${REDIS_PORT:-6379}
requirepass ${REDIS_PASSWORD}
protected-mode yes
save ""
appendonly no
dir ${REDIS_DIR:-/var/lib/redis}
CONF
exec redis-server "$conf"
