r"""Error bounds of a backend's sums table against the float64 ``reference`` backend on the same inputs.

Every backend computes, per tensor, the sums of the contract (:mod:`lightning_adamw.update_split.contract`) from
the same flat tensors and the same step scalars. With :math:`b` the step besides the decay (``eta*u``, or
``w_old - w_new`` from a snapshot), :math:`y = w + b`, :math:`g` the gradient:

=======  =============================  =================================================
column   terms                          absolute terms the error is relative to
=======  =============================  =================================================
``N``    :math:`w^2`                    :math:`w^2`
``B``    :math:`b^2`                    :math:`b^2`
``E``    :math:`w b`                    :math:`|w||b|` (mixed signs: the sum may cancel)
``S``    :math:`y^2`                    :math:`(|w| + |b|)^2` (the error of :math:`w + b` is relative to that)
``G``    :math:`g^2`                    :math:`g^2`
``F``    :math:`\pm g y`                :math:`|g|(|w| + |b|)`
``R``    :math:`[0<|\Delta|<h]`          counts: a coordinate near the threshold may go either way
``RD``   :math:`[0<|\Delta|<h]\Delta^2`  as ``R``, plus the rounding of the lost :math:`\Delta^2`
=======  =============================  =================================================

``R`` and ``RD`` (:math:`\Delta = c\,w + (1 + c)\,b`, :math:`h` half the storage spacing at :math:`w`, exact in
every backend): a backend forms :math:`\Delta` with ``step + DELTA_ROUNDINGS`` roundings relative to
:math:`|c\,w| + |(1+c)\,b|`, so a coordinate whose float64 :math:`|\Delta|` is within that of :math:`h` (the
*band*) may be counted either way; every other one is counted alike. The bound of ``R`` is the band's size, that
of ``RD`` the band's largest possible :math:`\Delta^2` plus the summation bound of the lost ones.

A backend forms each term in its compute dtype (:func:`~lightning_adamw.update_split.contract.compute_dtype`: the
dtype rule) with a number of roundings (:class:`Arithmetic`), adds at most ``partial_terms`` of them in that dtype
(:attr:`~lightning_adamw.update_split.contract.Backend.partial_terms`; ``None``: the whole tensor), then the
partial sums in float64 (:func:`~tests.helpers.tolerance.two_level_sum_bound`). The reference does the same in
float64 throughout; the bound is the sum of both, times :data:`~tests.helpers.tolerance.SAFETY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.contract import Col, StepScalars, TensorWork, decay_coefficient, half_ulp
from tests.helpers.tolerance import SAFETY, gamma, sum_error_bound, two_level_sum_bound, unit_roundoff

__all__ = ["ARITHMETIC", "DELTA_ROUNDINGS", "REFERENCE", "Arithmetic", "RowTerms", "row_bounds", "row_terms"]

#: roundings of the computed change delta = c*w + (1+c)*b beyond those of b: the factors (1+c)*s and c cast to
#: the compute dtype, their products, the addition
DELTA_ROUNDINGS = 5


@dataclass(frozen=True)
class Arithmetic:
    """Roundings of one backend's elementwise arithmetic."""

    #: roundings of ``b`` relative to ``|b|``, in the compute dtype, the casts of the scalars included
    step: int
    #: extra roundings of a squared norm read back from a norm (``vector_norm`` then squared: 2)
    norm_sqrt: int

    def per_term(self, col: Col) -> int:
        """Roundings of one term of column ``col``, relative to its absolute term (see the module table)."""
        ns, k = self.norm_sqrt, self.step
        return {
            Col.N: 1 + ns,  # w*w
            Col.B: 2 * k + 1 + ns,  # b carries k, b*b doubles them, + the product
            Col.E: k + 1,  # + the product
            Col.S: 2 * (k + 1) + 1 + ns,  # w + b: one more; |y'^2 - y^2| <= 2 gamma a^2 + ...; + the square
            Col.G: 1 + ns + 3,  # (+ the division by a GradScaler's scale and its cast, in float64)
            Col.F: k + 2 + 3,
        }[col]


#: Per backend. foreach: sqrt, / sqrt(1-beta2^t), + eps, reciprocal, * m, * step size, and the casts of three
#: scalars: 9. packed: X = m / (sqrt(v) + c*eps): 3, the cast of c*eps and its float64 product: 5; s: its
#: product, its cast, s*X: 8. numba: as packed. triton: as packed, with CUDA's sqrt and division up to 2 ulp (4 roundings each): 14.
ARITHMETIC: dict[str, Arithmetic] = {
    "foreach": Arithmetic(step=9, norm_sqrt=2),
    "packed": Arithmetic(step=8, norm_sqrt=2),
    "triton": Arithmetic(step=14, norm_sqrt=0),
    # numba: as packed, every operation in float64 (bounded here in the compute dtype: an overestimate), the
    # squares summed directly
    "numba": Arithmetic(step=8, norm_sqrt=0),
}
#: the reference: the foreach formula in float64, torch.dot for every sum
REFERENCE = Arithmetic(step=6, norm_sqrt=0)


