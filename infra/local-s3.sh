#!/usr/bin/env bash
# A loopback S3-compatible server (moto's standalone server, from PyPI) holding one bucket, for the tests
# and a local cluster whose nodes share nothing but the bucket.
#   eval "$(infra/local-s3.sh start)"   # prints the standard AWS_* variables to export
#   infra/local-s3.sh stop
# Settings (environment): S3_STATE_DIR, S3_PORT, BUCKET.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
STATE=${S3_STATE_DIR:-/tmp/segnet-s3}
PORT=${S3_PORT:-9010}
BUCKET=${BUCKET:-segnet}
bin=${VENV_BIN:-$here/.venv/bin}
[[ -x $bin/moto_server ]] || bin=$(dirname "$(command -v moto_server)")

start() {
  mkdir -p "$STATE"
  nohup "$bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$STATE/s3.log" 2>&1 &
  echo $! >"$STATE/s3.pid"
  for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PORT/moto-api/" >/dev/null && break
    sleep 0.5
  done
  curl -sf -X PUT "http://127.0.0.1:$PORT/$BUCKET" >/dev/null || { echo "S3 server did not start" >&2; exit 1; }
  # moto checks no credentials; these only satisfy clients that need some.
  echo "AWS_ENDPOINT_URL=http://127.0.0.1:$PORT"
  echo "AWS_ACCESS_KEY_ID=segnet-local"
  echo "AWS_SECRET_ACCESS_KEY=segnet-local"
  echo "AWS_REGION=us-east-1"
  echo "BUCKET=$BUCKET"
}

stop() {
  [[ -f $STATE/s3.pid ]] || return 0
  kill "$(cat "$STATE/s3.pid")" 2>/dev/null || true
  rm -f "$STATE/s3.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
