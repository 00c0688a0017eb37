"""GPU-only checks of WeightDecayMonitor: FSDP (``FSDPStrategy``), fused / capturable CUDA AdamW (whose ``step``
lives on the GPU), one host sync per logging step, bounded extra memory, and GradScaler-skipped steps.

On a CPU-only machine every test here is skipped; the sharded code path itself is covered on CPU by the
2-process FSDP2 (``ModelParallelStrategy``) run in ``test_monitor_ddp.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_adamw.monitor import WeightDecayMonitor
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import update_split
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, run_distributed_script
from tests.helpers.monitor_reference import compare_metrics, reference_bounds, reference_metrics

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (FSDPStrategy, fused/capturable CUDA AdamW); the CPU sharded path is tested in "
    "test_monitor_ddp.py with FSDP2 over gloo",
)

CUDA_VARIANTS = {
    "fused": {"fused": True},
    "capturable": {"capturable": True, "foreach": True},
    "foreach": {"foreach": True},
}


def _layer(metrics: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if f"/{name}/" in k}


def _cuda_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 10)).cuda()


@pytest.mark.parametrize("variant", list(CUDA_VARIANTS))
def test_cuda_adamw_exact_with_one_host_sync(variant: str) -> None:
    model = _cuda_model()
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-2, **CUDA_VARIANTS[variant])
    for step in range(3):
        x = torch.randn(32, 64, device="cuda")
        opt.zero_grad()
        model(x).square().mean().backward()
        record: dict[str, Any] = {"step": step, "groups": []}
        for g in opt.param_groups:
            record["groups"].append(
                {
                    "label": g["name"],
                    "lr": float(g["lr"]),
                    "weight_decay": float(g["weight_decay"]),
                    "maximize": False,
                    "decoupled": True,
                    "names": list(g["param_names"]),
                    "old": [p.detach().double().cpu() for p in g["params"]],
                }
            )
        opt.step()
        for rg, g in zip(record["groups"], opt.param_groups, strict=True):
            rg["new"] = [p.detach().double().cpu() for p in g["params"]]
            rg["grad"] = [p.grad.detach().double().cpu() for p in g["params"]]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                split = update_split(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (the mode's one-time "prototype feature" notice is not a sync)
        syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
        metrics = split.metrics(per_layer=True)
        bad = compare_metrics(metrics, reference_metrics(record), reference_bounds(record))
        assert bad == {}, (step, bad, {k: metrics.get(k) for k in bad}, _layer(metrics, "1.bias"))


def test_extra_memory_is_a_small_fraction_of_the_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)]).cuda()  # ~25M parameters, 100 MB
    opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-3, fused=True)
    model(torch.randn(8, 2048, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep grads allocated, as at post-hook time
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    update_split(opt)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.2 * param_bytes, (extra, param_bytes)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_grad_scaler_skipped_step_is_not_reported(tmp_path: Path, fused: bool) -> None:
    L.seed_everything(0)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=5,
        logger=rec,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    kwargs = {"fused": True} if fused else {"foreach": True}
    trainer.fit(MonitoredModule(nan_at_step=2, optimizer_kwargs=kwargs))
    logged = rec.monitor_calls()
    # GradScaler skipped the NaN step: weights stay finite and nothing is reported for it
    assert monitor.nonfinite_steps == 0
    assert monitor.skipped_steps == (1 if fused else 0)
    assert all("adamw/decay/decay_norm" in m for m in logged.values())
    assert len(logged) == 4  # 5 optimizer calls, one of them skipped


def test_fsdp_strategy_on_gpu(tmp_path: Path) -> None:
    devices = min(torch.cuda.device_count(), 2)
    results = run_distributed_script(
        tmp_path / "fsdp1",
        "--strategy",
        "fsdp1",
        "--accelerator",
        "cuda",
        "--devices",
        str(devices),
        "--steps",
        "3",
        "--optimizer-kwargs",
        json.dumps({"fused": True}),
        ranks=devices,
    )
    r0 = results[0]
    assert r0["finished"]
    assert r0["mode"] == ("sharded" if devices > 1 else "single")
    for step, expected in r0["reference"].items():
        got = r0["monitor_calls"][step]
        bad = compare_metrics(got, expected, r0["bounds"][step])  # (derived bounds, computed on rank 0)
        assert bad == {}, (step, bad, _layer(got, "net.1.bias"))
    if devices > 1:
        assert results[1]["last_metrics"] == r0["last_metrics"] and results[1]["monitor_calls"] == {}
