#!/usr/bin/env bash
# Create (or update) logitflow's work pools on the Prefect server that PREFECT_API_URL names.
# Run from the repository root: infra/work-pools/create.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFECT=${PREFECT:-prefect}

# One GPU machine: flow runs as processes in its checkout. One at a time (DVC locks the checkout).
$PREFECT work-pool create gpu-box --type process --base-job-template infra/work-pools/gpu-box.json --overwrite
$PREFECT work-pool set-concurrency-limit gpu-box 1

# Docker hosts with NVIDIA GPUs: a container of the logitflow-gpu image per flow run.
$PREFECT work-pool create gpu-docker --type docker --base-job-template infra/work-pools/gpu-docker.json --overwrite
