r"""Stage 4b: every metric's name and formula, once, from the sums of one tensor or one group.

The sums (:class:`~lightning_adamw.update_split.contract.Col`) are first turned into a few norms and products
(:class:`Quantities`); then one function per kind of group (:data:`FORMULAS`) writes each metric on one line —
its name, when it is reported (group level only, only where :math:`w_{old}` is known, only with decay), its
formula and, in a comment, the paper it comes from. The public name tuples (:data:`ADAMW_GROUP_METRICS`, ...)
are read from those functions, so a new metric is one line here (plus, if it needs a new sum, a column of the
contract, its computation in the backends, and a field of :class:`Quantities`). Straight lines rather than a
table of lambdas: the per-tensor metrics run for every tensor of a model at every logged step.

``grad_norm`` is :math:`\|g\|` of ``p.grad`` as the step used it (gradient units); the rounded-away shares
(``rounded_away_fraction``: of the coordinates, ``rounded_away_sq_norm_fraction``: of
:math:`\|w_{new} - w_{old}\|^2`) read the contract's ``R``, ``RD`` (the definition is in
:mod:`~lightning_adamw.update_split.contract`); ``update_norm`` is the update the optimizer *computed*, not
what storage kept of it.

Units: norms are in the parameters' units (a step's norm per step), ratios and cosines are dimensionless,
angles in radians, rates per step (``uniform_decay_rate``, ``eff_decay_rate_*``: the fraction of a weight
removed by the decay in one step), timescales in optimizer steps or epochs.

For AdamW (:math:`w_{new} = q\,w_{old} - \eta u`, :math:`q = 1 - \eta\lambda`, Loshchilov & Hutter, 2019) with
:math:`b = \eta u`: :math:`w_{old} = (w_{new} + b)/q`, so :math:`\|w_{old}\|^2 = S/q^2` and
:math:`\langle w_{old}, b\rangle = (E + B)/q`; the update is :math:`w_{new} - w_{old} = -\eta\lambda w_{old} - b`.
For Adam with coupled L2 and other optimizers :math:`w_{old} = w_{new} + b`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch

from lightning_adamw.update_split.contract import Col
from lightning_adamw.update_split.labels import Kind

__all__ = [
    "ADAMW_GROUP_METRICS",
    "ADAMW_LAYER_METRICS",
    "ADAMW_W_OLD_METRICS",
    "ADAM_L2_GROUP_METRICS",
    "ADAM_L2_LAYER_METRICS",
    "FORMULAS",
    "GENERIC_METRICS",
    "W_OLD_MAX_RELATIVE_ERROR",
    "Quantities",
    "derive_metrics",
    "w_old_reconstructible",
]

#: Largest relative error of the reconstructed :math:`w_{old}` for which the metrics that need it are logged
#: (see :func:`w_old_reconstructible`).
W_OLD_MAX_RELATIVE_ERROR = 2.0**-6
_FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
_NAN = math.nan
#: a row's N, B, E, S, G, F, R, RD, numel, idle N and numel, by column (one C-level call)
_SUMS = operator.itemgetter(
    *(
        int(c)
        for c in (
            Col.N,
            Col.B,
            Col.E,
            Col.S,
            Col.G,
            Col.F,
            Col.R,
            Col.RD,
            Col.NUMEL,
            Col.IDLE,
            Col.IDLE_NUMEL,
        )
    )
)


def w_old_reconstructible(lr: float, weight_decay: float, rounding: float) -> bool:
    r"""Whether :math:`w_{old} = (w_{new} + \eta u) / (1 - \eta\lambda)` can be recovered after an AdamW step.

    AdamW stored :math:`w_{new}` rounded to the parameters' precision, an error relative to :math:`|w_{new}|` (and
    fused kernels round :math:`\eta\lambda w_{old}`, relative to :math:`|w_{old}|`, before subtracting it); the
    division by :math:`1 - \eta\lambda` turns that into a relative error of :math:`w_{old}` of about
    ``rounding`` / :math:`|1 - \eta\lambda|` (``rounding``: the machine epsilon of the parameters' dtype,
    2^-23 for float32, 2^-7 for bfloat16). At :math:`\eta\lambda = 1` the weights were multiplied by 0 and
    :math:`w_{old}` is gone. Reconstructible means: that error is at most :data:`W_OLD_MAX_RELATIVE_ERROR`
    (2^-6, 1.6 %), i.e. :math:`|1 - \eta\lambda| \ge 64\,` ``rounding`` (float32: 7.6e-6; bfloat16: 0.5).

    Args:
        lr: the group's learning rate :math:`\eta` of the step.
        weight_decay: the group's :math:`\lambda`.
        rounding: machine epsilon of the parameters (0 is read as float64's).
    """
    q = abs(1.0 - lr * weight_decay)
    return q > 0.0 and max(rounding, _FLOAT64_EPS) <= W_OLD_MAX_RELATIVE_ERROR * q


def _sqrt(x: float) -> float:
    # Sums of squares reconstructed from other sums can be a rounding error below zero.
    return math.sqrt(x) if x > 0.0 else 0.0


def _angle(n: float, b: float, e: float) -> float:
    """Angle between ``w_new`` and ``w_new + b`` from ``N=|w_new|^2``, ``B=|b|^2``, ``E=<w_new,b>``.

    ``atan2`` of the perpendicular and parallel parts keeps precision for the tiny angles of real training, where
    ``acos`` of a cosine close to 1 would lose it.
    """
    if n <= 0.0:
        return _NAN
    root_n = math.sqrt(n)
    perp = _sqrt(b - e * e / n)
    return math.atan2(perp, root_n + e / root_n)


def _angle_from_sides(u: float, v: float, diff: float) -> float:
    """Angle between two vectors from their norms ``u``, ``v`` and the norm of their difference ``diff``.

    Kahan's formula for the angle of a triangle ("Miscalculating Area and Angles of a Needle-like Triangle",
    2014, section 9): stable for the tiny angles of real training, where the law of cosines cancels."""
    a, b = (u, v) if u >= v else (v, u)
    c = diff
    if b <= 0.0:
        return _NAN
    mu = c - (a - b) if b >= c else b - (a - c)
    if mu < 0.0:  # (rounding: the sides violate the triangle inequality by an ulp)
        mu = 0.0
    return 2.0 * math.atan(math.sqrt(((a - b) + c) * mu / ((a + (b + c)) * ((a - c) + b))))


class Quantities:
    r"""What the formulas read, from the sums of one tensor or group and the step's hyperparameters.

    ``n, b, e, g, f, lost, lost_sq``: the sums ``N, B, E, G, F, R, RD``; ``root_g`` :math:`= \|g\|`; ``a`` :math:`= \|w_{old}\|^2` from ``S``, 0 when :math:`\|w_{new} + b\|` is below the
    rounding noise of its terms (:math:`8\,` ``rounding`` :math:`(\|w_{new}\| + \|b\|)`: a zero-initialised
    bias before its first step, exactly 0). ``root_n`` :math:`= \|w_{new}\|`, ``root_b`` :math:`= \|b\|`,
    ``root_a`` :math:`= \|w_{old}\|`, ``update`` :math:`= \|w_{new} - w_{old}\|`, ``d`` :math:`= \langle w_{old}, b\rangle`, ``lr_wd`` :math:`= \eta\lambda`,
    ``q`` :math:`= 1 - \eta\lambda` (AdamW; 1 otherwise). ``known``: :math:`w_{old}` was reconstructed
    (:func:`w_old_reconstructible`, and not below the noise with :math:`|q| < 1/2`, where dividing by
    :math:`q` would blow the noise up). ``denominators``: ``(min, median, max)`` of the coupled-L2
    denominators :math:`\sqrt{\hat v} + \epsilon` (group level only). ``sgd_momentum``: the momentum of a
    ``torch.optim.SGD`` group (``None`` for other optimizers).
    """

    __slots__ = (
        "a",
        "a_updated",
        "all_numel",
        "b",
        "beta1",
        "d",
        "decayed",
        "denominators",
        "e",
        "f",
        "g",
        "idle",
        "known",
        "lost",
        "lost_sq",
        "lr",
        "lr_wd",
        "n",
        "numel",
        "q",
        "root_a",
        "root_b",
        "root_g",
        "root_n",
        "sgd_momentum",
        "steps_per_epoch",
        "update",
        "weight_decay",
    )

    def __init__(
        self,
        kind: Kind,
        sums: Sequence[float],
        lr: float,
        weight_decay: float,
        beta1: float = 0.0,
        steps_per_epoch: float | None = None,
        rounding: float = 0.0,
        denominators: tuple[float, float, float] | None = None,
        sgd_momentum: float | None = None,
    ) -> None:
        # (straight-line code with few calls: this runs for every tensor of a model at every logged step)
        n, b, e, s, g, f, lost, lost_sq, numel, idle, idle_numel = _SUMS(sums)
        # (idle: |w|^2 of the group's trainable tensors this step left alone; they are in the weight vector, so in
        # every norm of the weights and ratio to it, with a zero update; 0 for a tensor's own row)
        self.n, self.b, self.e, self.g, self.f, self.numel = n + idle, b, e, g, f, numel
        self.all_numel = numel + idle_numel
        self.idle = idle
        self.lost, self.lost_sq = lost, lost_sq
        self.root_g = math.sqrt(g) if g > 0.0 else 0.0
        self.sgd_momentum = sgd_momentum
        self.lr, self.weight_decay, self.beta1 = lr, weight_decay, beta1
        self.steps_per_epoch = steps_per_epoch
        self.denominators = denominators
        self.decayed = weight_decay > 0.0 and lr > 0.0
        root_n_updated = math.sqrt(n) if n > 0.0 else 0.0
        self.root_n = math.sqrt(n + idle) if n + idle > 0.0 else 0.0
        self.root_b = root_b = math.sqrt(b) if b > 0.0 else 0.0
        below_noise = s <= 0.0 or math.sqrt(s) <= 8.0 * rounding * (root_n_updated + root_b)
        self.lr_wd = lr_wd = lr * weight_decay
        self.d = 0.0
        if kind == "adamw":
            self.q = q = 1.0 - lr_wd  # the factor AdamW multiplied the weights by
            self.known = known = w_old_reconstructible(lr, weight_decay, rounding)
            if below_noise:
                if abs(q) >= 0.5:
                    s = 0.0
                else:  # w_old = (noise) / q: not known to be small
                    self.known = known = False
            if known:
                c = 1.0 / q
                self.a_updated = a = c * c * s  # |w_old|^2 of the updated tensors
                self.a = a + idle
                self.d = d = c * (e + b) if s > 0.0 else 0.0  # <w_old, lr*u>
                self.root_a = _sqrt(a + idle)
                # w_new - w_old = -(lr*wd*w_old + lr*u), on the updated tensors (0 on the idle ones)
                self.update = _sqrt(lr_wd * lr_wd * a + 2.0 * lr_wd * d + b)
            else:
                self.a = self.a_updated = self.root_a = self.update = _NAN
        else:
            self.known = True
            self.q = 1.0
            self.a_updated = s = 0.0 if below_noise else s  # w_old = w_new + b
            self.a = s + idle
            self.root_a = math.sqrt(s + idle) if s + idle > 0.0 else 0.0
            self.update = root_b


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else _NAN


def _share(part_sq: float, whole: float) -> float:
    """``part_sq / whole**2`` for a sum of squares over a subset of the coordinates of a vector of norm ``whole``:
    in [0, 1] (the two come from different sums, so a share of 1 can come out an ulp above; it is clipped)."""
    return min(part_sq / (whole * whole), 1.0) if whole > 0 else _NAN


def _adamw(x: Quantities, group_level: bool) -> dict[str, float]:
    r"""AdamW groups and tensors (Loshchilov & Hutter, 2019): :math:`w_{new} = q\,w_{old} - \eta u`."""
    out: dict[str, float] = {}
    known = x.known  # the metrics that need w_old exist only when it was reconstructed
    if known:
        out["decay_norm"] = decay = abs(x.lr_wd) * _sqrt(x.a_updated)  # ||lr*wd*w_old||, AdamW's decay
    out["grad_update_norm"] = x.root_b  # ||lr*u||
    if known:
        out["decay_to_grad_ratio"] = _ratio(decay, x.root_b)
        out["update_norm"] = x.update  # ||w_new - w_old|| = ||lr*wd*w_old + lr*u||
    out["weight_norm"] = x.root_n  # ||w_new||
    if known:
        out["update_to_weight"] = _ratio(x.update, x.root_a)
        # cosine of (-lr*u, w_old): < 0 the gradient shrinks the weights too, > 0 it grows them against the decay
        out["cos_grad_update_weight"] = (
            -x.d / (x.root_a * x.root_b) if x.root_a > 0 and x.root_b > 0 else _NAN
        )
        if x.idle > 0.0:  # (idle tensors: w_old and w_new differ only on the updated ones, by the update)
            out["angular_update"] = _angle_from_sides(x.root_n, x.root_a, x.update)
        else:
            # angle(w_old, w_new): w_new + lr*u = q*w_old points along w_old, or against it when q < 0
            angle = _angle(x.n, x.b, x.e) if x.root_a > 0 else _NAN
            out["angular_update"] = math.pi - angle if x.q < 0.0 else angle
    out["grad_norm"] = x.root_g  # ||g||, the gradient the step used
    # ||g|| / ||w_old||, the weights the step saw; ||w_new|| where w_old is not known (a relative difference of
    # about update_to_weight)
    out["grad_to_weight"] = _ratio(x.root_g, x.root_a if known else x.root_n)
    if known:
        # the share of the coordinates, and of ||w_new - w_old||^2, that storing the step rounds away (contract:
        # 0 < |delta| < half an ulp of the stored weight)
        out["rounded_away_fraction"] = _ratio(x.lost, x.numel)
        out["rounded_away_sq_norm_fraction"] = _share(x.lost_sq, x.update)
    if group_level:
        out["uniform_decay_rate"] = x.lr_wd  # the decay rate AdamW applies to every coordinate
    if x.decayed:
        if group_level:
            # Kosson et al. (2023), Table 1, AdamW: the angular update in rotational equilibrium,
            # sqrt(2*lr*wd*(1-beta1)/(1+beta1)) (= sqrt(2*lr*wd) without momentum)
            out["equilibrium_angular_update"] = math.sqrt(2.0 * x.lr_wd * (1.0 - x.beta1) / (1.0 + x.beta1))
        # ... and the equilibrium norm sqrt(lr*C/(2*wd)), C = number of elements (same paper)
        out["equilibrium_weight_norm"] = math.sqrt(x.lr * x.all_numel / (2.0 * x.weight_decay))
        if group_level:
            # Wang & Aitchison (2024): AdamW's weights are an EMA over 1/(lr*wd) steps
            out["ema_timescale_steps"] = 1.0 / x.lr_wd
            if x.steps_per_epoch:
                out["ema_timescale_epochs"] = 1.0 / (x.lr_wd * x.steps_per_epoch)
    return out


def _adam_l2(x: Quantities, group_level: bool) -> dict[str, float]:
    r"""Adam with L2 coupled through the moments: :math:`w_{new} = w_{old} - \eta u`, :math:`\lambda w` inside
    :math:`u` (why AdamW decouples it: Loshchilov & Hutter, 2019)."""
    wd = x.weight_decay
    out: dict[str, float] = {
        # ||wd*w_old|| / ||g + wd*w_old||: the share of the gradient that is the L2 term (of the updated tensors)
        "l2_grad_share": _ratio(wd * _sqrt(x.a_updated), _sqrt(x.g + 2.0 * wd * x.f + wd * wd * x.a_updated))
    }
    if group_level and x.denominators is not None:
        # the per-coordinate decay lr*wd / (sqrt(v_hat) + eps) that L2 inside Adam applies: its min comes from
        # the largest denominator; the median is the lower one, as torch.median's
        low, median, high = x.denominators
        out["eff_decay_rate_min"] = _ratio(x.lr_wd, high)
        out["eff_decay_rate_median"] = _ratio(x.lr_wd, median)
        out["eff_decay_rate_max"] = _ratio(x.lr_wd, low)
    if group_level:
        out["uniform_decay_rate"] = x.lr_wd  # what AdamW would apply to every coordinate
    out["update_norm"] = x.root_b  # ||w_new - w_old||
    out["weight_norm"] = x.root_n
    out["update_to_weight"] = _ratio(x.root_b, x.root_a)
    out["angular_update"] = _angle_idle(x)
    out["grad_norm"] = x.root_g  # ||g||, the loss gradient in .grad (without the L2 term Adam adds to it)
    out["grad_to_weight"] = _ratio(x.root_g, x.root_a)  # ||g|| / ||w_old||
    out["rounded_away_fraction"] = _ratio(x.lost, x.numel)  # (the update is b here: delta = b)
    out["rounded_away_sq_norm_fraction"] = _share(x.lost_sq, x.root_b)
    return out


def _angle_idle(x: Quantities) -> float:
    """angle(w_old, w_new) where ``w_old = w_new + b`` on the updated tensors (Adam + L2, other optimizers)."""
    if x.root_a <= 0:
        return _NAN
    return _angle(x.n, x.b, x.e) if x.idle == 0.0 else _angle_from_sides(x.root_n, x.root_a, x.root_b)


def _generic(x: Quantities, group_level: bool) -> dict[str, float]:
    """Any other optimizer, from a snapshot of the weights before the step: ``b = w_old - w_new``."""
    out = {
        "update_norm": x.root_b,
        "weight_norm": x.root_n,
        "update_to_weight": _ratio(x.root_b, x.root_a),
        "angular_update": _angle_idle(x),
        "grad_norm": x.root_g,  # ||g||, the loss gradient in .grad (SGD adds weight_decay * w to it itself)
        "grad_to_weight": _ratio(x.root_g, x.root_a),  # ||g|| / ||w_old||
    }
    if group_level and x.decayed and x.sgd_momentum == 0.0:
        # Van Laarhoven (2017), Defazio et al. (2025), plain SGD with weight decay on scale-invariant weights:
        # ||g_t|| / ||w_t|| -> sqrt(2*wd / lr) at equilibrium (no formula with momentum there: left out)
        out["equilibrium_grad_to_weight"] = math.sqrt(2.0 * x.weight_decay / x.lr)
    return out


#: The formulas of each kind of group: ``formula(quantities, group_level) -> {metric: value}``. Every metric's
#: name and formula is one line there; the name tuples below are read from them.
FORMULAS: dict[str, Callable[[Quantities, bool], dict[str, float]]] = {
    "adamw": _adamw,
    "adam_l2": _adam_l2,
    "generic": _generic,
}


def _names(kind: str, group_level: bool, **conditions: bool) -> tuple[str, ...]:
    """The metrics a formula reports when every condition holds (w_old known, lr*wd > 0, ...)."""
    sums = [0.0] * len(Col)
    for col, value in {Col.N: 4.0, Col.B: 1.0, Col.E: 0.3, Col.S: 4.5, Col.G: 2.0, Col.F: 0.1, Col.R: 2.0,
                       Col.RD: 0.5, Col.NUMEL: 10.0, Col.COUNT: 1.0}.items():  # fmt: skip
        sums[col] = value
    probe = Quantities(
        kind,  # type: ignore[arg-type]
        sums,
        lr=1e-2,
        weight_decay=0.1,
        beta1=0.9,
        steps_per_epoch=5.0,
        denominators=(1.0, 2.0, 3.0),
    )
    for flag, value in conditions.items():
        setattr(probe, flag, value)
    return tuple(FORMULAS[kind](probe, group_level))


#: Group-level metrics of a decoupled (AdamW) group. The last four are omitted when ``weight_decay == 0``.
ADAMW_GROUP_METRICS: tuple[str, ...] = _names("adamw", True)
#: Per-tensor metrics of a decoupled group (``per_layer=True``).
ADAMW_LAYER_METRICS: tuple[str, ...] = _names("adamw", False)
#: The AdamW metrics that need the weights before the step: left out where they cannot be reconstructed.
ADAMW_W_OLD_METRICS: tuple[str, ...] = tuple(
    m for m in ADAMW_GROUP_METRICS if m not in _names("adamw", True, known=False)
)
#: Group-level metrics of an Adam group with coupled L2 (``torch.optim.Adam``, ``weight_decay > 0``).
ADAM_L2_GROUP_METRICS: tuple[str, ...] = _names("adam_l2", True)
#: Per-tensor metrics of a coupled-L2 group.
ADAM_L2_LAYER_METRICS: tuple[str, ...] = _names("adam_l2", False)
#: Metrics of a group of an optimizer without Adam state (snapshot fallback), group level and per tensor; a
#: ``torch.optim.SGD`` group without momentum and with ``weight_decay > 0`` also has
#: ``equilibrium_grad_to_weight`` (group level).
GENERIC_METRICS: tuple[str, ...] = _names("generic", True)


def derive_metrics(
    kind: Kind,
    sums: Sequence[float],
    *,
    lr: float,
    weight_decay: float,
    beta1: float = 0.0,
    steps_per_epoch: float | None = None,
    group_level: bool = True,
    rounding: float = 0.0,
    denominators: tuple[float, float, float] | None = None,
    sgd_momentum: float | None = None,
) -> dict[str, float]:
    r"""All metrics of one tensor or group from its sums; NaN where undefined, absent where they do not apply.

    Args:
        kind: ``"adamw"``, ``"adam_l2"`` or ``"generic"`` (:func:`~lightning_adamw.update_split.group_kind`).
        sums: one row of the sums table, indexed by :class:`~lightning_adamw.update_split.contract.Col`
            (``N, B, E, S, G, F, R, RD, numel, count``; a group's row is the sum of its tensors' rows).
        lr, weight_decay, beta1: the group's hyperparameters of the step.
        steps_per_epoch: optimizer steps per epoch (for ``ema_timescale_epochs``); ``None`` leaves it out.
        group_level: group metrics (else per-tensor ones: no hyperparameter-only metrics).
        rounding: machine epsilon of the parameters. A reconstructed :math:`w_{old}` below the rounding noise of
            :math:`w_{new} + \eta u` (:math:`8\,` ``rounding`` :math:`(\|w_{new}\| + \|\eta u\|)`) is exactly
            zero (a zero-initialised bias before its first step), and the ratios to it are undefined rather than
            huge; that holds while :math:`|1-\eta\lambda| \ge 1/2`. Where :math:`w_{old}` cannot be
            reconstructed (:func:`w_old_reconstructible` is false, or :math:`w_{new} + \eta u` is below the
            noise with :math:`|1-\eta\lambda| < 1/2`), every metric that needs it is absent: ``decay_norm``,
            ``decay_to_grad_ratio``, ``update_norm``, ``update_to_weight``, ``cos_grad_update_weight``,
            ``angular_update``, ``rounded_away_fraction``, ``rounded_away_sq_norm_fraction``; ``grad_update_norm``,
            ``weight_norm``, ``grad_norm``, ``grad_to_weight`` (then over :math:`\|w_{new}\|`) and the
            hyperparameter-only metrics stay.
        denominators: ``(min, median, max)`` of a coupled-L2 group's denominators (the ``eff_decay_rate_*``).
        sgd_momentum: the ``momentum`` of a ``torch.optim.SGD`` group (``None``: not SGD); with 0 and
            ``weight_decay > 0`` a generic group reports ``equilibrium_grad_to_weight``.
    """
    x = Quantities(kind, sums, lr, weight_decay, beta1, steps_per_epoch, rounding, denominators, sgd_momentum)
    return FORMULAS[kind](x, group_level)
