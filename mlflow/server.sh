#!/usr/bin/env bash
# The MLflow tracking server as zhllama runs it: SQL backend store, artifacts proxied to an
# S3 bucket. Used by `make services` locally and as the container command of a cluster
# deployment (see mlflow/README.md); every setting comes from the environment.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. sqlite:///path/mlflow.db or postgresql://...}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow}"
: "${MLFLOW_S3_ENDPOINT_URL:?set MLFLOW_S3_ENDPOINT_URL to the object store}"
# One worker and no job-execution side processes: ~0.5 GB instead of ~2.5 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts
