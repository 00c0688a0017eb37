#!/usr/bin/env bash
# One GPU session, all device checks in one go (the lead runs this on a lent H100/H200), most important first:
#   1. the CUDA-only tests: the fused Triton kernel (tests/test_triton_sums.py) and the monitor on CUDA
#      (fused/capturable AdamW exactness with one host sync, FSDPStrategy, memory, GradScaler skip),
#   2. the GPU benchmark set (python -m benchmarks.gpu),
#   3. configs/gpu.yaml and configs/fsdp.yaml through the CLI (scripts/gpu_configs_check.sh), if time is left.
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
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider \
  tests/test_triton_sums.py tests/test_monitor_fsdp.py -rs 2>&1 | tail -25 | tee "$OUT/pytest_gpu.log"
timeout -k 5 ${BENCH_TIMEOUT:-220} python3 -m benchmarks.gpu --budget-s ${BENCH_BUDGET:-150} --repeats 5 \
  --out "$OUT/gpu_results.json" 2>&1 | tail -45 | tee "$OUT/bench.log"
if (( SECONDS < ${CONFIGS_BEFORE_S:-400} )); then
  OUT=/tmp/cfg SKIP_PYTEST=1 RUN_TIMEOUT=${RUN_TIMEOUT:-100} timeout -k 5 ${CONFIGS_TIMEOUT:-160} \
    bash scripts/gpu_configs_check.sh 2>&1 | tail -60 | tee "$OUT/configs.log"
else
  echo "configs check skipped: ${SECONDS}s used" | tee "$OUT/configs.log"
fi
