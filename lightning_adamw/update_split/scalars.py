r"""Stage 2: this step's scalars — hyperparameters and the bias corrections, replayed as the optimizer computed them.

torch's Adam subtracts :math:`\eta u` with :math:`u = \hat m / (\sqrt{\hat v} + \epsilon)`, as
:math:`\frac{\eta}{1-\beta_1^t}\, m \,/\, (\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon)`. The two corrections are read
per tensor from its ``step`` (tensors that skipped steps have other counts) and computed in the precision the
optimizer used, because that is the step that was applied (:func:`bias_corrections`):

* default (for-loop and foreach) optimizers, and the fused CPU kernel: ``step`` on the CPU, corrections in
  Python floats (float64). So here: host floats, each distinct ``step`` computed once;
* ``capturable=True``, and fused CUDA kernels: corrections computed on the device from the float32 ``step`` in
  float32 (``1 - 0.999**1`` in float32 is off by 1e-5 relative, which shows in the first steps). Replayed with
  the same float32 operations on the stacked steps;
* ``step`` moved to a device by hand: float64 on that device (no sync).

Device corrections stay one vector per group (a few kernels, none per tensor).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.contract import StepScalars
from lightning_adamw.update_split.labels import as_float
from lightning_adamw.update_split.state import GroupWork

__all__ = ["bias_corrections", "replay_device", "replay_float32", "replay_host", "step_scalars"]

_STEP = operator.itemgetter("step")
_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})


def step_scalars(works: Sequence[GroupWork], param_groups: Sequence[Mapping[str, Any]]) -> list[StepScalars]:
    """This step's :class:`StepScalars` of every group (learning rate, decay, betas, eps and the per-tensor bias
    corrections change at every step, so they are read at every call, cached plan or not)."""
    out = []
    for work in works:
        group = param_groups[work.index]
        betas = group.get("betas", (0.0, 0.0))
        lr, beta1, beta2 = as_float(group.get("lr", 0.0)), as_float(betas[0]), as_float(betas[1])
        step_size: Any = ()
        bc2: Any = ()
        if work.kind != "generic" and work.items:
            steps = list(map(_STEP, [it.state for it in work.items]))
            if not set(map(type, steps)) <= _PLAIN_TYPES:  # Python numbers (an old checkpoint): as tensors
                steps = [s if isinstance(s, Tensor) else torch.tensor(float(s)) for s in steps]
            # (a fused optimizer keeps all its state on one device type: the first step tells)
            float32 = bool(group.get("capturable", False)) or (
                bool(group.get("fused", False)) and steps[0].device.type != "cpu"
            )
            step_size, bc2 = bias_corrections(steps, lr, beta1, beta2, float32=float32)
        out.append(
            StepScalars(
                lr=lr,
                weight_decay=as_float(group.get("weight_decay", 0.0)),
                beta1=beta1,
                beta2=beta2,
                eps=as_float(group.get("eps", 0.0)),
                maximize=bool(group.get("maximize", False)),
                sgd_momentum=_sgd_momentum(group),
                step_size=step_size,
                bc2_sqrt=bc2,
            )
        )
    return out


def _sgd_momentum(group: Mapping[str, Any]) -> float | None:
    """The momentum of a ``torch.optim.SGD`` group (it has ``momentum``, ``dampening`` and ``nesterov``)."""
    if "momentum" in group and "dampening" in group and "nesterov" in group:
        return as_float(group["momentum"])
    return None


def bias_corrections(
    steps: Sequence[Tensor], lr: float, beta1: float, beta2: float, *, float32: bool = False
) -> tuple[Any, Any]:
    r"""Per tensor :math:`\eta / (1 - \beta_1^t)` and :math:`\sqrt{1 - \beta_2^t}` from the ``step`` tensors.

    ``float32=True`` replays capturable Adam and fused CUDA kernels: ``-1 / ((beta1**t - 1) / lr)`` and
    ``sqrt(-(beta2**t - 1))`` in the dtype of ``step`` (float32), on its device. Otherwise CPU steps give host
    float lists (float64, as torch computes them in Python), device steps float64 vectors on that device.
    Steps on several devices give lists of 0-d tensors.
    """
    if not steps:
        return [], []
    t = _stacked(steps)
    if t is None:  # spread over devices: one at a time
        pairs = [bias_corrections([s], lr, beta1, beta2, float32=float32) for s in steps]
        return [p[0][0] for p in pairs], [p[1][0] for p in pairs]
    if float32:
        return replay_float32(t, lr, beta1, beta2)
    if t.device.type == "cpu":
        return replay_host(t, lr, beta1, beta2)
    return replay_device(t, lr, beta1, beta2)


def replay_float32(t: Tensor, lr: float, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """Capturable Adam and fused CUDA kernels: ``torch._foreach_pow(beta1, steps); sub_(1); div_(lr);
    reciprocal_(); neg_()`` and ``pow(beta2, steps); sub_(1); neg_(); sqrt_()`` in the dtype of ``step``
    (float32): the very operations, elementwise on the stacked steps ``t``."""
    return -(((torch.pow(beta1, t) - 1) / lr).reciprocal()), torch.sqrt(-(torch.pow(beta2, t) - 1))


def replay_host(t: Tensor, lr: float, beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """Default optimizers: ``step`` on the CPU, corrections in Python floats (reading CPU tensors is no device
    sync). Steps are nearly always equal: each distinct one is computed once."""
    values = t.to(torch.float64).tolist()
    corrections: dict[float, tuple[float, float]] = {}
    for s in set(values):
        # s == 0 only for a step a fused optimizer skipped (and undid); that split is discarded anyway
        corrections[s] = (lr / (1.0 - beta1**s) if s > 0 else math.nan, (1.0 - beta2**s) ** 0.5)
    if len(corrections) == 1:
        step_size, bc2 = corrections[values[0]]
        return [step_size] * len(values), [bc2] * len(values)
    return [corrections[s][0] for s in values], [corrections[s][1] for s in values]


def replay_device(t: Tensor, lr: float, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """``step`` on an accelerator (a state moved there by hand): float64 there, one vector each, no sync."""
    t = t.to(torch.float64)
    return lr / (1.0 - torch.pow(beta1, t)), torch.sqrt(1.0 - torch.pow(beta2, t))


def _stacked(steps: Sequence[Tensor]) -> Tensor | None:
    """All ``step`` tensors as one vector (one kernel) when they share a device, else ``None``.

    Called at every logged step with one tensor per parameter: nothing here touches the tensors one by one
    (``torch.stack`` itself checks devices and shapes)."""
    try:
        return torch.stack(list(steps)).reshape(-1)  # 0-d steps (torch >= 2), or all of shape (1,)
    except RuntimeError:  # steps on several devices, or shapes that differ
        pass
    if any(s.device != steps[0].device for s in steps):
        return None
    return torch.stack([s.reshape(()) for s in steps])
