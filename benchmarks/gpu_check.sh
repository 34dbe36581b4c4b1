#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .whl/ from benchmarks/gpu_wheels.sh carried: every GPU
# check in one device call (about 5 minutes on an H200). SMALL=1 first runs tiny shapes through every CUDA
# path (about 1 minute). Logs and JSON go to $OUT.
set -o pipefail
began=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl | grep -v bitsandbytes) || exit 3
python3 -m zipfile -e .whl/bitsandbytes-*.whl /tmp/site || exit 3  # repacked: pip would check its RECORD
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
elapsed() { echo "$1 rc=$2 at $(( $(date +%s) - began )) s"; }
if [ -n "${SMALL:-}" ]; then
    timeout 100 python3 -m benchmarks.gpu_server --small --no-enforce --json "$OUT/small.json" > "$OUT/small.log" 2>&1
    elapsed small $?
fi
timeout 200 python3 -m benchmarks.gpu_server --sections decode,quant,train,e2e,offload --json "$OUT/full.json" \
    > "$OUT/full.log" 2>&1
rc=$?; elapsed full $rc
timeout 200 python3 -m benchmarks.gpu_server --sections swarm --json "$OUT/swarm.json" > "$OUT/swarm.log" 2>&1
rc2=$?; elapsed swarm $rc2
grep -h -E "^\[|^FAILED|could not" "$OUT"/*.log | tail -30
grep -h -E "^\| (decode|quant|train|e2e|offload|swarm) " "$OUT/full.log" "$OUT/swarm.log" | awk '!seen[$0]++' | tail -45
exit $(( rc || rc2 ))
