#!/usr/bin/env bash
# A two-node Ray cluster and an MLflow server on this machine, all on 127.0.0.1. Each node runs in its own
# working directory with its own temp directory (STATE_DIR/head, STATE_DIR/worker), so, as on a real
# cluster, the nodes share no folder: give them a bucket (infra/local-s3.sh) for data and checkpoints.
#   infra/local-cluster.sh start   # head (1 CPU) + worker node (1 CPU) + mlflow server (sqlite + artifacts)
#   infra/local-cluster.sh start-worker  # (re)starts the worker node alone, e.g. after it was lost
#   infra/local-cluster.sh stop    # stops exactly these processes (not other Ray instances)
#   infra/local-cluster.sh status
# Clients export what `start` prints (the token path among it): `eval "$(infra/local-cluster.sh start)"`.
# Settings (environment): STATE_DIR, RAY_PORT, DASHBOARD_PORT, MLFLOW_PORT, HEAD_CPUS, WORKER_CPUS,
# AGENT_PORT_BASE (4 ports per node from here, the second node 10 above), ARTIFACTS (the MLflow server's
# artifact destination, e.g. s3://BUCKET/mlflow; default a folder in STATE_DIR). Nodes and the MLflow
# server read the store's standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) from this
# environment.
set -euo pipefail
# MLflow 3's job runner (GenAI jobs: scorers, prompt optimisation) is 8 more Python processes this pipeline
# never uses, and they outlive the server's stop; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
here=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${STATE_DIR:-/tmp/segnet-cluster}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-1}
AGENT_PORT_BASE=${AGENT_PORT_BASE:-52400}
ARTIFACTS=${ARTIFACTS:-$STATE_DIR/mlartifacts}
bin=${VENV_BIN:-$here/.venv/bin}
[[ -x $bin/ray ]] || bin=$(dirname "$(command -v ray)")
export PATH="$bin:$PATH"  # jobs' `python` is the one that has the project and its dependencies

# Ray token authentication with this cluster's own token: every node and client reads the same file.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"

# Two nodes on one host: each needs its own agent ports (the defaults would collide).
agent_ports() {
  echo "--dashboard-agent-listen-port=$1 --dashboard-agent-grpc-port=$(($1 + 1))" \
    "--metrics-export-port=$(($1 + 2)) --runtime-env-agent-port=$(($1 + 3))"
}

# Node 2: its own raylet, resources, working directory and temp directory, so Ray schedules across both.
# `start-worker` runs this alone: the worker node (re)joins a running head, as a replaced node would.
start_worker() {
  (cd "$STATE_DIR/worker" && TMPDIR="$STATE_DIR/worker/tmp" "$bin/ray" start --address="127.0.0.1:$RAY_PORT" \
    --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" --temp-dir="$STATE_DIR/worker/ray" \
    $(agent_ports $((AGENT_PORT_BASE + 10))) --disable-usage-stats >>"$STATE_DIR/worker.log" 2>&1) ||
    failed "the worker node" "$STATE_DIR/worker.log"
}

# One line naming what did not start and its log, then the log's last lines, and exit 1.
failed() {
  echo "local-cluster.sh: $1 did not start; its log: $2" >&2
  tail -n 5 "$2" >&2
  exit 1
}

start() {
  mkdir -p "$STATE_DIR"/{head,worker}/tmp
  [[ $ARTIFACTS == *://* ]] || mkdir -p "$ARTIFACTS"
  [[ -s $RAY_AUTH_TOKEN_PATH ]] || (umask 077 && "$bin/python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
  # Node 1, the head: GCS, dashboard and job server on loopback.
  (cd "$STATE_DIR/head" && TMPDIR="$STATE_DIR/head/tmp" "$bin/ray" start --head --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --temp-dir="$STATE_DIR/head/ray" $(agent_ports "$AGENT_PORT_BASE") --disable-usage-stats \
    >"$STATE_DIR/head.log" 2>&1) || failed "the head node" "$STATE_DIR/head.log"
  start_worker
  for _ in $(seq 120); do  # the dashboard (job server, state API) answers, even if only to refuse
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$DASHBOARD_PORT/api/version") != 000 ]] && break
    sleep 1
  done
  # MLflow: sqlite backend, artifacts served (proxied) by the server from ARTIFACTS (a folder or bucket).
  nohup env -C "$STATE_DIR" "$bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" --artifacts-destination "$ARTIFACTS" \
    >"$STATE_DIR/mlflow.log" 2>&1 &
  echo $! >"$STATE_DIR/mlflow.pid"
  for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || failed "the mlflow server" "$STATE_DIR/mlflow.log"
  echo "RAY_AUTH_MODE=token"
  echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "RAY_ADDRESS=127.0.0.1:$RAY_PORT"
  echo "RAY_JOB_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
  echo "MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
}

# A process and all its descendants (Ray renames its agents and workers, so their command lines no
# longer name this cluster: find them through their parents).
tree() {
  local p
  for p in "$@"; do
    echo "$p"
    tree $(pgrep -P "$p")
  done
}

stop() {
  local pids
  pids=$(tree $(pgrep -f "$STATE_DIR/(head|worker)/ray") $(cat "$STATE_DIR/mlflow.pid" 2>/dev/null) | sort -u)
  rm -f "$STATE_DIR/mlflow.pid"
  [[ -z $pids ]] && return 0
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do
    ps -p "$(echo $pids | tr ' ' ',')" >/dev/null || return 0  # none left
    sleep 0.5
  done
  kill -KILL $pids 2>/dev/null || true
}

status() {
  "$bin/ray" status --address="127.0.0.1:$RAY_PORT" || true
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" && echo " mlflow up" || echo "mlflow down"
}

case "${1:-}" in
  start) start ;;
  start-worker) start_worker ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|start-worker|stop|status" >&2; exit 2 ;;
esac
