#!/bin/sh
# Run a pip command with the build-time settings a site may need: a CA bundle from
# docker/certs/*.crt (copied to /tmp/certs) and PIP_INDEX_URL when set. Build stages only.
set -eu
bundle=""
for crt in /tmp/certs/*.crt; do
  [ -f "$crt" ] || continue
  bundle=/tmp/certs/bundle.pem
  cat "$crt" >>"$bundle"
done
if [ -n "$bundle" ]; then
  export PIP_CERT="$bundle" REQUESTS_CA_BUNDLE="$bundle" SSL_CERT_FILE="$bundle"
fi
if [ -z "${PIP_INDEX_URL:-}" ]; then
  unset PIP_INDEX_URL
fi
exec "$@"
