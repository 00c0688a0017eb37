r"""Error bounds of the monitor's metrics against float64 references from parameter snapshots.

The reference (:func:`tests.helpers.monitor_reference.reference_metrics`) recomputes each metric in float64 from the
stored weights before (:math:`W`) and after (:math:`V`) a real optimizer step: :math:`D = V - qW` with
:math:`q = 1 - \eta\lambda` (AdamW; :math:`q = 1` for Adam + L2 and other optimizers) is the gradient update
as stored. The monitor instead reconstructs the step from the optimizer state. Their difference has three
sources, each bounded with the counting rules of :mod:`tests.helpers.tolerance` (:math:`u_p` the unit roundoff
of the parameters' dtype, :math:`u_c` of the dtype the monitor computes in, :math:`\gamma_k` as there):

1. *Storage and replay* (elementwise): torch stored :math:`fl(fl(qW) - \eta u)`, and both torch and the monitor
   computed :math:`\eta u = \text{step} \cdot m/(\sqrt{v}/c + \epsilon)` with :data:`ETA_ROUNDINGS` roundings
   each, torch in the parameters' dtype and the monitor in its compute dtype. So the monitor's
   :math:`b = \eta u` differs from :math:`-D` by at most (in norm)

   .. math:: E_b = \gamma_2(u_p)(|q| + \eta\lambda)\|W\| + u_p\|V\|
                   + (\gamma_{12}(u_c) + \gamma_{12}(u_p))(\|D\| + \ldots)

   (the :math:`|q| + \eta\lambda` covers fused kernels that form :math:`W - \eta\lambda W` instead of
   :math:`qW`), and :math:`y = V + b` differs from :math:`qW` by :math:`E_y = E_b + u_c(\|V\| + \|D\| + E_b)`.
   For optimizers without Adam state the monitor's :math:`b = fl(W - V)` from its own snapshot:
   :math:`E_b = u_c\|D\|`, :math:`E_y = 0`.
2. *Sums* (``N, B, E, S, G, F``): a tensor's terms are added in the compute dtype in some order (at most
   ``numel - 1`` additions per term, safe for any kernel), then in float64 across blocks, tensors and ranks:
   :math:`\rho = \gamma_{k + n - 1}(u_r) + \gamma_{n + T}(u_{64})` relative to the sum of the absolute terms,
   which is bounded with norms (:math:`\sum |V||b| \le \|V\|\,\|b\|` and so on).
3. *Zero threshold*: the monitor treats :math:`\|y\| \le 8\,\text{eps}_p(\|V\| + \|b\|)` as
   :math:`w_{old} = 0` (a zero-initialised bias); the bounds on everything derived from :math:`w_{old}` include
   that threshold divided by :math:`|q|`.

Each metric's bound then follows from these by the triangle inequality and first-order propagation through the
closed forms of :func:`lightning_adamw.update_split.derive_metrics` (square roots with
:func:`~tests.helpers.tolerance.sqrt_error_bound`, ratios with :func:`~tests.helpers.tolerance.ratio_error_bound`),
plus the reference's own float64 rounding, times :data:`~tests.helpers.tolerance.SAFETY`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_adamw.update_split.contract import compute_dtype
from tests.helpers.tolerance import SAFETY, gamma, ratio_error_bound, sqrt_error_bound, unit_roundoff

__all__ = ["ETA_ROUNDINGS", "TensorNorms", "bias_correction_rel", "metric_bounds", "tensor_norms"]

#: Roundings of ``lr*u`` as torch computes it and as the monitor replays it: ``sqrt(v)``, ``/ sqrt(1-beta2^t)``,
#: ``+ eps`` (with the cast of eps), ``m / denom``, ``* step_size`` (with its cast), and the bias-correction
#: scalars themselves: 8; the Triton kernel's square root and division may be CUDA's approximations (up to
#: 2 ulp, 4 roundings each), hence 12.
ETA_ROUNDINGS = 12
_U64 = unit_roundoff(torch.float64)


@dataclass(frozen=True)
class TensorNorms:
    """What the bounds need of one updated tensor (float64 norms of the snapshots)."""

    numel: int
    #: the parameter's shape (the dtype rule reads it)
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: ``||W||``, ``||V||``, ``||D||`` and (coupled L2) ``||g||``
    old: float
    new: float
    step: float
    grad: float = 0.0


def tensor_norms(
    old: torch.Tensor, new: torch.Tensor, grad: torch.Tensor | None, q: float, dtype: torch.dtype
) -> TensorNorms:
    """:class:`TensorNorms` of one tensor from float64 snapshots; ``q`` = 1 - lr*wd (AdamW) or 1."""
    shape = tuple(old.shape)
    old, new = old.double().reshape(-1), new.double().reshape(-1)
    return TensorNorms(
        numel=old.numel(),
        shape=shape,
        dtype=dtype,
        old=float(torch.linalg.vector_norm(old)),
        new=float(torch.linalg.vector_norm(new)),
        step=float(torch.linalg.vector_norm(new - q * old)),
        grad=0.0 if grad is None else float(torch.linalg.vector_norm(grad.double())),
    )


def _compute_units(kind: str, t: TensorNorms) -> tuple[float, float, int]:
    """(u of the elementwise arithmetic, u of the sums, additions per term in that dtype) for ``t``: the dtype
    the contract's rule (:func:`lightning_adamw.update_split.contract.compute_dtype`) gives the tensor, for every
    kind of group and backend: float64 for vector-shaped and float64 tensors, float32 for the others."""
    u = unit_roundoff(compute_dtype(t.shape, t.dtype, torch.device("cpu")))
    return u, u, t.numel


def metric_bounds(
    kind: str,
    tensors: Sequence[TensorNorms],
    *,
    lr: float,
    weight_decay: float,
    expected: Mapping[str, float],
    eta_rel: float = 0.0,
) -> dict[str, float]:
    """Absolute bound per metric name of one tensor (``tensors`` of length 1) or group.

    ``kind`` is ``"adamw"``, ``"adam_l2"`` or ``"optim"``; ``expected`` holds the reference values of the same
    metrics (bounds of ratios and angles need them); ``eta_rel`` a further relative error of the monitor's
    ``lr*u`` (scalars replayed in another precision). See the module docstring for what is counted.
    """
    lw = lr * weight_decay if kind == "adamw" else 0.0
    q = 1.0 - lw
    # (at q = 0, lr*wd = 1, w_old is gone: every bound that needs it is infinite, and the monitor logs none)
    aq = abs(q) or 1e-150
    lam = weight_decay
    e_b2 = e_y2 = 0.0  # squared norms of the elementwise errors (concatenated tensors add their squares)
    d_n = d_b = d_e = d_s = d_g = d_f = 0.0  # errors of the sums
    n_w2 = n_v2 = n_d2 = n_g2 = 0.0
    rounding = 0.0
    for t in tensors:
        u_p = unit_roundoff(t.dtype)
        u_c, u_r, n = _compute_units(kind, t)
        if kind == "optim":
            e_b = u_c * t.step
            e_y = 0.0
        else:
            e_b = (
                gamma(2, u_p) * (aq + lw) * t.old
                + u_p * t.new
                + (gamma(ETA_ROUNDINGS, u_c) + gamma(ETA_ROUNDINGS, u_p) + eta_rel) * (t.step + u_p * t.new)
            )
            e_y = e_b + u_c * (t.new + t.step + e_b)
        nb = t.step + e_b  # bound on ||b||
        na = t.new + nb  # bound on || |V| + |b| ||
        outer = gamma(n + len(tensors) + 4, _U64)
        rho = {k: gamma(k + n - 1, u_r) + outer for k in (1, 3)}  # + product (and sqrt/square of a norm)
        d_n += rho[3] * t.new**2
        d_b += rho[3] * nb**2
        d_e += rho[1] * t.new * nb
        # S: y = V + b formed elementwise (|y| <= |V| + |b|), or the snapshot itself for other optimizers
        d_s += rho[3] * (t.old**2 if kind == "optim" else (na + e_y) ** 2)
        d_g += rho[3] * t.grad**2
        d_f += rho[1] * t.grad * (t.old + e_y) + t.grad * e_y
        e_b2 += e_b**2
        e_y2 += e_y**2
        n_w2 += t.old**2
        n_v2 += t.new**2
        n_d2 += t.step**2
        n_g2 += t.grad**2
        rounding = max(rounding, 2.0 * u_p)
    e_b, e_y = math.sqrt(e_b2), math.sqrt(e_y2)
    n_w, n_v, n_d = math.sqrt(n_w2), math.sqrt(n_v2), math.sqrt(n_d2)
    floor = 8.0 * rounding * (n_v + n_d + e_b)  # the monitor's "w_old is 0" threshold on ||y||
    if aq * n_w > floor + e_y + math.sqrt(d_s):
        floor = 0.0  # ||y|| is surely above the threshold: the monitor did not zero it
    ref_err = gamma(sum(t.numel for t in tensors) + 8, _U64)  # the float64 reference's own rounding

    def ref(name: str) -> float:
        return float(expected.get(name, math.nan))

    out: dict[str, float] = {}
    out["weight_norm"] = sqrt_error_bound(n_v2, d_n)
    grad_step = e_b + sqrt_error_bound(max(n_d - e_b, 0.0) ** 2, d_b)
    # ||w_old|| reconstructed: sqrt(S) / |q|
    r_a = (e_y + floor + sqrt_error_bound(max(aq * n_w - e_y, 0.0) ** 2, d_s)) / aq
    # ||g||: the gradient read as stored (exact in the compute dtype) and summed; ||g|| / ||w_old||
    out["grad_norm"] = sqrt_error_bound(n_g2, d_g)
    out["grad_to_weight"] = ratio_error_bound(math.sqrt(n_g2), out["grad_norm"], n_w, r_a)
    if kind == "adamw":
        out["grad_update_norm"] = grad_step
        out["decay_norm"] = lw * r_a
        update = ref("update_norm")
        elem = lw * (e_y + floor) / aq + e_b
        d_u2 = lw * lw * d_s / (aq * aq) + 2.0 * lw * (d_e + d_b) / aq + d_b
        out["update_norm"] = elem + sqrt_error_bound(max(update - elem, 0.0) ** 2, d_u2)
        out["update_to_weight"] = ratio_error_bound(update, out["update_norm"], n_w, r_a)
        out["decay_to_grad_ratio"] = ratio_error_bound(lw * n_w, out["decay_norm"], n_d, grad_step)
        cos = abs(ref("cos_grad_update_weight")) if math.isfinite(ref("cos_grad_update_weight")) else 1.0
        if n_w > 0 and n_d > 0:
            d_cos = 2.0 * ((e_y + floor) / (aq * n_w) + e_b / n_d)
            d_cos += (d_e + d_b) / (aq * n_w * n_d) + cos * (d_s / (aq * n_w) ** 2 + d_b / n_d**2)
            out["cos_grad_update_weight"] = min(d_cos, 2.0)
    elif kind == "adam_l2":
        out["update_norm"] = grad_step
        out["update_to_weight"] = ratio_error_bound(n_d, grad_step, n_w, r_a)
        share = ref("l2_grad_share")
        if math.isfinite(share) and share > 0:
            num, den = lam * n_w, lam * n_w / share
            d_num = lam * r_a
            d_den = lam * (e_y + floor) + sqrt_error_bound(den**2, d_g + 2.0 * lam * d_f + lam * lam * d_s)
            out["l2_grad_share"] = ratio_error_bound(num, d_num, den, d_den)
    else:
        out["update_norm"] = grad_step
        out["update_to_weight"] = ratio_error_bound(n_d, grad_step, n_w, r_a)
    # angle between w_old and w_new: the monitor's is the angle between V and y = V + b
    theta = ref("angular_update")
    if math.isfinite(theta) and n_w > 0 and n_v > 0:
        y = aq * n_w
        # angle(a, a + delta) <= asin(|delta| / |a|) <= (pi/2) |delta| / |a|; the monitor's angle is the one of
        # V + b from its sums, so for other optimizers (S from the snapshot itself) b's own error counts
        e_angle = e_b if kind == "optim" else e_y
        elem = (math.pi / 2.0) * (e_angle + floor) / y
        # perp^2 = B - E^2/N and par = sqrt(N) + E/sqrt(N) from the sums, |E| <= ||V|| ||b||
        nb = n_d + e_b
        perp = y * math.sin(theta)
        d_perp2 = d_b + 2.0 * nb * d_e / n_v + nb * nb * d_n / n_v2
        d_par = d_n / (2.0 * n_v) + d_e / n_v + nb * d_n / (2.0 * n_v2)
        d_sum = (sqrt_error_bound(perp * perp, d_perp2) + d_par) / max(y - e_angle - floor, 1e-300)
        out["angular_update"] = min(elem + d_sum, math.pi)
    return {
        name: SAFETY * (bound + ref_err * abs(ref(name) if math.isfinite(ref(name)) else 0.0))
        for name, bound in out.items()
    }


def bias_correction_rel(t: float, beta: float, u: float, beta_u: float = 0.0) -> tuple[float, float]:
    """Relative error bounds of ``lr / (1 - beta**t)`` and ``sqrt(1 - beta**t)`` computed with unit roundoff
    ``u``: ``beta**t`` carries a ``pow`` of at most 1 ulp (``2u``) and ``t * beta_u`` from rounding ``beta``
    itself to the working dtype; ``1 - beta**t`` turns that absolute error into ``beta**t / (1 - beta**t)``
    times it (cancellation) plus its own rounding; then the division (with the cast of ``lr``: 2 roundings) or
    the square root (halves the relative error; 1 ulp more for ``**0.5``)."""
    power = beta**t
    diff = (2.0 * u + t * beta_u) * power / (1.0 - power) + u
    return diff + gamma(2, u), diff / 2.0 + 2.0 * u
