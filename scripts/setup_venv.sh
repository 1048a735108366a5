#!/usr/bin/env bash
# Create (or reuse) .venv and install edgestad with everything the demo and the tests need.
# torch==2.13.0 is the CPU build; on a CUDA machine install the torch you need first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.edgestad-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[train,export,service,plc,dev]"
  touch "$STAMP"
fi
