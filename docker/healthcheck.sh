#!/bin/sh
# Container health check for the screener services: screener-healthcheck ROLE
#   listener  C-ECHO our own listener (called AE = listener AE title, calling AE = the
#             first allowed calling AE title, since the allow-list refuses any other)
#   celery [NODE]  the Celery worker of this container (default cpu@$HOSTNAME) answers a ping
#   infer | reconciler   the loop's heartbeat is recent (screener heartbeat)
#   http      GET /healthz on the HTTP service answers 200
set -eu
role="${1:-listener}"
case "$role" in
  listener)
    calling="$(python3 -c 'import json, os
titles = json.loads(os.environ.get("SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES") or "[]")
print(titles[0] if titles else os.environ.get("SCREENER_LISTENER__AE_TITLE", "SCREENER"))')"
    exec screener echo 127.0.0.1 "${SCREENER_LISTENER__PORT:-11112}" \
      --aet "${SCREENER_LISTENER__AE_TITLE:-SCREENER}" --calling-aet "$calling" --timeout 10
    ;;
  celery)
    exec celery -A workers.celery_app inspect ping -d "${2:-cpu@${HOSTNAME:-localhost}}" --timeout 10 >/dev/null
    ;;
  infer | reconciler)
    exec screener heartbeat "$role" --max-age "${2:-90}"
    ;;
  http)
    exec python3 -c 'import os, sys, urllib.request
port = os.environ.get("SCREENER_HTTP__PORT", "8080")
with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
    sys.exit(0 if r.status == 200 else 1)'
    ;;
  *)
    echo "screener-healthcheck: unknown role $role" >&2
    exit 2
    ;;
esac
