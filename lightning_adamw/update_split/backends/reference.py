r"""The ``reference`` backend: a plain loop over the tensors, everything in float64, obviously correct.

It is the oracle every other backend is tested against (``tests/test_backends.py``) and the baseline of the
benchmarks; the automatic choice never picks it. For each tensor it converts ``w_new``, ``exp_avg``, ``v`` (or the
snapshot, and the gradient) to float64 and forms the sums of the contract
(:mod:`~lightning_adamw.update_split.contract`) from :func:`adam_update`, the step torch's Adam applied; the
rounded-away columns ``R``, ``RD`` are their definition written out (:func:`half_ulp` of the stored weight).

:func:`adam_update`, :func:`adam_denominator` and :func:`adam_step` are also the package's one written-out Adam
step, for tests, benchmarks and examples (torch's ``_single_tensor_adam``, Kingma & Ba, 2015, with the decoupled
decay of Loshchilov & Hutter, 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.contract import (
    SUM_COLUMNS,
    Col,
    StepScalars,
    SumsRequest,
    Tables,
    TensorWork,
    decay_coefficient,
    half_ulp,
)

__all__ = ["BACKEND", "adam_denominator", "adam_step", "adam_update"]


def adam_denominator(
    exp_avg_sq: Tensor, step: float, beta2: float, eps: float, dtype: torch.dtype | None = torch.float64
) -> Tensor:
    r""":math:`\sqrt{\hat v} + \epsilon = \sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon`, as torch's Adam forms it.

    Args:
        exp_avg_sq: :math:`v` (``max_exp_avg_sq`` under amsgrad), any shape.
        step: :math:`t`, the optimizer's step count of the tensor (after the step).
        beta2, eps: the group's :math:`\beta_2` and :math:`\epsilon`.
        dtype: the dtype to compute in (default float64; ``None``: ``exp_avg_sq``'s own).
    """
    v = exp_avg_sq if dtype is None else exp_avg_sq.to(dtype)
    return v.sqrt() / (1.0 - beta2**step) ** 0.5 + eps


def adam_update(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    r""":math:`\eta u = \frac{\eta}{1 - \beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}`: what
    torch's Adam / AdamW subtracted from the weights besides the decay, from the state after the step.

    Args: as :func:`adam_denominator`, with ``exp_avg`` :math:`m`, ``lr`` :math:`\eta`, ``betas``
    :math:`(\beta_1, \beta_2)`. Returns a tensor of ``exp_avg``'s shape in ``dtype``.
    """
    beta1, beta2 = betas
    m = exp_avg if dtype is None else exp_avg.to(dtype)
    return (lr / (1.0 - beta1**step)) * m / adam_denominator(exp_avg_sq, step, beta2, eps, dtype)


def adam_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
) -> Tensor:
    r"""One Adam (``decoupled=False``: L2 added to the gradient) or AdamW step of one tensor, in float64.

    ``state`` holds ``step`` (a float), ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``), updated in
    place; empty on the first step. Returns the new weights :math:`w_{old}(1-\eta\lambda) - \eta u` (AdamW) or
    :math:`w_{old} - \eta u` with :math:`g + \lambda w_{old}` in the moments (Adam).
    """
    beta1, beta2 = betas
    w = param.detach().to(torch.float64)
    g = grad.detach().to(torch.float64)
    g = -g if maximize else g
    if not state:
        state.update(step=0.0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(w)
    state["step"] += 1.0
    if weight_decay != 0.0:
        if decoupled:
            w = w * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * param.detach().to(torch.float64)
    state["exp_avg"] = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
    v = state["exp_avg_sq"]
    if amsgrad:
        state["max_exp_avg_sq"] = v = torch.maximum(state["max_exp_avg_sq"], v)
    return w - adam_update(state["exp_avg"], v, step=state["step"], lr=lr, betas=betas, eps=eps)


class ReferenceBackend:
    name = "reference"
    kinds = frozenset({"adamw", "adam_l2", "generic"})
    partial_terms = None  # float64 throughout
    fallible = False

    def accepts(self, item: TensorWork) -> bool:
        return item.p.device.type != "mps"  # (no float64 there)

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> None:
        return None

    def add_sums(self, prepared: None, request: SumsRequest, tables: Tables) -> None:
        for part in request.parts:
            grads = part.grads or [None] * len(part.items)
            steps = _per_item(part.scalars, len(part.items))
            for item, g, (step_size, bc2) in zip(part.items, grads, steps, strict=True):
                sums = self.tensor_sums(
                    request.kind, item, part.scalars, step_size, bc2, g, request.grad_scale
                )
                table = tables.on(item.p.device)
                for col, value in sums.items():
                    table[item.row, col] += item.weight * value.to(table.dtype)

    @staticmethod
    def tensor_sums(
        kind: str,
        item: TensorWork,
        scalars: StepScalars,
        step_size: Any,
        bc2_sqrt: Any,
        grad: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> dict[Col, Tensor]:
        """The contract's sums of one tensor, in float64 (0-d tensors on the item's device)."""
        w = item.p.to(torch.float64)
        if kind == "generic":
            b = item.snap.to(torch.float64) - w  # type: ignore[union-attr]
        else:
            # eta*u = step_size * m / (sqrt(v) / bc2 + eps), with the corrections the optimizer used
            denom = item.v.to(torch.float64).sqrt() / _as64(bc2_sqrt, w) + scalars.eps  # type: ignore[union-attr]
            b = _as64(step_size, w) * item.m.to(torch.float64) / denom  # type: ignore[union-attr]
        y = w + b  # the weights before the step (times 1 - lr*wd for AdamW)
        sums = {Col.N: w.dot(w), Col.B: b.dot(b), Col.E: w.dot(b), Col.S: y.dot(y)}
        columns = SUM_COLUMNS[kind]
        if Col.G in columns:
            g = grad.to(torch.float64)  # type: ignore[union-attr]
            if grad_scale is not None:  # fused optimizer + GradScaler: p.grad is still scaled
                g = g / grad_scale.to(device=g.device, dtype=torch.float64)
            sums[Col.G] = g.dot(g)
            if Col.F in columns:
                sums[Col.F] = -g.dot(y) if scalars.maximize else g.dot(y)
        if Col.R in columns:
            # the change the optimizer computed, w_old - (exact w_new) = c*w_new + (1 + c)*b, and whether storing
            # it rounds it away: 0 < |delta| < half the storage dtype's spacing at the stored weight
            c = decay_coefficient(kind, scalars.lr, scalars.weight_decay)
            delta = (c * w + (1.0 + c) * b).abs()
            lost = (delta < half_ulp(w, item.p.dtype)) & (delta > 0)
            sums[Col.R] = lost.sum().to(torch.float64)
            lost_delta = torch.where(lost, delta, 0.0)
            sums[Col.RD] = lost_delta.dot(lost_delta)
        return sums


def _per_item(scalars: StepScalars, n: int) -> list[tuple[Any, Any]]:
    if not n or len(scalars.step_size) == 0:
        return [(0.0, 1.0)] * n
    step_size = scalars.step_size
    bc2 = scalars.bc2_sqrt
    return list(zip(_list(step_size), _list(bc2), strict=True))


def _list(values: Any) -> list[Any]:
    return list(values.unbind(0)) if isinstance(values, Tensor) else list(values)


def _as64(value: Any, like: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float64)
    return float(value)


BACKEND = ReferenceBackend()
