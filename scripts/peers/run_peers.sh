#!/usr/bin/env bash
# Runs every peer once on the shared windows, one after another (2 shared cores: never in parallel).
# Needs: the peer venvs (scripts/peers/make_venvs.sh), /work/peers/smollm2-fp32 (scripts/peers/make_fp32.py) and
# /work/peers/windows.pt (scripts/peers/windows.py). Results: /work/peers/results/<peer>-g<N>.json.
# Arguments pick runs by name (e.g. `hqq-g64 nf4-g64`); none runs them all.
set -uo pipefail
cd "$(dirname "$0")/../.."
PEERS=${PEERS:-/work/peers}
run() {  # venv peer group [extra args]
  local venv=$1 peer=$2 group=$3; shift 3
  if [ ${#WANT[@]} -gt 0 ] && [[ " ${WANT[*]} " != *" $peer-g$group "* ]]; then return; fi
  echo "== $peer g$group" >&2
  "$PEERS/$venv/venv/bin/python" scripts/peers/peer_quantize.py --peer "$peer" --group-size "$group" \
    --model "$PEERS/smollm2-fp32" --windows "$PEERS/windows.pt" --out "$PEERS/results/$peer-g$group.json" "$@" \
    > "$PEERS/logs/$peer-g$group.log" 2>&1 || echo "   failed: see $PEERS/logs/$peer-g$group.log" >&2
}
WANT=("$@")
mkdir -p "$PEERS/results" "$PEERS/logs"
run llmc llmc-gptq 64
run llmc llmc-rtn 64
run hqq hqq 64
run hqq hqq 128
run nf4 nf4 64
run autoround autoround 128 --iters 50 --nsamples 32 --seqlen 512