@dataclass
class RowTerms:
    """float64 terms of one tensor's row: per column the sum of the absolute terms, the largest absolute term,
    and the float64 vectors they come from (for the tests' own deliberately wrong sums)."""

    abs_sums: dict[Col, float]
    largest: dict[Col, float]
    numel: int
    vectors: dict[str, Tensor]
    #: rounded away (kinds with ``R``): per coordinate the float64 ``|delta|``, the threshold ``h``, and the
    #: absolute term ``|c*w| + |(1+c)*b|`` the backends' error of ``delta`` is relative to
    delta: Tensor | None = None
    threshold: Tensor | None = None
    delta_terms: Tensor | None = None


def _value(x: Any) -> float:
    return float(x)


def row_terms(
    kind: str,
    item: TensorWork,
    scalars: StepScalars,
    step_size: Any,
    bc2_sqrt: Any,
    grad: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> RowTerms:
    """The float64 terms of ``item``'s row from its own tensors and scalars (independently of any backend)."""
    w = item.p.detach().cpu().double()
    if kind == "generic":
        b = item.snap.detach().cpu().double() - w  # type: ignore[union-attr]
    else:
        denom = item.v.detach().cpu().double().sqrt() / _value(bc2_sqrt) + scalars.eps  # type: ignore[union-attr]
        b = _value(step_size) * item.m.detach().cpu().double() / denom  # type: ignore[union-attr]
    aw, ab = w.abs(), b.abs()
    terms: dict[Col, Tensor] = {Col.N: w * w, Col.B: b * b, Col.E: aw * ab, Col.S: (aw + ab) ** 2}
    vectors = {"w": w, "b": b}
    if grad is not None:
        g = grad.detach().cpu().double()
        if grad_scale is not None:
            g = g / float(grad_scale)
        terms[Col.G] = g * g
        if kind == "adam_l2":
            terms[Col.F] = g.abs() * (aw + ab)
        vectors["g"] = g
    out = RowTerms(
        abs_sums={c: float(t.sum()) for c, t in terms.items()},
        largest={c: float(t.max()) if t.numel() else 0.0 for c, t in terms.items()},
        numel=w.numel(),
        vectors=vectors,
    )
    if kind != "generic":
        c = decay_coefficient(kind, scalars.lr, scalars.weight_decay)
        out.delta = (c * w + (1.0 + c) * b).abs()
        out.threshold = half_ulp(w, item.p.dtype)
        out.delta_terms = (c * w).abs() + ((1.0 + c) * b).abs()
    return out


def row_bounds(
    terms: RowTerms,
    arithmetic: Arithmetic,
    compute_dtype: torch.dtype,
    partial_terms: int | None,
    weight: float = 1.0,
) -> dict[Col, float]:
    """Absolute bound per column on ``|backend - reference|`` for one row (times the item's replica weight)."""
    n = terms.numel
    inner = n if partial_terms is None else min(partial_terms, n)
    outer = math.ceil(n / max(inner, 1)) + 4  # partial sums, the scaling by s and s^2, the weight
    out = {}
    for col, abs_sum in terms.abs_sums.items():
        backend = two_level_sum_bound(
            abs_sum,
            inner_depth=max(inner - 1, 0),
            inner_dtype=compute_dtype,
            outer_terms=outer,
            per_term=arithmetic.per_term(col),
        )
        reference = sum_error_bound(abs_sum, n_terms=n, dtype=torch.float64, per_term=REFERENCE.per_term(col))
        out[col] = SAFETY * abs(weight) * (backend + reference)
    if terms.delta is not None:
        delta, h = terms.delta, terms.threshold
        rho = gamma(arithmetic.step + DELTA_ROUNDINGS, unit_roundoff(compute_dtype)) + gamma(
            REFERENCE.step + DELTA_ROUNDINGS, unit_roundoff(torch.float64)
        )
        band = (delta - h).abs() <= rho * terms.delta_terms  # type: ignore[operator]
        lost = (delta < h) & (delta > 0)  # type: ignore[operator]
        reach = torch.maximum(delta, h) + rho * terms.delta_terms  # type: ignore[operator,arg-type]
        lost_sq = float((delta[lost & ~band] ** 2).sum())
        k = 2 * (arithmetic.step + DELTA_ROUNDINGS) + 1 + arithmetic.norm_sqrt
        summed = two_level_sum_bound(
            lost_sq, inner_depth=max(inner - 1, 0), inner_dtype=compute_dtype, outer_terms=outer, per_term=k
        )
        out[Col.R] = abs(weight) * float(band.sum())
        out[Col.RD] = abs(weight) * (float((reach[band] ** 2).sum()) + SAFETY * summed)
    return out
