#!/usr/bin/env bash
# An MLflow tracking server for a team: a PostgreSQL backend store and an object-store artifact root,
# served (proxied) by the server so clients need no bucket credentials.
#   DB_URI=postgresql://mlflow:PASSWORD@db:5432/mlflow ARTIFACTS=s3://BUCKET/mlflow infra/mlflow-server.sh
# Binds 127.0.0.1 unless HOST says otherwise (behind a reverse proxy or a Kubernetes Service, set HOST=0.0.0.0).
set -euo pipefail
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
DB_URI=${DB_URI:-sqlite:///mlflow.db}
ARTIFACTS=${ARTIFACTS:-./mlartifacts}
exec mlflow server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$DB_URI" --artifacts-destination "$ARTIFACTS" --workers "${WORKERS:-4}"
