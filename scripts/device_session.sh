#!/usr/bin/env bash
# One GPU session, all device checks in one go (the lead runs this on a lent H100/H200):
#   1. configs/gpu.yaml and configs/fsdp.yaml through the CLI (scripts/gpu_configs_check.sh),
#   2. the CUDA-only monitor tests (fused/capturable AdamW exactness, FSDPStrategy, memory, GradScaler skip),
#   3. the GPU benchmark set (python -m benchmarks.gpu).
# Logs and results go to $OUT. Needs jsonargparse wheels in .whl/ (see README "Development").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline MPLBACKEND=Agg
if ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
OUT=/tmp/cfg SKIP_PYTEST=1 RUN_TIMEOUT=${RUN_TIMEOUT:-110} timeout -k 5 250 bash scripts/gpu_configs_check.sh 2>&1 | tee "$OUT/configs.log"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_monitor_fsdp.py -rs 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout -k 5 ${BENCH_TIMEOUT:-170} python3 -m benchmarks.gpu --budget-s ${BENCH_BUDGET:-110} --repeats 5 \
  --out "$OUT/gpu_results.json" 2>&1 | tail -40 | tee "$OUT/bench.log"
