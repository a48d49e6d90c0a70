#!/usr/bin/env bash
# `make ui`: a local Prefect server and MLflow server on 127.0.0.1, the flows served as deployments.
# Ctrl-C stops all three. The MLflow server reads the same SQLite store the stages write.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# the same homes and switches as the Makefile (flow runs of `make demo` then show in this UI)
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect} HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
mkdir -p .prefect .mlflow/artifacts
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

$BIN/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" > .prefect/server.log 2>&1 &
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $BIN/mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$PWD/.mlflow/mlflow.db" --default-artifact-root "$PWD/.mlflow/artifacts" \
  > .mlflow/server.log 2>&1 &

wait_for() {  # url, name, log
  for _ in $(seq 120); do curl -fs "$1" > /dev/null && return 0; sleep 0.5; done
  echo "$2 did not start within 60 s; see $3" >&2; exit 1
}
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" "Prefect server" .prefect/server.log
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" "MLflow server" .mlflow/server.log

echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT  (deployments: pipeline/logitflow, cache-teacher/logitflow, ...)"
echo "MLflow UI:  http://127.0.0.1:$MLFLOW_PORT"
echo "Trigger:    $BIN/prefect deployment run 'pipeline/logitflow' --watch   (Ctrl-C here stops everything)"
PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" $BIN/python -m flows.serve
