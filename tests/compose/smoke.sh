#!/usr/bin/env bash
# Compose smoke test: the distributed deployment, run for real.
#
#   bash tests/compose/smoke.sh          (as root, or a user allowed to run docker)
#
# Starts dockerd if none runs (and stops what it started), builds the images (the local
# Debian base with docker/build-base.sh when it is missing; layer cache makes a rerun
# quick), brings the stack up with docker-compose.yml + docker/compose.hostnet.yml (host
# networking, 127.0.0.1 only, ports that do not clash with services on the host), runs the
# migrations, scales the CPU workers to 2, pushes SMOKE_STUDIES (20) single-image CR studies
# made from ../shared/data/cxr into the stack's Orthanc and sends them to the listener,
# kills one worker container (docker kill) as soon as it is working, waits for exactly one
# SR per study back in Orthanc, checks /healthz and /metrics when the image has
# `screener web`, and tears everything down (containers, volumes).
# Last line: "compose smoke: K/N studies with exactly one SR"; exit 0 only when K = N.
# Bounded by SMOKE_BUDGET_SECONDS (1200), image builds included.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1
START=$(date +%s)
BUDGET=${SMOKE_BUDGET_SECONDS:-1200}
N=${SMOKE_STUDIES:-20}
CXR="$(cd "${SMOKE_CXR:-$REPO/../shared/data/cxr}" 2>/dev/null && pwd)"
PROJECT=${SMOKE_PROJECT:-pacs-screener-smoke}
export BASE_IMAGE=${BASE_IMAGE:-pacs-screener/base:bookworm}
GPU_BASE_IMAGE=${GPU_BASE_IMAGE:-nvcr.io/nvidia/tensorrt:25.01-py3}
# Loopback ports of the stack (the test suite's PostgreSQL 5432 and Redis 6379 run here).
export HOSTNET_REDIS_PORT=${HOSTNET_REDIS_PORT:-16379}
export HOSTNET_POSTGRES_PORT=${HOSTNET_POSTGRES_PORT:-15432}
export HOSTNET_ORTHANC_HTTP_PORT=${HOSTNET_ORTHANC_HTTP_PORT:-18042}
export HOSTNET_ORTHANC_DICOM_PORT=${HOSTNET_ORTHANC_DICOM_PORT:-14242}
export HOSTNET_LISTENER_PORT=${HOSTNET_LISTENER_PORT:-21112}
export HOSTNET_HTTP_PORT=${HOSTNET_HTTP_PORT:-18080}
export HOSTNET_FLOWER_PORT=${HOSTNET_FLOWER_PORT:-15555}

WORK="$(mktemp -d /tmp/compose-smoke.XXXXXX)"
chmod 755 "$WORK"
mkdir -m 777 "$WORK/state"
DOCKERD_PID=""
STACK_UP=""
RESULT_LINE="compose smoke: 0/$N studies with exactly one SR"
STATUS=1

log() { echo "smoke [$(($(date +%s) - START)) s] $*"; }
remaining() {
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -gt 1 ] && echo "$left" || echo 1
}
fail() {
  log "FAILED: $*"
  exit 1
}

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  COMPOSE=()
fi
DC=("${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/env" -f docker-compose.yml
  -f docker/compose.hostnet.yml --profile cpu-only)

cleanup() {
  trap - EXIT INT TERM
  if [ -n "$STACK_UP" ]; then
    if [ "$STATUS" != 0 ]; then
      log "logs of the stack (last lines per service):"
      "${DC[@]}" --profile http logs --no-color --tail 25 2>&1 | cut -c1-300 | tail -n 200
    fi
    log "tearing down (containers, volumes)"
    timeout 180 "${DC[@]}" --profile http --profile flower down -v --remove-orphans \
      >"$WORK/down.log" 2>&1 || tail -n 20 "$WORK/down.log"
  fi
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping the dockerd this script started"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
  rm -rf "$WORK" 2>/dev/null
  echo "$RESULT_LINE"
  exit "$STATUS"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 1' INT TERM

[ ${#COMPOSE[@]} -gt 0 ] || fail "neither 'docker compose' nor docker-compose is installed"
[ -n "$CXR" ] && [ -f "$CXR/manifest.csv" ] || fail "corpus not found (../shared/data/cxr)"

# ------------------------------------------------------------------ the Docker engine
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || fail "no Docker engine (Debian package docker.io)"
  log "starting dockerd (no bridge, no iptables: containers use host networking only)"
  dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
    >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
fi

# ------------------------------------------------------------------ images
build() { # build TAG LOG [docker build args...]
  local tag=$1 logfile="$WORK/build-$2.log"
  shift 2
  local t0
  t0=$(date +%s)
  if ! timeout "$(remaining)" docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
    ${PIP_INDEX_URL:+--build-arg PIP_INDEX_URL="$PIP_INDEX_URL"} -t "$tag" "$@" >"$logfile" 2>&1; then
    tail -n 30 "$logfile"
    fail "image $tag did not build"
  fi
  log "built $tag in $(($(date +%s) - t0)) s"
}

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  case "$BASE_IMAGE" in
    pacs-screener/base:*)
      t0=$(date +%s)
      timeout "$(remaining)" bash docker/build-base.sh "$BASE_IMAGE" || fail "base image"
      log "built the local base $BASE_IMAGE in $(($(date +%s) - t0)) s"
      ;;
    *) timeout "$(remaining)" docker pull -q "$BASE_IMAGE" || fail "cannot pull $BASE_IMAGE" ;;
  esac
fi
# pip inside the build trusts what this machine trusts (a proxy's CA, if any); build stages only.
if [ "${SMOKE_HOST_CA:-1}" = 1 ] && [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  cmp -s /etc/ssl/certs/ca-certificates.crt docker/certs/host-ca.crt ||
    cp /etc/ssl/certs/ca-certificates.crt docker/certs/host-ca.crt
fi
build pacs-screener:cpu cpu --target cpu .
build pacs-screener/redis:local redis docker/redis
build pacs-screener/postgres:local postgres docker/postgres
build pacs-screener/orthanc:local orthanc docker/orthanc
if docker image inspect "$GPU_BASE_IMAGE" >/dev/null 2>&1; then
  build pacs-screener:gpu gpu --target gpu --build-arg GPU_BASE_IMAGE="$GPU_BASE_IMAGE" .
else
  log "GPU image not built: its base $GPU_BASE_IMAGE is not available here"
fi

# ------------------------------------------------------------------ the stack
rand() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
ORTHANC_USERNAME=smoke
ORTHANC_PASSWORD=$(rand)
cat >"$WORK/env" <<EOF
POSTGRES_PASSWORD=$(rand)
REDIS_PASSWORD=$(rand)
ORTHANC_USERNAME=$ORTHANC_USERNAME
ORTHANC_PASSWORD=$ORTHANC_PASSWORD
SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES=["ORTHANC"]
SCREENER_STUDY_QUIET_SECONDS=5
SCREENER_RECONCILER__STALE_SECONDS=30
BASE_IMAGE=$BASE_IMAGE
EOF
chmod 600 "$WORK/env"

# Host networking only: every service must say so, or compose would create a bridge network.
services=$("${DC[@]}" --profile http --profile flower config --services 2>"$WORK/config.err") ||
  { cat "$WORK/config.err"; fail "compose config"; }
hostnet=$("${DC[@]}" --profile http --profile flower config | grep -c 'network_mode: host')
[ "$(echo "$services" | wc -l)" = "$hostnet" ] ||
  fail "not every service has network_mode: host ($hostnet of $(echo "$services" | wc -l))"

if docker run --rm --entrypoint screener pacs-screener:cpu web --help >/dev/null 2>&1; then
  WEB=(web)
  DC+=(--profile http)
else
  WEB=()
  log "the image has no 'screener web': /healthz and /metrics are not checked"
fi

timeout 60 "${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 # leftovers of a killed run
STACK_UP=1
log "starting redis, postgres, orthanc; running the migrations"
timeout "$(remaining)" "${DC[@]}" run --rm migrate >"$WORK/migrate.log" 2>&1 ||
  { tail -n 30 "$WORK/migrate.log"; fail "migrations"; }
log "migrations done; starting listener, 2 CPU workers, infer worker, reconciler ${WEB[*]}"
timeout "$(remaining)" "${DC[@]}" up -d --no-build --scale worker-cpu=2 orthanc listener \
  worker-cpu worker-infer-cpu reconciler "${WEB[@]}" >"$WORK/up.log" 2>&1 ||
  { tail -n 30 "$WORK/up.log"; fail "compose up"; }

healthy() { # all containers of the services given are healthy
  local id
  for id in $("${DC[@]}" ps -q "$@"); do
    [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")" = healthy ] ||
      return 1
  done
}
for _ in $(seq 120); do
  healthy orthanc listener && break
  sleep 2
done
healthy orthanc listener || fail "orthanc and the listener did not become healthy"
log "orthanc and listener healthy"

driver() {
  timeout "$(remaining)" docker run --rm --network host --entrypoint python3 \
    -e ORTHANC_URL="http://127.0.0.1:$HOSTNET_ORTHANC_HTTP_PORT" \
    -e ORTHANC_USERNAME="$ORTHANC_USERNAME" -e ORTHANC_PASSWORD="$ORTHANC_PASSWORD" \
    -v "$REPO/tests/compose:/smoke:ro" -v "$CXR:/cxr:ro" -v "$WORK/state:/state" \
    pacs-screener:cpu /smoke/smoke_driver.py "$@"
}

# ------------------------------------------------------------------ studies, a killed worker
driver push --count "$N" --cxr /cxr --state /state/studies.json ||
  fail "pushing studies"
log "studies sent by Orthanc to the listener; waiting for a CPU worker to start working"
victim=""
for _ in $(seq 240); do
  for id in $("${DC[@]}" ps -q worker-cpu); do
    if docker logs "$id" 2>&1 | grep -q 'prepare_job.*received'; then
      victim=$id
      break 2
    fi
  done
  sleep 0.5
done
[ -n "$victim" ] || fail "no CPU worker received a task"
docker kill "$victim" >/dev/null || fail "docker kill"
log "killed worker container ${victim:0:12} mid-run (docker kill)"

driver wait --state /state/studies.json --timeout $(($(remaining) - 90)) \
  --settle 20 | tee "$WORK/wait.log"
line=$(grep '^compose smoke:' "$WORK/wait.log" | tail -n 1)
[ -n "$line" ] && RESULT_LINE=$line
log "killed worker container is now: $(docker inspect -f '{{.State.Status}}' "$victim" 2>/dev/null)"

HTTP_OK=0
if [ ${#WEB[@]} -gt 0 ]; then
  for _ in $(seq 30); do
    driver http --port "$HOSTNET_HTTP_PORT" >"$WORK/http.log" 2>&1 && { HTTP_OK=1; break; }
    sleep 2
  done
  cat "$WORK/http.log"
fi

K=$(echo "$RESULT_LINE" | sed -E 's/^compose smoke: ([0-9]+)\/([0-9]+).*/\1/')
if [ "$K" = "$N" ] && { [ ${#WEB[@]} -eq 0 ] || [ "$HTTP_OK" = 1 ]; }; then
  STATUS=0
elif [ "$K" = "$N" ]; then
  log "FAILED: /healthz or /metrics"
fi
log "done in $(($(date +%s) - START)) s"
