#!/usr/bin/env bash
# The whole flow on the built-in demo dataset: train, evaluate, export (no download).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
.venv/bin/edgestad demo --out demo_out "$@"
