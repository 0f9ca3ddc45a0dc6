#!/usr/bin/env bash
# An MLflow tracking server for a team, with MLflow's basic-auth app: a PostgreSQL backend store and an
# object-store artifact root, served (proxied) by the server so clients need no bucket credentials.
#   DB_URI=postgresql://mlflow@db:5432/mlflow ARTIFACTS=s3://BUCKET/mlflow ADMIN_CREDENTIALS=admin.cred infra/mlflow-server.sh
# Every request needs a user and password (clients: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
# The admin account, created on the first start, comes from the environment (MLFLOW_AUTH_ADMIN_USERNAME,
# MLFLOW_AUTH_ADMIN_PASSWORD) or from ADMIN_CREDENTIALS, a file of mode 600 holding one line `user:password`;
# never from the command line, where `ps` shows it (MLflow wants a password of 12 characters or more).
# Users and permissions are kept in AUTH_DB_URI.
# Binds 127.0.0.1 unless HOST says otherwise (behind a reverse proxy or a Kubernetes Service, set HOST=0.0.0.0).
set -euo pipefail
# MLflow 3's job runner (GenAI jobs: scorers, prompt optimisation) is 8 more Python processes this pipeline
# never uses, and they outlive the server's stop; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
DB_URI=${DB_URI:-sqlite:///mlflow.db}
AUTH_DB_URI=${AUTH_DB_URI:-sqlite:///mlflow-auth.db}
ARTIFACTS=${ARTIFACTS:-./mlartifacts}
DEFAULT_PERMISSION=${DEFAULT_PERMISSION:-READ}  # what a user may do with others' experiments and models

die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

if [[ -n ${ADMIN_CREDENTIALS:-} ]]; then
  [[ -f $ADMIN_CREDENTIALS && -r $ADMIN_CREDENTIALS ]] || die "ADMIN_CREDENTIALS=$ADMIN_CREDENTIALS is not a readable file"
  mode=$(stat -c %a "$ADMIN_CREDENTIALS")
  [[ $mode == 600 || $mode == 400 ]] \
    || die "ADMIN_CREDENTIALS=$ADMIN_CREDENTIALS has mode $mode, expected 600: it holds the admin password (chmod 600 it)"
  IFS=: read -r MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD <"$ADMIN_CREDENTIALS" || true
  export MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD
fi
[[ -n ${MLFLOW_AUTH_ADMIN_USERNAME:-} && -n ${MLFLOW_AUTH_ADMIN_PASSWORD:-} ]] \
  || die "no admin credentials: set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD, or ADMIN_CREDENTIALS=FILE (mode 600, one line user:password)"
# CSRF key of the auth app's forms: the same for all workers of this server; set it to share it across servers.
if [[ -z ${MLFLOW_FLASK_SERVER_SECRET_KEY:-} ]]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(python3 -c "import secrets; print(secrets.token_hex(32))")
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi
# The auth app's settings (no secret in them: the admin credentials stay in the environment).
MLFLOW_AUTH_CONFIG_PATH=$(umask 077 && mktemp "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX.ini")
cat >"$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = $DEFAULT_PERMISSION
database_uri = $AUTH_DB_URI
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH
exec mlflow server --app-name basic-auth --host "$HOST" --port "$PORT" \
  --backend-store-uri "$DB_URI" --artifacts-destination "$ARTIFACTS" --workers "${WORKERS:-4}"
