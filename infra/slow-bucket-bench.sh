#!/usr/bin/env bash
# Epoch-to-epoch time of `segnet train` whose checkpoints go to a slow bucket (docs/benchmarks.md): the
# loopback S3 server behind tests/flaky_proxy.py answering a share LATE of its requests DELAY s late.
set -euo pipefail
NAME=${1:-run}; LATE=${LATE:-0.9}; DELAY=${DELAY:-1.0}; EPOCHS=${EPOCHS:-5}
WT=$(cd "$(dirname "$0")/.." && pwd); PY=${VENV_BIN:-$WT/.venv/bin}/python; W=${OUT:-/tmp/segnet-slow-bucket}/$NAME
rm -rf $W && mkdir -p $W && cd $W
export PYTHONPATH=$WT SEGNET_LOG_DIR=$W/logs RAY_ADDRESS=
eval "$(S3_STATE_DIR=$W/s3 S3_PORT=${PORT:-9071} BUCKET=bench $WT/infra/local-s3.sh start | sed 's/^/export /')"
trap "S3_STATE_DIR=$W/s3 S3_PORT=${PORT:-9071} $WT/infra/local-s3.sh stop >/dev/null; kill \$PROXY 2>/dev/null" EXIT
$PY -m pipelines.cli prepare --source ${CAMVID_DIR:-data/CamVid} --out s3://bench/shards --limit 8 --shard-size 8 --workers 1 > prepare.log 2>&1
$PY $WT/tests/flaky_proxy.py $AWS_ENDPOINT_URL late=$LATE delay=$DELAY > proxy.log & PROXY=$!
sleep 2; export AWS_ENDPOINT_URL=$(head -1 proxy.log)
t0=$(date +%s.%N)
$PY -m pipelines.cli train --data s3://bench/shards --storage-path s3://bench/runs --name $NAME --epochs $EPOCHS \
  --image-size 48x64 --batch-size 2 --workers 1 --loader-workers 0 --mlflow-uri sqlite:///$W/mlruns.db --json > best.json 2> >($PY -u -c "import sys, time
for l in sys.stdin: print(f'{time.time():.2f} {l}', end='', flush=True)" > err.log)
t1=$(date +%s.%N)
$PY - "$W" "$t0" "$t1" <<'PY'
import json, re, sys
w, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lines = (re.match(r"(\d+\.\d+) epoch \d+/\d+  loss", line) for line in open(f"{w}/err.log", errors="replace"))
at = [float(m[1]) for m in lines if m]  # when each epoch's line was printed (before its report)
best = json.load(open(f"{w}/best.json"))
print(json.dumps({"epoch_to_epoch_s": [round(b - a, 1) for a, b in zip(at, at[1:])],
                  "epoch_compute_s": [round(e["epoch_time_s"], 1) for e in best["history"]],
                  "last_epoch_to_exit_s": round(t1 - at[-1], 1), "wall_s": round(t1 - t0, 1)}))
PY
