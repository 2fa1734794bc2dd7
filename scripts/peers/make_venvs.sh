#!/usr/bin/env bash
# The peers' own venvs under /work/peers/<name>/venv (outside the repo; never hfquant's), one after another.
# torch first, pinned to the CPU wheel on local disk: a looser pin pulls a multi-GB CUDA build.
# Each venv's exact versions land in /work/peers/<name>/freeze.txt. Re-running only adds what is missing.
set -uo pipefail
PEERS=${PEERS:-/work/peers}
PYTHON=${PYTHON:-python3.11}
make_venv() {  # name, packages...
  local name=$1; shift
  local venv=$PEERS/$name/venv
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.13.0 \
    && "$venv/bin/python" -m pip install -q torch==2.13.0 "$@" \
    && "$venv/bin/python" -m pip freeze > "$PEERS/$name/freeze.txt" && echo "$name: ok" \
    || echo "$name: FAILED" >&2
}
make_venv llmc llmcompressor==0.14.0.1              # GPTQModifier, QuantizationModifier (RTN)
make_venv hqq hqq==0.2.8.post1 transformers==5.24.0 accelerate==1.15.0
make_venv autoround auto-round==0.16.1
make_venv nf4 transformers==5.24.0 accelerate==1.15.0 bitsandbytes==0.50.2
