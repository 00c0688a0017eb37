r"""Numeric tolerances derived from floating-point error bounds, never from what one machine produced.

The model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2): every basic operation is
computed as :math:`fl(x \circ y) = (x \circ y)(1 + \delta)`, :math:`|\delta| \le u`, with :math:`u` the unit
roundoff of the dtype the operation is *computed* in (the accumulation dtype, which may differ from the dtype
of the inputs: bfloat16 tensors are summed in float32, 1-D tensors in float64, ...). A value that went through
:math:`k` roundings has a relative error of at most

.. math:: \gamma_k = \frac{k u}{1 - k u}.

A sum of :math:`n` terms, computed in *any* order (sequential, pairwise, vectorised lanes, a tree reduction,
atomics: each term goes through at most :math:`n - 1` additions), of terms that each carry :math:`k` roundings of
their own (products, a division, a square root on the way) satisfies (Higham (3.5) and §4.2)

.. math:: |\hat s - s| \le \gamma_{k + n - 1} \sum_i |t_i|.

The bound is relative to :math:`\sum |t_i|` (computed in float64 from the test's own inputs), **not** to
:math:`|s|`: with cancellation the sum is far smaller than its terms, and that is where a relative tolerance
tuned on one CPU fails on another (AMD and Intel vectorise reductions differently, so they add in different
orders). Use the safe :math:`n - 1` depth unless the kernel's order is known (:func:`summation_depth`).

Composition: :math:`\gamma_j + \gamma_k + \gamma_j\gamma_k \le \gamma_{j+k}` (Higham Lemma 3.3), so roundings
before the sum and the additions of the sum simply add up in the index. A sum finished in a wider dtype (float32
partial sums added in float64) adds a second term with the wider unit roundoff (:func:`two_level_sum_bound`).

Tests multiply a derived bound by :data:`SAFETY` (≤ 4), for a rounding the count may have missed (e.g. inside a
library's norm); each test file also checks that a deliberately wrong value fails its bound, so the bounds stay
tight enough to catch a wrong formula.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SAFETY",
    "formula_rel",
    "gamma",
    "ratio_error_bound",
    "sqrt_error_bound",
    "sum_error_bound",
    "summation_depth",
    "two_level_sum_bound",
    "unit_roundoff",
]

#: Factor applied on top of a derived bound, for a rounding the count may have missed (kept ≤ 4).
SAFETY = 2.0

_UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff :math:`u` (half the machine epsilon) of a floating dtype: 2^-53 float64, 2^-24 float32,
    2^-8 bfloat16, 2^-11 float16. Raises ``KeyError`` for other dtypes."""
    return _UNIT_ROUNDOFF[dtype]


def gamma(k: int, u: float) -> float:
    r""":math:`\gamma_k = k u / (1 - k u)`: the relative error bound of :math:`k` roundings with unit roundoff
    ``u``. Raises ``ValueError`` when :math:`k u \ge 1` (no bound then)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k * u >= 1.0:
        raise ValueError(f"gamma_{k} undefined for u = {u}: k*u >= 1")
    return k * u / (1.0 - k * u)


def summation_depth(n_terms: int) -> int:
    """Most additions any one term goes through when ``n_terms`` terms are summed in an unknown order."""
    return max(int(n_terms) - 1, 0)


def sum_error_bound(abs_sum: float, *, n_terms: int, dtype: torch.dtype, per_term: int = 0) -> float:
    r"""Bound on :math:`|\hat s - s|` for a sum of ``n_terms`` terms computed in ``dtype`` in any order, each term
    carrying ``per_term`` roundings of its own; ``abs_sum`` is :math:`\sum |t_i|` (float64, exact terms)."""
    return gamma(per_term + summation_depth(n_terms), unit_roundoff(dtype)) * abs_sum


def two_level_sum_bound(
    abs_sum: float,
    *,
    inner_depth: int,
    inner_dtype: torch.dtype,
    outer_terms: int,
    outer_dtype: torch.dtype = torch.float64,
    per_term: int = 0,
) -> float:
    r"""A sum formed as partial sums in ``inner_dtype`` (each term through ``per_term`` roundings and at most
    ``inner_depth`` additions), then at most ``outer_terms`` partials added in ``outer_dtype``:

    .. math:: |\hat s - s| \le \big(\gamma^{in}_{k + d} + \gamma^{out}_{m}(1 + \gamma^{in}_{k + d})\big)
              \sum |t_i|

    (the partials' absolute values sum to at most :math:`(1 + \gamma^{in})\sum|t_i|`; ``m`` counts the additions
    of the outer sum plus the conversion, so ``outer_terms`` is enough).
    """
    inner = gamma(per_term + inner_depth, unit_roundoff(inner_dtype))
    outer = gamma(max(outer_terms, 1), unit_roundoff(outer_dtype))
    return (inner + outer * (1.0 + inner)) * abs_sum


def sqrt_error_bound(x: float, dx: float) -> float:
    r"""Bound on :math:`|\sqrt{\hat x} - \sqrt{x}|` when :math:`|\hat x - x| \le dx` and :math:`x, \hat x \ge 0`:
    :math:`|\sqrt a - \sqrt b| = |a - b| / (\sqrt a + \sqrt b)`, so at most :math:`dx / \sqrt x` and at most
    :math:`\sqrt{dx}` (the second holds also at :math:`x = 0`)."""
    if dx <= 0.0:
        return 0.0
    root = math.sqrt(dx)
    return min(root, dx / math.sqrt(x)) if x > 0.0 else root


def ratio_error_bound(a: float, da: float, b: float, db: float) -> float:
    r"""Bound on :math:`|\hat a/\hat b - a/b|` when :math:`|\hat a - a| \le da`, :math:`|\hat b - b| \le db`:
    :math:`(da + |a/b|\,db) / (|b| - db)`; infinite when :math:`db \ge |b|` (the divisor may be 0)."""
    if abs(b) <= db:
        return math.inf
    return (da + abs(a / b) * db) / (abs(b) - db)


def formula_rel(k: int) -> float:
    """Relative tolerance between two float64 evaluations of one closed form, each with at most ``k`` roundings
    (products, quotients, square roots), in whatever order: ``SAFETY * 2 gamma_k``."""
    return SAFETY * 2.0 * gamma(k, _UNIT_ROUNDOFF[torch.float64])
