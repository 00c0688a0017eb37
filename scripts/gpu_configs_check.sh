#!/usr/bin/env bash
# GPU check of the configs (issue 4): runs configs/gpu.yaml and configs/fsdp.yaml on one GPU for a few dozen
# steps (and configs/ddp.yaml when there are 2+ GPUs), then prints, per run: the optimizer groups as the
# optimizer holds them, precision / strategy / fused, the WeightDecayMonitor's last metrics with a check of
# decay_norm = lr * weight_decay * ||w||, and the final validation metrics. Then the CUDA-only pytest tests,
# if pytest is installed. About 2 minutes on an H100; every run is bounded by `timeout`.
#
#   bash scripts/gpu_configs_check.sh            # from anywhere; results also under $OUT (or /tmp)
#   CPU_REHEARSAL=1 bash scripts/gpu_configs_check.sh   # no GPU: gpu.yaml + cpu.yaml only, to test this script
#
# Needs torch (CUDA) + lightning; installs what else is missing (jsonargparse[signatures], and if needed
# scikit-learn, torchmetrics, matplotlib) from the wheels in .whl/ without touching the network. The
# project itself is used from this checkout through PYTHONPATH (no pip install of it, so its wandb dependency
# is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${OUT:-/tmp}/gpu_configs_check
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline MPLBACKEND=Agg PYTHONUNBUFFERED=1

echo "== environment"
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {torch.cuda.device_count()}",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
import os
assert torch.cuda.is_available() or os.environ.get("CPU_REHEARSAL"), "no CUDA GPU visible: this script is for a GPU machine"
import lightning
print("lightning", lightning.__version__)
PYEOF

missing=()
"$PY" -c "from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as ok; assert ok" 2>/dev/null \
  || missing+=("jsonargparse[signatures]")
"$PY" -c "import sklearn" 2>/dev/null || missing+=("scikit-learn")
"$PY" -c "import torchmetrics" 2>/dev/null || missing+=("torchmetrics")
"$PY" -c "import matplotlib" 2>/dev/null || missing+=("matplotlib")
if ((${#missing[@]})); then
  echo "== installing from .whl/: ${missing[*]}"
  "$PY" -m pip install -q --no-index --find-links .whl "${missing[@]}"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
FAST=(--trainer.max_steps=40 --trainer.log_every_n_steps=5 --trainer.enable_progress_bar=false
      --trainer.enable_checkpointing=false --lr_scheduler.init_args.warmup_steps=5)

run() {  # run NAME DEVICES CONFIG...
  local name=$1 devices=$2; shift 2
  local args=() config
  for config in "$@"; do args+=(--config "configs/$config"); done
  echo
  echo "== $name: python -m lightning_adamw fit ${args[*]} --trainer.devices=$devices (40 steps)"
  local start=$SECONDS status=0
  timeout -k 10 ${RUN_TIMEOUT:-240} "$PY" -m lightning_adamw fit "${args[@]}" --trainer.devices="$devices" "${FAST[@]}" \
    --trainer.logger.init_args.save_dir="$RESULTS/$name" \
    --trainer.callbacks+=tests.helpers.cli_probe.RankProbe --trainer.callbacks.out_dir="$RESULTS/$name/probe" \
    >"$RESULTS/$name.log" 2>&1 || status=$?
  grep -E "^(group|decay|no_decay|lightning-adamw)|Error|error:" "$RESULTS/$name.log" | grep -v Warning || true
  echo "-- exit status $status after $((SECONDS - start)) s (log: $RESULTS/$name.log)"
  "$PY" - "$RESULTS/$name/probe" <<'PYEOF' || status=1
import json, math, sys
from pathlib import Path
records = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("rank*.json"))}
assert records, "no probe written: the run failed before training started"
ok = True
for rank, r in sorted(records.items()):
    print(f"rank {rank}: stage={r['stage']} steps={r.get('global_step')} strategy={r.get('strategy')} "
          f"precision={r.get('precision')} world={r.get('world_size')} backend={r.get('backend')}")
    for g in r.get("groups", []):
        print(f"  group {g['name']:<9} weight_decay={g['weight_decay']:<5} lr={g['initial_lr']} fused={g.get('fused')}"
              f" tensors={g['num_tensors']} params={g['param_names']}")
    ok &= r["stage"] == "train_end" and [g["name"] for g in r["groups"]] == ["decay", "no_decay"]
    metrics = (r.get("monitor_last_metrics") or [{}])[0]
    if metrics:
        shown = {k: round(v, 6) for k, v in sorted(metrics.items()) if k.count("/") == 2}
        print("  monitor:", json.dumps(shown))
        # step 39 is the last logged one; the lr it used is the one set after step 38
        lr = r["lrs"][38][0]
        wd = r["groups"][0]["weight_decay"]
        want = lr * wd * metrics["adamw/decay/weight_norm"]
        got = metrics["adamw/decay/decay_norm"]
        close = math.isclose(got, want, rel_tol=0.02)
        print(f"  decay_norm {got:.6g} vs lr*wd*||w|| {want:.6g}: {'OK' if close else 'MISMATCH'};"
              f" no_decay decay_norm = {metrics['adamw/no_decay/decay_norm']}")
        ok &= close and metrics["adamw/no_decay/decay_norm"] == 0.0
    elif r.get("is_global_zero"):
        print("  monitor: no metrics on rank zero"); ok = False
    val = {k: round(v, 4) for k, v in sorted(r.get("callback_metrics", {}).items()) if k.startswith("val")}
    print("  final:", val)
print("RESULT:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PYEOF
  return $status
}

failed=()
if [ -n "${CPU_REHEARSAL:-}" ]; then
  run gpu_on_cpu 1 gpu.yaml cpu.yaml || failed+=(gpu_on_cpu)
  ((${#failed[@]})) && { echo "CPU REHEARSAL: FAILED"; exit 1; }
  echo "CPU REHEARSAL: PASSED"; exit 0
fi
run gpu 1 gpu.yaml || failed+=(gpu)
run fsdp 1 fsdp.yaml || failed+=(fsdp)
if [ "$NGPU" -ge 2 ]; then
  run ddp "$NGPU" ddp.yaml || failed+=(ddp)
  run fsdp_sharded "$NGPU" fsdp.yaml || failed+=(fsdp_sharded)
else
  echo; echo "== ddp.yaml / sharded fsdp.yaml skipped: one GPU only"
fi

if [ -z "${SKIP_PYTEST:-}" ] && "$PY" -c "import pytest" 2>/dev/null; then
  echo; echo "== pytest: the CUDA-only tests of tests/test_distributed_cli.py"
  timeout -k 10 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed_cli.py \
    -k "one_gpu or two_gpus" -rs || failed+=(pytest)
fi

echo
if ((${#failed[@]})); then echo "GPU CONFIG CHECK: FAILED (${failed[*]})"; exit 1; fi
echo "GPU CONFIG CHECK: PASSED"
