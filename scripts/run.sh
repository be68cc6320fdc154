#!/usr/bin/env bash
# Sets up what is missing, then starts a node serving the embedded default model.
# Extra arguments go to `meshllm node join` (e.g. --http-port 8600 --name kitchen).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/meshllm node join "$@"
