#!/usr/bin/env bash
# The test suite (fast tests; real-data tests skip with a reason when ../shared/data is absent).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
.venv/bin/python -m pytest -q "$@"
