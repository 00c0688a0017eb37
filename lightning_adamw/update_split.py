r"""Exact split of an optimizer step into its decoupled-decay part and its gradient part.

This module is the functional core behind :class:`~lightning_adamw.monitor.WeightDecayMonitor`. It imports only
torch (and the package's torch-only :mod:`lightning_adamw.optim_checks`), never Lightning, and can be called on any
optimizer right after ``optimizer.step()``, for example from ``optimizer.register_step_post_hook``.

For AdamW (``torch.optim.AdamW`` and ``torch.optim.Adam(decoupled_weight_decay=True)``) one step is

.. math::

    w_{new} = w_{old}\,(1 - \eta\lambda) - \eta\,u, \qquad
    u = \frac{\hat m}{\sqrt{\hat v} + \epsilon}

with bias-corrected moments (the ``amsgrad`` maximum of :math:`v` where enabled). Everything on the right-hand
side except :math:`w_{old}` is still in the optimizer after the step (``exp_avg``, ``exp_avg_sq``, ``step``,
``lr``, ``weight_decay``), so the step is reconstructed exactly, without having copied any parameter:
:math:`\eta u` is recomputed with the same operations torch used and
:math:`w_{old} = (w_{new} + \eta u) / (1 - \eta\lambda)`, to a relative error of about eps /
:math:`|1 - \eta\lambda|` (eps of the parameters' dtype). Where that exceeds 1/64 (``lr * weight_decay`` at or
within rounding of 1: the weights were multiplied by about 0) :math:`w_{old}` is not reconstructed and the
metrics that need it are left out (:func:`w_old_reconstructible`, :attr:`GroupSplit.w_old_known`).

Only a handful of per-tensor sums are needed, all on the parameters' device:

* :math:`N = \|w_{new}\|^2`, :math:`B = \|b\|^2`, :math:`E = \langle w_{new}, b\rangle`,
  :math:`S = \|w_{new} + b\|^2` where :math:`b` is "what was subtracted besides the decay"
  (:math:`b = \eta u` for Adam-family optimizers, :math:`b = w_{old} - w_{new}` for the snapshot fallback);
* for Adam with coupled L2 also :math:`G = \|g\|^2` and :math:`F = \langle g, w_{old}\rangle` and the
  min / median / max of the per-coordinate denominators :math:`\sqrt{\hat v} + \epsilon`.

AdamW groups (the case the monitor exists for) take the packed path of :mod:`lightning_adamw.packed_sums`: a
layout built once per optimizer and cached (rebuilt when a parameter, its storage or its optimizer state changes),
then about twenty kernels per bucket of ``chunk_numel`` elements whatever the number of tensors, and a segmented
sum by ``index_add_`` instead of a reduction per tensor. Coupled-L2 and snapshot groups use batched
``torch._foreach_*`` kernels in chunks. The extra memory is bounded by the chunk either way.

All derived quantities (norms, ratios, cosines, angles, equilibrium predictions) are closed-form functions of these
sums (see :func:`derive_metrics`); per-tensor metrics are derived only when asked for. The sums of all tensors are
moved to the host with a single transfer.

Sharded parameters (FSDP, DTensor) are handled by summing the local sums across ranks (:class:`ShardReduce`)
before any square root is taken; every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Literal

import torch
from torch import Tensor

# Which optimizers are Adam/AdamW (whose state we can reconstruct) is decided in one place for the package.
from lightning_adamw.optim_checks import is_adam_family
from lightning_adamw.packed_sums import PackedBucket, PieceSource, adamw_item_sums, build_layout
from lightning_adamw.triton_sums import (
    FusedGroup,
    build_fused_layout,
    disable,
    fused_available,
    fused_supported,
    fused_table_sums,
    shared_scalars,
)

__all__ = [
    "ADAMW_GROUP_METRICS",
    "ADAMW_LAYER_METRICS",
    "ADAM_L2_GROUP_METRICS",
    "ADAM_L2_LAYER_METRICS",
    "GENERIC_METRICS",
    "KIND_PREFIX",
    "W_OLD_MAX_RELATIVE_ERROR",
    "GroupSplit",
    "Kind",
    "ShardReduce",
    "TensorSplit",
    "UpdateSplit",
    "adamw_update_split",
    "derive_metrics",
    "dtensor_weight",
    "generic_update_split",
    "group_kind",
    "group_label",
    "group_labels",
    "layer_labels",
    "param_labels",
    "take_snapshot",
    "update_split",
    "w_old_reconstructible",
]

Kind = Literal["adamw", "adam_l2", "generic"]

#: Metric prefix per kind of group: ``<prefix>/<group>/<metric>`` and ``<prefix>_layer/<param>/<metric>``.
KIND_PREFIX: dict[str, str] = {"adamw": "adamw", "adam_l2": "adam_l2", "generic": "optim"}

#: Group-level metrics of a decoupled (AdamW) group. The last four are omitted when ``weight_decay == 0``.
ADAMW_GROUP_METRICS: tuple[str, ...] = (
    "decay_norm",
    "grad_update_norm",
    "decay_to_grad_ratio",
    "update_norm",
    "weight_norm",
    "update_to_weight",
    "cos_grad_update_weight",
    "angular_update",
    "uniform_decay_rate",
    "equilibrium_angular_update",
    "equilibrium_weight_norm",
    "ema_timescale_steps",
    "ema_timescale_epochs",
)
#: Per-tensor metrics of a decoupled group (``per_layer=True``).
ADAMW_LAYER_METRICS: tuple[str, ...] = (
    "decay_norm",
    "grad_update_norm",
    "decay_to_grad_ratio",
    "update_norm",
    "weight_norm",
    "update_to_weight",
    "cos_grad_update_weight",
    "angular_update",
    "equilibrium_weight_norm",
)
#: Group-level metrics of an Adam group with coupled L2 (``torch.optim.Adam``, ``weight_decay > 0``).
ADAM_L2_GROUP_METRICS: tuple[str, ...] = (
    "l2_grad_share",
    "eff_decay_rate_min",
    "eff_decay_rate_median",
    "eff_decay_rate_max",
    "uniform_decay_rate",
    "update_norm",
    "weight_norm",
    "update_to_weight",
    "angular_update",
)
#: Per-tensor metrics of a coupled-L2 group.
ADAM_L2_LAYER_METRICS: tuple[str, ...] = (
    "l2_grad_share",
    "update_norm",
    "weight_norm",
    "update_to_weight",
    "angular_update",
)
#: Metrics of a group of an optimizer without Adam state (snapshot fallback), group level and per tensor.
GENERIC_METRICS: tuple[str, ...] = ("update_norm", "weight_norm", "update_to_weight", "angular_update")

# Columns of the per-tensor sums table (one row per parameter of the optimizer).
_N, _B, _E, _S, _G, _F, _NUMEL, _COUNT = range(8)
_K = 8
# Histogram refinement used for the exact median of the coupled-L2 denominators.
_HIST_BINS = 1024
_HIST_PASSES = 3
_MIN_AUTO_CHUNK = 1 << 16
# Tensors up to this size get float64 sums (see _sq_norms).
_EXACT_NUMEL = 1 << 16
_MAX_AUTO_CHUNK = 1 << 24
_PACKED_MIN_CHUNK = 1 << 18


# --------------------------------------------------------------------------------------------------------------
# Labels and classification
# --------------------------------------------------------------------------------------------------------------
def group_label(group: Mapping[str, Any], index: int) -> str:
    """The name of a parameter group: its ``"name"`` key, else ``group{index}``."""
    name = group.get("name")
    return str(name) if name not in (None, "") else f"group{index}"


def param_labels(group: Mapping[str, Any], index: int, label: str | None = None) -> list[str]:
    """Names of a group's parameters: torch's ``"param_names"`` when present, else ``<group>.param{j}``
    (``<group>`` is ``label`` when given, else :func:`group_label`)."""
    names = group.get("param_names")
    params = group["params"]
    if names is not None and len(names) == len(params):
        return [str(n) for n in names]
    label = group_label(group, index) if label is None else label
    return [f"{label}.param{j}" for j in range(len(params))]


def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """The labels of an optimizer's groups, unique within the optimizer.

    Each group is :func:`group_label` (its ``"name"``, else ``group{i}``); a label that an earlier group already
    has gets the first free suffix ``_1``, ``_2``, ... (two ``build_param_groups`` calls give ``decay``,
    ``no_decay``, ``decay_1``, ``no_decay_1``). Metric keys ``<prefix>/<label>/<metric>`` therefore never merge
    two groups.
    """
    return _unique_labels([group_label(g, i) for i, g in enumerate(param_groups)])


def layer_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per-tensor labels for the per-layer metric keys ``<prefix>_layer/<label>/<metric>``, one list per group.

    A tensor's label is its name (:func:`param_labels`) when no other group of the optimizer has a tensor of that
    name. A name found in more than one group (two ``build_param_groups`` calls on a backbone and a head both
    name their first weight ``0.weight``) is qualified with the group's label from :func:`group_labels` in
    *every* group that has it: ``backbone_decay/0.weight``, ``head_decay/0.weight`` (``decay/0.weight``,
    ``decay_1/0.weight`` when the groups share their names too). A name repeated inside one group (groups
    assembled by hand) gets the suffixes of :func:`group_labels`. The labels are unique within the optimizer.
    """
    groups = group_labels(param_groups)
    names = [param_labels(g, i, label=groups[i]) for i, g in enumerate(param_groups)]
    owners: dict[str, set[int]] = {}
    for gi, group_names in enumerate(names):
        for name in group_names:
            owners.setdefault(name, set()).add(gi)
    flat = _unique_labels(
        [
            f"{groups[gi]}/{name}" if len(owners[name]) > 1 else name
            for gi, group_names in enumerate(names)
            for name in group_names
        ]
    )
    out: list[list[str]] = []
    start = 0
    for group_names in names:
        out.append(flat[start : start + len(group_names)])
        start += len(group_names)
    return out


def group_kind(group: Mapping[str, Any], adam_family: bool) -> Kind:
    """Classify a parameter group.

    ``"adamw"`` for decoupled weight decay, and also for Adam with ``weight_decay == 0`` (then Adam and AdamW are
    the same algorithm); ``"adam_l2"`` for Adam with coupled L2 (``weight_decay > 0``, not decoupled);
    ``"generic"`` for every optimizer that is not Adam-family.
    """
    if not adam_family:
        return "generic"
    if group.get("decoupled_weight_decay", False) or _scalar(group.get("weight_decay", 0.0)) == 0.0:
        return "adamw"
    return "adam_l2"


def _scalar(value: Any) -> float:
    # lr / betas may be tensors (capturable optimizers); that is the only place a read can sync, and it is rare.
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


def _unique_labels(labels: Sequence[str]) -> list[str]:
    """The first occurrence of a label keeps it; a repeat gets the first suffix ``_k`` (k = 1, 2, ...) that is
    neither another label of the list nor already given out (so ``[a, a, a_1]`` gives ``a, a_2, a_1``)."""
    taken = set(labels)
    first: set[str] = set()
    out = []
    for label in labels:
        if label not in first:
            first.add(label)
            out.append(label)
            continue
        k = 1
        while f"{label}_{k}" in taken:
            k += 1
        taken.add(f"{label}_{k}")
        out.append(f"{label}_{k}")
    return out


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
class TensorSplit:
    """Metrics of one updated parameter tensor (values are plain floats, non-finite ones removed).

    ``name`` is the parameter's name, ``key`` its label in per-layer metric keys (:func:`layer_labels`: the name,
    or ``<group>/<name>`` when several groups of the optimizer have a tensor of that name). ``metrics`` is
    derived from the tensor's sums on first access: group-level logging never pays for the per-tensor
    dictionaries.
    """

    __slots__ = (
        "_hyper",
        "_metrics",
        "_rounding",
        "_sums",
        "finite",
        "group",
        "key",
        "kind",
        "name",
        "numel",
    )

    def __init__(
        self,
        name: str,
        group: str,
        kind: Kind,
        numel: int,
        metrics: dict[str, float] | None = None,
        finite: bool = True,
        *,
        sums: Sequence[float] | None = None,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        beta1: float = 0.0,
        rounding: float = 0.0,
        key: str | None = None,
    ) -> None:
        self.name = name
        self.key = name if key is None else key
        self.group = group
        self.kind: Kind = kind
        self.numel = numel
        self.finite = finite
        self._metrics = metrics
        self._sums = sums
        self._hyper = (lr, weight_decay, beta1)
        self._rounding = rounding

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            if not self.finite or self._sums is None:
                self._metrics = {}
            else:
                lr, wd, beta1 = self._hyper
                raw = derive_metrics(
                    self.kind,
                    self._sums,
                    lr=lr,
                    weight_decay=wd,
                    beta1=beta1,
                    group_level=False,
                    rounding=self._rounding,
                )
                self._metrics = {k: v for k, v in raw.items() if math.isfinite(v)}
        return self._metrics

    def __repr__(self) -> str:
        return (
            f"TensorSplit(name={self.name!r}, kind={self.kind!r}, numel={self.numel}, finite={self.finite})"
        )


@dataclass
class GroupSplit:
    """Metrics of one parameter group."""

    name: str
    kind: Kind
    lr: float
    weight_decay: float
    numel: int
    num_tensors: int
    metrics: dict[str, float]
    #: per-tensor results (a lazy sequence from :func:`update_split`: built when first read)
    tensors: Sequence[TensorSplit] = field(default_factory=list)
    finite: bool = True
    #: ``False`` when the weights before the step could not be reconstructed (``lr * weight_decay`` at or too
    #: close to 1, see :func:`w_old_reconstructible`): the metrics that need them are then left out
    w_old_known: bool = True

    @property
    def prefix(self) -> str:
        return KIND_PREFIX[self.kind]


class _TensorSplits(Sequence[TensorSplit]):
    """A group's :class:`TensorSplit` objects, made on first access: group-level logging needs none of them
    (with hundreds of tensors, making them was a visible share of the monitor's time on a GPU)."""

    def __init__(
        self, work: _GroupWork, positions: list[int], sums: list[list[float]], finite: list[bool]
    ) -> None:
        # the work's scalars change at the next step (cached plans): keep this step's values
        self._args = (work.label, work.kind, work.lr, work.weight_decay, work.beta1)
        self._names = [work.names[i] for i in positions]
        self._keys = [work.keys[i] for i in positions]
        self._rounding = [work.rounding[i] for i in positions]
        self._sums = sums
        self._finite = finite
        self._items: list[TensorSplit] | None = None

    def _made(self) -> list[TensorSplit]:
        if self._items is None:
            label, kind, lr, wd, beta1 = self._args
            self._items = [
                TensorSplit(
                    name=name,
                    group=label,
                    kind=kind,
                    numel=round(sums[_NUMEL]),
                    finite=finite,
                    sums=sums,
                    lr=lr,
                    weight_decay=wd,
                    beta1=beta1,
                    rounding=rounding,
                    key=key,
                )
                for name, key, sums, finite, rounding in zip(
                    self._names, self._keys, self._sums, self._finite, self._rounding, strict=True
                )
            ]
        return self._items

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: Any) -> Any:
        return self._made()[index]

    def __iter__(self) -> Iterator[TensorSplit]:
        return iter(self._made())

    def nonfinite_keys(self) -> list[str]:
        return [k for k, f in zip(self._keys, self._finite, strict=True) if not f]


def _nonfinite_keys(group: GroupSplit) -> list[str]:
    if isinstance(group.tensors, _TensorSplits):  # without making every TensorSplit
        return group.tensors.nonfinite_keys()
    return [t.key for t in group.tensors if not t.finite]


@dataclass
class UpdateSplit:
    """Everything computed for one optimizer step."""

    groups: list[GroupSplit]
    #: ``True`` when the step was not applied (fused optimizer + GradScaler overflow); then nothing is reported.
    skipped: bool = False

    @property
    def nonfinite_tensors(self) -> list[str]:
        """Per-layer labels (:func:`layer_labels`) of tensors whose weights or update were NaN/inf."""
        return [key for g in self.groups for key in _nonfinite_keys(g)]

    @property
    def w_old_unknown(self) -> list[GroupSplit]:
        """Groups whose weights before the step could not be reconstructed (see :func:`w_old_reconstructible`)."""
        return [g for g in self.groups if not g.w_old_known]

    def metrics(self, per_layer: bool = False, label_prefix: str = "") -> dict[str, float]:
        """Flat ``{"<prefix>/<group>/<metric>": value}`` dict; per-layer keys under ``<prefix>_layer/<param>/``.

        ``<group>`` is the group's unique label (:func:`group_labels`), ``<param>`` the tensor's unique label
        (:func:`layer_labels`: its name, or ``<group>/<name>`` when several groups have a tensor of that name).
        ``label_prefix`` is prepended to both (used to keep several optimizers apart: ``opt0.``, ``opt1.``).
        Non-finite values never appear (they are counted in :attr:`nonfinite_tensors` instead).
        """
        if self.skipped:
            return {}
        out: dict[str, float] = {}
        for g in self.groups:
            prefix = g.prefix
            base = f"{prefix}/{label_prefix}{g.name}/"
            out.update({base + key: value for key, value in g.metrics.items()})
            if per_layer:
                layer = f"{prefix}_layer/{label_prefix}"
                for t in g.tensors:
                    base = f"{layer}{t.key}/"
                    out.update({base + key: value for key, value in t.metrics.items()})
        return out


@dataclass
class ShardReduce:
    """How to combine per-rank sums when parameters are sharded (FSDP, DTensor).

    Args:
        all_reduce: ``all_reduce(tensor, op)`` in place with ``op`` in ``{"sum", "max"}``; called with the same
            shapes in the same order on every rank.
        weight: ``weight(param) -> float`` multiplies that parameter's local sums before the sum, ``1/r`` for a
            parameter replicated on ``r`` of the ranks taking part (so the total counts it once).
    """

    all_reduce: Callable[[Tensor, str], None]
    weight: Callable[[Tensor], float] = field(default=lambda p: 1.0)

    @classmethod
    def torch_distributed(
        cls, group: Any = None, weight: Callable[[Tensor], float] | None = None
    ) -> ShardReduce:
        """A reducer over a ``torch.distributed`` process group (default: the world)."""
        import torch.distributed as dist

        def all_reduce(t: Tensor, op: str) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)

        return cls(all_reduce=all_reduce, weight=weight or dtensor_weight)


def dtensor_weight(param: Tensor) -> float:
    """``1 / (number of replicas)`` of a DTensor parameter (1.0 for plain tensors and fully sharded ones)."""
    placements = getattr(param, "placements", None)
    mesh = getattr(param, "device_mesh", None)
    if placements is None or mesh is None:
        return 1.0
    replicas = 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            replicas *= mesh.size(dim)
    return 1.0 / replicas


# --------------------------------------------------------------------------------------------------------------
# Derived metrics (pure Python, from the sums)
# --------------------------------------------------------------------------------------------------------------
def _sqrt(x: float) -> float:
    # Sums of squares reconstructed from other sums can be a rounding error below zero.
    return math.sqrt(x) if x > 0.0 else 0.0


def _angle(n: float, b: float, e: float) -> float:
    """Angle between ``w_new`` and ``w_new + b`` from ``N=|w_new|^2``, ``B=|b|^2``, ``E=<w_new,b>``.

    ``atan2`` of the perpendicular and parallel parts keeps precision for the tiny angles of real training, where
    ``acos`` of a cosine close to 1 would lose it.
    """
    if n <= 0.0:
        return math.nan
    root_n = math.sqrt(n)
    perp = _sqrt(b - e * e / n)
    return math.atan2(perp, root_n + e / root_n)


#: Largest relative error of the reconstructed :math:`w_{old}` for which the metrics that need it are logged
#: (see :func:`w_old_reconstructible`).
W_OLD_MAX_RELATIVE_ERROR = 2.0**-6
_FLOAT64_EPS = float(torch.finfo(torch.float64).eps)


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
) -> dict[str, float]:
    r"""All metrics of one tensor or group from its sums (see the module docstring); NaN where undefined.

    ``sums`` holds ``N, B, E, S, G, F, numel, count``. For ``"adamw"``: :math:`c = 1/(1-\eta\lambda)`,
    :math:`\|w_{old}\|^2 = c^2 S`, :math:`\langle w_{old}, \eta u\rangle = c(E + B)`.

    ``rounding`` is the machine epsilon of the parameters. A reconstructed :math:`w_{old}` below the rounding
    noise of :math:`w_{new} + \eta u` (:math:`8\,` ``rounding`` :math:`(\|w_{new}\| + \|\eta u\|)`) is exactly
    zero (a zero-initialised bias before its first step), and the ratios to it are undefined rather than huge;
    that holds while :math:`|1-\eta\lambda| \ge 1/2` (dividing by it at most doubles the noise). Where
    :math:`w_{old}` cannot be reconstructed (:func:`w_old_reconstructible` is false, or :math:`w_{new} + \eta u`
    is below the noise with :math:`|1-\eta\lambda| < 1/2`), every metric that needs it is NaN: ``decay_norm``,
    ``decay_to_grad_ratio``, ``update_norm``, ``update_to_weight``, ``cos_grad_update_weight``,
    ``angular_update``; ``grad_update_norm``, ``weight_norm`` and the hyperparameter-only metrics stay.
    """
    n, b, e, s, g, f, numel = (float(v) for v in sums[:7])
    nan = math.nan
    out: dict[str, float] = {}
    root_n = _sqrt(n)
    root_b = _sqrt(b)
    below_noise = _sqrt(s) <= 8.0 * rounding * (root_n + root_b)
    if kind == "adamw":
        lr_wd = lr * weight_decay
        q = 1.0 - lr_wd  # the factor AdamW multiplied the weights by
        known = w_old_reconstructible(lr, weight_decay, rounding)
        if below_noise:
            if abs(q) >= 0.5:
                s = 0.0
            else:  # w_old = (noise) / q: not known to be small
                known = False
        out["grad_update_norm"] = root_b
        out["weight_norm"] = root_n
        if known:
            c = 1.0 / q
            a = c * c * s  # |w_old|^2
            d = c * (e + b) if s > 0.0 else 0.0  # <w_old, lr*u>
            root_a = _sqrt(a)
            decay = abs(lr_wd) * root_a
            update = _sqrt(lr_wd * lr_wd * a + 2.0 * lr_wd * d + b)
            out["decay_norm"] = decay
            out["decay_to_grad_ratio"] = decay / root_b if root_b > 0 else nan
            out["update_norm"] = update
            out["update_to_weight"] = update / root_a if root_a > 0 else nan
            # cosine between the gradient update (-lr*u) and the weight it was applied to (w_old)
            out["cos_grad_update_weight"] = -d / (root_a * root_b) if root_a > 0 and root_b > 0 else nan
            # w_new + lr*u = q * w_old points along w_old, or against it when q < 0 (lr * wd > 1)
            angle = _angle(n, b, e) if root_a > 0 else nan
            out["angular_update"] = math.pi - angle if q < 0.0 else angle
        if group_level:
            # the decay rate AdamW applies to every coordinate (Adam + L2 groups report their spread around it)
            out["uniform_decay_rate"] = lr_wd
        if weight_decay > 0.0 and lr > 0.0:
            if group_level:
                # Kosson et al. (2023), Table 1, AdamW: expected angular update in rotational equilibrium
                # sqrt(2*lr*wd*(1-beta1)/(1+beta1)) (= sqrt(2*lr*wd) without momentum).
                out["equilibrium_angular_update"] = math.sqrt(2.0 * lr_wd * (1.0 - beta1) / (1.0 + beta1))
            # ... and equilibrium norm sqrt(lr*C/(2*wd)), C = number of elements.
            out["equilibrium_weight_norm"] = math.sqrt(lr * numel / (2.0 * weight_decay))
            if group_level:
                # Wang & Aitchison (2024): AdamW's weights are an EMA over 1/(lr*wd) steps.
                out["ema_timescale_steps"] = 1.0 / lr_wd
                if steps_per_epoch:
                    out["ema_timescale_epochs"] = 1.0 / (lr_wd * steps_per_epoch)
    elif kind == "adam_l2":
        # Coupled L2: w_new = w_old - lr*u with the L2 term inside u, so w_old = w_new + b.
        s = 0.0 if below_noise else s
        a = s
        root_a = _sqrt(a)
        l2 = weight_decay * root_a
        total = _sqrt(g + 2.0 * weight_decay * f + weight_decay * weight_decay * a)  # |g + wd*w_old|
        out["l2_grad_share"] = l2 / total if total > 0 else nan
        out["update_norm"] = root_b
        out["weight_norm"] = root_n
        out["update_to_weight"] = root_b / root_a if root_a > 0 else nan
        out["angular_update"] = _angle(n, b, e) if root_a > 0 else nan
        if group_level:
            out["uniform_decay_rate"] = lr * weight_decay
    else:
        root_a = 0.0 if below_noise else _sqrt(s)
        out["update_norm"] = root_b
        out["weight_norm"] = root_n
        out["update_to_weight"] = root_b / root_a if root_a > 0 else nan
        out["angular_update"] = _angle(n, b, e) if root_a > 0 else nan
    return out


# --------------------------------------------------------------------------------------------------------------
# Device-side computation
# --------------------------------------------------------------------------------------------------------------
def _local(t: Tensor) -> Tensor:
    # DTensor -> its local shard (we reduce ourselves, so no implicit collectives); complex -> real view.
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        t = to_local()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.detach().reshape(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums of squares overflow/lose precision; compute those chunks in float32.
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32


def _host_to(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    # A blocking host->device copy waits for the device (and counts as a sync); small index/weight lists are
    # sent asynchronously instead.
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class _Item:
    row: int
    weight: float
    p: Tensor
    m: Tensor | None = None
    v: Tensor | None = None
    g: Tensor | None = None
    snap: Tensor | None = None
    step_size: float | Tensor = 0.0
    bc2_sqrt: float | Tensor = 1.0
    #: the optimizer state of an Adam parameter (its ``step`` is read again at every call)
    state: Mapping[str, Any] | None = None
    #: ``ndim`` of the parameter (``p`` is its flat local view)
    ndim: int = 1
    #: the parameter itself, whose ``.grad`` (a new tensor after each ``zero_grad``) coupled L2 needs
    param: Tensor | None = None


@dataclass
class _GroupWork:
    index: int
    label: str
    kind: Kind
    lr: float
    weight_decay: float
    beta1: float
    eps: float
    maximize: bool
    rows: list[int]
    names: list[str]
    numels: list[int]
    items: list[_Item]
    rounding: list[float] = field(default_factory=list)
    coupled_index: int = -1
    #: ``(step_size, bc2_sqrt)`` of all items as two vectors when they live on a device (capturable / fused)
    device_scalars: tuple[Tensor, Tensor] | None = None
    #: the optimizer state of each item (its ``step`` is read again at every call)
    states: list[Mapping[str, Any]] = field(default_factory=list)
    #: per-layer labels of the group's tensors (:func:`layer_labels`)
    keys: list[str] = field(default_factory=list)


def _bias_scalars(
    steps: list[Tensor], lr: float, beta1: float, beta2: float, float32_replay: bool = False
) -> tuple[list[float] | Tensor | list[Tensor], list[float] | Tensor | list[Tensor]]:
    """``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` per tensor, computed the way torch computed them: host
    floats, or (``step`` on a device) one vector each, or 0-d tensors when the steps are spread over devices."""
    if float32_replay:
        return _bias_scalars_capturable(steps, lr, beta1, beta2)
    t = _stacked_steps(steps) if steps else None
    if t is not None and t.device.type == "cpu":
        return _bias_scalars_host(steps, lr, beta1, beta2, t)
    return _bias_scalars_device(steps, lr, beta1, beta2, t)


def _stacked_steps(steps: list[Tensor]) -> Tensor | None:
    """All ``step`` tensors as one vector (one kernel) when they share a device, else ``None``.

    Called at every logged step with one tensor per parameter: nothing here touches the tensors one by one
    (``torch.stack`` itself checks devices and shapes)."""
    try:
        return torch.stack(steps).reshape(-1)  # 0-d steps (torch >= 2), or all of shape (1,)
    except RuntimeError:  # steps on several devices, or shapes that differ
        pass
    if any(s.device != steps[0].device for s in steps):
        return None
    return torch.stack([s.reshape(()) for s in steps])


def _bias_scalars_capturable(steps: list[Tensor], lr: float, beta1: float, beta2: float) -> tuple[Any, Any]:
    # Capturable Adam computes the corrections on the device in the dtype of `step` (float32), with these very
    # operations (the fused CUDA kernel gets the same float32 values). Replaying them matters: `1 - 0.999**1` in
    # float32 is off by 1e-5 relative, which shows in the first steps. Elementwise on the stacked steps, these
    # are the same float32 operations in a handful of kernels instead of several per tensor.
    if not steps:
        return [], []
    t = _stacked_steps(steps)
    if t is None:
        pairs = [_bias_scalars_capturable([s], lr, beta1, beta2) for s in steps]
        return [p[0][0] for p in pairs], [p[1][0] for p in pairs]
    step_size = -(((torch.pow(beta1, t) - 1) / lr).reciprocal())
    bc2 = torch.sqrt(-(torch.pow(beta2, t) - 1))
    return step_size, bc2


def _bias_scalars_host(
    steps: list[Tensor], lr: float, beta1: float, beta2: float, stacked: Tensor | None = None
) -> tuple[list[float], list[float]]:
    # Default (non-capturable) Adam keeps `step` on the CPU and computes these in Python floats; so do we.
    # Reading CPU tensors is no device sync. Steps are nearly always equal: each distinct one is computed once.
    if not steps:
        return [], []
    t = stacked if stacked is not None else _stacked_steps(steps)
    assert t is not None, "host steps share the CPU"
    values = t.to(torch.float64).tolist()
    corrections: dict[float, tuple[float, float]] = {}
    for t in set(values):
        # t == 0 only for a step a fused optimizer skipped (and undid); that split is discarded anyway
        corrections[t] = (lr / (1.0 - beta1**t) if t > 0 else math.nan, (1.0 - beta2**t) ** 0.5)
    if len(corrections) == 1:
        step_size, bc2 = corrections[values[0]]
        return [step_size] * len(values), [bc2] * len(values)
    return [corrections[t][0] for t in values], [corrections[t][1] for t in values]


def _bias_scalars_device(
    steps: list[Tensor], lr: float, beta1: float, beta2: float, stacked: Tensor | None = None
) -> tuple[Any, Any]:
    # `step` on an accelerator (e.g. a state moved there by hand): stay there (0-d tensors) instead of syncing.
    if not steps:
        return [], []
    t = stacked if stacked is not None else _stacked_steps(steps)
    if t is None:
        pairs = [_bias_scalars_device([s], lr, beta1, beta2) for s in steps]
        return [p[0][0] for p in pairs], [p[1][0] for p in pairs]
    t = t.to(torch.float64)
    step_size = lr / (1.0 - torch.pow(beta1, t))
    bc2 = torch.sqrt(1.0 - torch.pow(beta2, t))
    return step_size, bc2


def _slices(item: _Item, chunk: int) -> Iterator[_Item]:
    n = item.p.numel()
    if n <= chunk:
        yield item
        return
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)

        def cut(t: Tensor | None, start: int = start, stop: int = stop) -> Tensor | None:
            return None if t is None else t[start:stop]

        yield _Item(
            row=item.row,
            weight=item.weight,
            p=item.p[start:stop],
            m=cut(item.m),
            v=cut(item.v),
            g=cut(item.g),
            snap=cut(item.snap),
            step_size=item.step_size,
            bc2_sqrt=item.bc2_sqrt,
        )


def _buckets(items: list[_Item], chunk: int) -> Iterator[list[_Item]]:
    """Group slices by (device, dtype) into buckets of about ``chunk`` elements for the foreach kernels."""
    open_buckets: dict[tuple[torch.device, torch.dtype], tuple[list[_Item], int]] = {}
    for item in items:
        for piece in _slices(item, chunk):
            key = (piece.p.device, piece.p.dtype)
            bucket, size = open_buckets.get(key, ([], 0))
            bucket.append(piece)
            size += piece.p.numel()
            if size >= chunk:
                yield bucket
                bucket, size = [], 0
            open_buckets[key] = (bucket, size)
    for bucket, _ in open_buckets.values():
        if bucket:
            yield bucket


def _cast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return tensors if all(t.dtype == dtype for t in tensors) else [t.to(dtype) for t in tensors]


def _scalars_mul_(tensors: list[Tensor], scalars: list[float | Tensor]) -> None:
    if all(isinstance(s, float) for s in scalars):
        torch._foreach_mul_(tensors, scalars)  # type: ignore[arg-type]
    else:
        torch._foreach_mul_(
            tensors, [torch.as_tensor(s, device=t.device) for s, t in zip(scalars, tensors, strict=True)]
        )


def _scalars_div_(tensors: list[Tensor], scalars: list[float | Tensor]) -> None:
    if all(isinstance(s, float) for s in scalars):
        torch._foreach_div_(tensors, scalars)  # type: ignore[arg-type]
    else:
        torch._foreach_div_(
            tensors, [torch.as_tensor(s, device=t.device) for s, t in zip(scalars, tensors, strict=True)]
        )


def _denominators(bucket: list[_Item], dtype: torch.dtype, eps: float) -> list[Tensor]:
    """``sqrt(v) / sqrt(1 - beta2^t) + eps`` exactly as torch's Adam computes it (one new buffer per slice)."""
    denom = torch._foreach_sqrt(_cast([it.v for it in bucket], dtype))  # type: ignore[misc]
    _scalars_div_(denom, [it.bc2_sqrt for it in bucket])
    torch._foreach_add_(denom, eps)
    return denom


def _is_small(t: Tensor, acc: torch.dtype) -> bool:
    return t.dtype != acc and t.numel() <= _EXACT_NUMEL


def _sq_norms(tensors: list[Tensor], acc: torch.dtype) -> Tensor:
    """Squared norms. Small tensors are summed in float64 (a copy of at most ``_EXACT_NUMEL`` elements at a
    time): biases and gains are where an update nearly parallel to the weight makes ``B - E^2/N`` cancel, so
    their sums must be exact; large tensors use the fused kernel in the working dtype."""
    small = [i for i, t in enumerate(tensors) if _is_small(t, acc)]
    large = [i for i, t in enumerate(tensors) if not _is_small(t, acc)]
    norms: list[Tensor] = [torch.empty(0)] * len(tensors)
    if large:
        for i, n in zip(large, torch._foreach_norm([tensors[i] for i in large]), strict=True):
            norms[i] = n.to(acc)
    for i in small:
        norms[i] = torch.linalg.vector_norm(tensors[i].to(acc))
    return torch.stack(norms).square()


def _dots(a: list[Tensor], b: list[Tensor], acc: torch.dtype) -> Tensor:
    # torch.dot allocates nothing (a foreach mul + sum would need another chunk-sized buffer); small tensors are
    # upcast first for exact sums, as in _sq_norms.
    return torch.stack(
        [
            torch.dot(x.to(acc), y.to(acc)) if _is_small(x, acc) else torch.dot(x, y).to(acc)
            for x, y in zip(a, b, strict=True)
        ]
    )


class _Accumulator:
    """Per-device tables of sums, moved to one device and fetched with one transfer at the end."""

    def __init__(self, num_rows: int, num_coupled: int) -> None:
        self.num_rows = num_rows
        self.num_coupled = num_coupled
        self.tables: dict[torch.device, Tensor] = {}
        self.minmax: dict[torch.device, Tensor] = {}  # (-min, max) per coupled group: one MAX all-reduce

    def table(self, device: torch.device) -> Tensor:
        if device not in self.tables:
            self.tables[device] = torch.zeros(self.num_rows, _K, dtype=_acc_dtype(device), device=device)
        return self.tables[device]

    def minmax_table(self, device: torch.device) -> Tensor:
        if device not in self.minmax:
            self.minmax[device] = torch.full(
                (max(self.num_coupled, 1), 2), -math.inf, dtype=_acc_dtype(device), device=device
            )
        return self.minmax[device]

    def add_rows(self, device: torch.device, rows: list[int], block: Tensor) -> None:
        table = self.table(device)
        index = _host_to(rows, torch.int64, device)
        table.index_add_(0, index, block.to(table.dtype))


def _main_device(works: list[_GroupWork]) -> torch.device:
    for w in works:
        for it in w.items:
            return it.p.device
    return torch.device("cpu")


def _process_bucket(
    work: _GroupWork, bucket: list[_Item], acc: _Accumulator, grad_scale: Tensor | None
) -> None:
    device = bucket[0].p.device
    dtype = _compute_dtype(bucket[0].p.dtype)
    adt = _acc_dtype(device)
    params = _cast([it.p for it in bucket], dtype)
    zeros = torch.zeros(len(bucket), dtype=adt, device=device)
    col_g = col_f = zeros
    if work.kind == "generic":
        # b = w_old - w_new computed in the snapshot buffer we own.
        buf = [it.snap.to(dtype, copy=True) if it.snap.dtype != dtype else it.snap for it in bucket]  # type: ignore[union-attr]
        col_s = _sq_norms(buf, adt)
        torch._foreach_sub_(buf, params)
    else:
        buf = _denominators(bucket, dtype, work.eps)
        if work.kind == "adam_l2":
            nonempty = [d for d in buf if d.numel() > 0]
            if nonempty:
                mins = torch.stack([d.amin() for d in nonempty]).to(adt)
                maxs = torch.stack([d.amax() for d in nonempty]).to(adt)
                mm = acc.minmax_table(device)[work.coupled_index]
                mm[0] = torch.maximum(mm[0], (-mins).max())
                mm[1] = torch.maximum(mm[1], maxs.max())
        # lr*u = (lr / bc1) * m / denom, the quantity torch's addcdiv subtracted; built in the same buffer.
        torch._foreach_reciprocal_(buf)
        torch._foreach_mul_(buf, _cast([it.m for it in bucket], dtype))  # type: ignore[misc]
        _scalars_mul_(buf, [it.step_size for it in bucket])
    col_n = _sq_norms(params, adt)
    col_b = _sq_norms(buf, adt)
    col_e = _dots(params, buf, adt)
    grads: list[Tensor] = []
    if work.kind == "adam_l2":
        grads = _cast([it.g for it in bucket], dtype)  # type: ignore[misc]
        col_g = _sq_norms(grads, adt)
    if work.kind != "generic":
        torch._foreach_add_(buf, params)  # now w_new + b, i.e. w_old * (1 - lr*wd)
        col_s = _sq_norms(buf, adt)
    if work.kind == "adam_l2":
        col_f = _dots(grads, buf, adt)
        if work.maximize:  # torch negates the gradient before adding the L2 term
            col_f = -col_f
        if grad_scale is not None:  # fused Adam + GradScaler: p.grad is still scaled
            inv = 1.0 / grad_scale.to(device=device, dtype=adt)
            col_g = col_g * inv * inv
            col_f = col_f * inv
    del buf
    numel = _host_to([float(it.p.numel()) for it in bucket], adt, device)
    count = torch.zeros_like(numel)
    weights = [it.weight for it in bucket]
    block = torch.stack([col_n, col_b, col_e, col_s, col_g, col_f, numel, count], dim=1)
    if any(w != 1.0 for w in weights):
        block = block * _host_to(weights, adt, device).unsqueeze(1)
    acc.add_rows(device, [it.row for it in bucket], block)


def _count_rows(works: list[_GroupWork], acc: _Accumulator, skip: set[int]) -> None:
    # A tensor counts as updated once even when split in slices (weights make replicated shards sum to one).
    for w in works:
        if w.index in skip:
            continue  # the packed path wrote its counts with its sums
        by_device: dict[torch.device, tuple[list[int], list[float]]] = {}
        for it in w.items:
            rows, weights = by_device.setdefault(it.p.device, ([], []))
            rows.append(it.row)
            weights.append(it.weight)
        for device, (rows, weights) in by_device.items():
            table = acc.table(device)
            table[:, _COUNT].index_add_(
                0, _host_to(rows, torch.int64, device), _host_to(weights, table.dtype, device)
            )


def _median_denominators(
    works: list[_GroupWork],
    chunk: int,
    lo: Tensor,
    hi: Tensor,
    device: torch.device,
    reduce: ShardReduce | None,
) -> Tensor:
    """Median of the coupled groups' denominators by iterative histogram refinement in log space.

    Each pass bins ``log(denom)`` of every coordinate into ``_HIST_BINS`` bins between ``lo`` and ``hi`` (device
    tensors, no host sync), finds the bin that holds the wanted rank and narrows ``[lo, hi]`` to it. Three passes
    of 1024 bins narrow the range by 1e9, i.e. to float rounding, with memory bounded by one chunk and counts that
    can be summed across shards. The rank is the one ``torch.median`` returns for the decay *rates*
    ``lr*wd/denom`` (lower median of rates = upper median of denominators).
    """
    coupled = [w for w in works if w.kind == "adam_l2"]
    num = len(coupled)
    adt = lo.dtype
    lo = lo.clone()
    hi = hi.clone()
    for _ in range(_HIST_PASSES):
        counts = torch.zeros(num, _HIST_BINS + 2, dtype=adt, device=device)
        width = (hi - lo).clamp_min(1e-300) / _HIST_BINS
        for w in coupled:
            ci = w.coupled_index
            for bucket in _buckets(w.items, chunk):
                dtype = _compute_dtype(bucket[0].p.dtype)
                bdev = bucket[0].p.device
                lo_d, width_d = lo[ci].to(bdev), width[ci].to(bdev)
                denoms = _denominators(bucket, dtype, w.eps)
                row = torch.zeros(_HIST_BINS + 2, dtype=adt, device=bdev)
                for it, x in zip(bucket, denoms, strict=True):
                    if x.numel() == 0:
                        continue
                    # In place on the chunk buffer: bin = floor((log d - lo) / width) in [-1, B], shifted by one
                    # so that 0 counts "below lo" and B+1 "above hi"; NaN goes above (and shows in min/max).
                    x.log_().nan_to_num_(nan=math.inf).sub_(lo_d).div_(width_d).floor_().clamp_(
                        -1, _HIST_BINS
                    )
                    idx = x.add_(1).long()
                    src = torch.full((), it.weight, dtype=adt, device=bdev).expand(idx.numel())
                    row.scatter_add_(0, idx, src)
                    del idx
                counts[ci] += row.to(device)
                del denoms
        if reduce is not None:
            reduce.all_reduce(counts, "sum")
        total = counts.sum(dim=1)
        rank = (total - 1.0) - torch.floor((total - 1.0) / 2.0)
        cum = counts.cumsum(dim=1)
        # first position whose cumulative count exceeds the rank; position 0 is "below lo"
        pos = (cum <= rank.unsqueeze(1)).sum(dim=1)
        b = (pos - 1).clamp(0, _HIST_BINS - 1).to(adt)
        lo = lo + b * width
        hi = lo + width
    return torch.exp((lo + hi) / 2.0)


def _build_works(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
) -> tuple[list[_GroupWork], int]:
    """Which tensors take part, with their rows and names; the per-step scalars come from :func:`_set_scalars`."""
    works: list[_GroupWork] = []
    labels = group_labels(param_groups)
    keys = layer_labels(param_groups)
    row = 0
    coupled = 0
    for gi, group in enumerate(param_groups):
        kind = group_kind(group, adam_family)
        work = _GroupWork(
            index=gi,
            label=labels[gi],
            kind=kind,
            lr=0.0,
            weight_decay=0.0,
            beta1=0.0,
            eps=0.0,
            maximize=False,
            rows=[],
            names=param_labels(group, gi, label=labels[gi]),
            numels=[],
            items=[],
            keys=keys[gi],
        )
        if kind == "adam_l2":
            work.coupled_index = coupled
            coupled += 1
        for p in group["params"]:
            work.rows.append(row)
            work.numels.append(int(p.numel()))
            work.rounding.append(float(torch.finfo(p.dtype).eps) if p.dtype.is_floating_point else 0.0)
            weight = reduce.weight(p) if reduce is not None else 1.0
            if kind == "generic":
                # optimizers skip parameters without a gradient too; compare with the snapshot only the others
                snap = None if snapshot is None or p.grad is None else snapshot.get(p)
                if snap is not None:
                    work.items.append(_Item(row=row, weight=weight, p=_local(p), snap=_local(snap)))
            elif p.grad is not None:
                # Adam skips parameters without a gradient: they were not updated by this step.
                st = state.get(p, {})
                if "exp_avg" in st and "step" in st:
                    v = st["max_exp_avg_sq"] if group.get("amsgrad", False) else st["exp_avg_sq"]
                    work.items.append(
                        _Item(
                            row=row,
                            weight=weight,
                            p=_local(p),
                            m=_local(st["exp_avg"]),
                            v=_local(v),
                            g=_local(p.grad) if kind == "adam_l2" else None,
                            state=st,
                            ndim=p.dim(),
                            param=p,
                        )
                    )
            row += 1
        work.states = [it.state for it in work.items if it.state is not None]
        works.append(work)
    return works, row


def _set_scalars(works: list[_GroupWork], param_groups: Sequence[Mapping[str, Any]]) -> None:
    """This step's learning rate, decay, betas and per-tensor bias corrections (they change every step)."""
    for work in works:
        group = param_groups[work.index]
        work.lr = _scalar(group.get("lr", 0.0))
        work.weight_decay = _scalar(group.get("weight_decay", 0.0))
        betas = group.get("betas", (0.0, 0.0))
        work.beta1, beta2 = _scalar(betas[0]), _scalar(betas[1])
        work.eps = _scalar(group.get("eps", 0.0))
        work.maximize = bool(group.get("maximize", False))
        if work.kind == "generic" or not work.items:
            continue
        if work.kind == "adam_l2":
            for item in work.items:
                item.g = _local(item.param.grad)  # type: ignore[union-attr,arg-type]
        steps = list(map(_STEP, work.states))
        if not set(map(type, steps)) <= _PLAIN_TYPES:  # Python numbers (an old checkpoint): as tensors
            steps = [s if isinstance(s, Tensor) else torch.tensor(float(s)) for s in steps]
        # capturable Adam, and the fused CUDA kernel, compute the bias corrections from the float32 `step` in
        # float32 (measured: fused CUDA AdamW's first step is 6.4e-6 smaller than with float64 corrections);
        # the CPU fused kernel and the default implementations use float64.
        # (a fused optimizer keeps all its state on one device type: the first step tells)
        float32_replay = bool(group.get("capturable", False)) or (
            bool(group.get("fused", False)) and steps[0].device.type != "cpu"
        )
        step_sizes, bc2 = _bias_scalars(steps, work.lr, work.beta1, beta2, float32_replay)
        if isinstance(step_sizes, Tensor) and isinstance(bc2, Tensor):
            work.device_scalars = (step_sizes, bc2)
            if work.kind == "adamw":
                continue  # the packed path reads the vectors; no 0-d tensor per item
            step_sizes, bc2 = list(step_sizes.unbind(0)), list(bc2.unbind(0))
        else:
            work.device_scalars = None
        for item, ss, b2 in zip(work.items, step_sizes, bc2, strict=True):
            item.step_size = ss
            item.bc2_sqrt = b2


def _item_scalars(work: _GroupWork) -> tuple[list[Any], list[Any]]:
    """``(step_size, bc2_sqrt)`` of every item of ``work`` as lists (0-d tensors where they are on a device)."""
    if work.device_scalars is not None and work.kind == "adamw":
        return list(work.device_scalars[0].unbind(0)), list(work.device_scalars[1].unbind(0))
    return [it.step_size for it in work.items], [it.bc2_sqrt for it in work.items]


def _collect_works(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
) -> tuple[list[_GroupWork], int]:
    works, rows = _build_works(param_groups, state, adam_family, snapshot, reduce)
    _set_scalars(works, param_groups)
    return works, rows


def _data_ptr(t: Tensor) -> int:
    # a DTensor's own data_ptr is not its shard's; FSDP1 swaps `param.data`, which changes the pointer
    return getattr(t, "_local_tensor", t).data_ptr()


def _signature(
    param_groups: Sequence[Mapping[str, Any]], state: Mapping[Tensor, Mapping[str, Any]], adam_family: bool
) -> tuple[Any, ...] | None:
    """What a cached plan depends on: which tensors, where their memory is, which state tensors; ``None`` when
    nothing may be cached (snapshot-based groups). Called at every logged step, so it only reads ids."""
    sig: list[Any] = []
    for group in param_groups:
        kind = group_kind(group, adam_family)
        if kind == "generic":
            return None
        amsgrad = bool(group.get("amsgrad", False))
        v_key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        sig.append((kind, amsgrad, len(group["params"]), group.get("name"), id(group.get("param_names"))))
        fast = _group_signature(group["params"], state, v_key)
        if fast is not None:
            sig.append(fast)
            continue
        for p in group["params"]:
            st = state.get(p)
            if p.grad is None or not st or "exp_avg" not in st or "step" not in st:
                sig.append(id(p))
            else:
                m, v = st["exp_avg"], st[v_key]
                sig.append((id(p), _data_ptr(p), id(st), id(m), id(v), _data_ptr(m), _data_ptr(v)))
    return tuple(sig)


_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
_GRAD = operator.attrgetter("grad")
_EXP_AVG = operator.itemgetter("exp_avg")
_STEP = operator.itemgetter("step")


def _group_signature(
    params: Sequence[Tensor], state: Mapping[Tensor, Mapping[str, Any]], v_key: str
) -> tuple[Any, ...] | None:
    """The signature of a group of plain tensors that all have Adam state, in C-level passes over the group
    (``map``, no Python loop per parameter); ``None`` when some are not (DTensors, parameters never stepped),
    and the caller goes parameter by parameter."""
    if not set(map(type, params)) <= _PLAIN_TYPES:
        return None
    states = list(map(state.get, params))
    try:
        sig = (
            tuple(map(id, params)),
            tuple(map(Tensor.data_ptr, params)),
            tuple(map(operator.is_not, map(_GRAD, params), repeat(None))),  # which have a gradient
            tuple(map(id, states)),
            tuple(map(id, map(_EXP_AVG, states))),
            tuple(map(id, map(operator.itemgetter(v_key), states))),
            # (the fused kernel reads raw pointers: a state tensor whose storage was swapped must rebuild)
            tuple(map(Tensor.data_ptr, map(_EXP_AVG, states))),
            tuple(map(Tensor.data_ptr, map(operator.itemgetter(v_key), states))),
        )
        deque(map(_STEP, states), maxlen=0)  # every one has a step
    except (TypeError, KeyError):  # a state that is None or lacks a key
        return None
    return sig


def _contiguous(works: list[_GroupWork], param_groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every tensor of the plan is contiguous: ``reshape(-1)`` copies the others, and a cached copy would
    go stale (checked when a plan is built; the signature's data pointers and state ids cover later swaps)."""
    for w in works:
        group = param_groups[w.index]
        v_key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        for it in w.items:
            st = it.state or {}
            tensors = [it.param, st.get("exp_avg"), st.get(v_key)]
            if not all(getattr(t, "_local_tensor", t).is_contiguous() for t in tensors if t is not None):
                return False
    return True


@dataclass
class _Plan:
    """What :func:`_split_from_groups` may reuse from one step to the next for the same optimizer."""

    signature: tuple[Any, ...]
    reduce: ShardReduce | None
    chunk_numel: int | None
    works: list[_GroupWork]
    num_rows: int
    #: the AdamW groups' items, all groups together, and their packed layout
    packed: _Packed | None
    #: whether the fused kernel was on (``LIGHTNING_ADAMW_TRITON``, or switched off after a failure)
    fused_on: tuple[bool, bool] = (False, False)


def _fused_on(allowed: bool = True) -> tuple[bool, bool]:
    if not allowed:
        return False, False
    return fused_available(torch.device("cuda")), fused_available(torch.device("cpu"))


#: Plans of the optimizers seen by :func:`update_split`, dropped with the optimizer.
_PLANS: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()
#: The same for calls that turned the fused kernel off (``update_split(..., triton=False)``).
_PLANS_TORCH: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()


def _packed_chunk(items: list[_Item], chunk_numel: int | None) -> int:
    if chunk_numel is not None:
        return max(1, int(chunk_numel))
    # Two float32 scratch buffers of `chunk` elements: 1/16 of the parameters' bytes in all, but at least 1 MiB
    # each (fewer, larger kernels for a small model, whose extra megabytes do not matter).
    total = sum(it.p.numel() * it.p.element_size() for it in items)
    return int(min(max(total // 128, _PACKED_MIN_CHUNK), _MAX_AUTO_CHUNK))


@dataclass
class _Packed:
    """All AdamW items of an optimizer (every decoupled group) laid out together for :mod:`packed_sums`."""

    works: list[_GroupWork]
    items: list[_Item]
    buckets: list[PackedBucket]
    #: tensors summed by the fused Triton kernel (CUDA), by device and dtypes
    fused: list[FusedGroup]
    chunk: int
    #: the devices of the items
    devices: list[torch.device]
    #: per device: row of each item, the constant columns of the table (numel, count), -, replica weights
    static: dict[torch.device, tuple[Tensor, Tensor, None, Tensor | None]] = field(default_factory=dict)

    @property
    def indices(self) -> set[int]:
        return {w.index for w in self.works}


def _packed_layout(works: list[_GroupWork], chunk_numel: int | None, triton: bool = True) -> _Packed | None:
    adamw = [w for w in works if w.kind == "adamw" and w.items]
    if not adamw:
        return None
    items = [it for w in adamw for it in w.items]
    chunk = _packed_chunk(items, chunk_numel)
    # 1-D tensors get float64 products (see packed_sums); measured: float64 throughout is twice as slow on the
    # CPU even for a small model, so the others stay in their own float32 buckets.
    sources = [
        PieceSource(item=j, p=it.p, m=it.m, v=it.v, exact=it.ndim <= 1, row=it.row, weight=it.weight)  # type: ignore[arg-type]
        for j, it in enumerate(items)
    ]
    # on a GPU (Triton installed) the fused kernel reads each tensor once; see triton_sums
    fused = [triton and fused_available(s.p.device) and fused_supported(s) for s in sources]
    fusable = [s for s, f in zip(sources, fused, strict=True) if f]
    rest = [s for s, f in zip(sources, fused, strict=True) if not f]
    return _Packed(
        works=adamw,
        items=items,
        buckets=build_layout(rest, chunk),
        fused=build_fused_layout(fusable),
        chunk=chunk,
        devices=list(dict.fromkeys(it.p.device for it in items)),
    )


def _plan(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
    chunk_numel: int | None,
    cache_key: Any,
    triton: bool = True,
) -> _Plan:
    """The cached plan of ``cache_key`` (an optimizer) when nothing it depends on changed, else a new one."""
    signature = _signature(param_groups, state, adam_family) if snapshot is None else None
    plans = _PLANS if triton else _PLANS_TORCH
    cached = plans.get(cache_key) if cache_key is not None and signature is not None else None
    fused_on = _fused_on(triton)
    if (
        cached is not None
        and cached.signature == signature
        and cached.reduce is reduce
        and cached.chunk_numel == chunk_numel
        and cached.fused_on == fused_on
    ):
        _set_scalars(cached.works, param_groups)
        return cached
    works, num_rows = _collect_works(param_groups, state, adam_family, snapshot, reduce)
    plan = _Plan(
        signature=signature or (),
        reduce=reduce,
        chunk_numel=chunk_numel,
        works=works,
        num_rows=num_rows,
        packed=_packed_layout(works, chunk_numel, triton),
        fused_on=fused_on,
    )
    if cache_key is not None and signature is not None and _contiguous(works, param_groups):
        plans[cache_key] = plan
    return plan


def _item_vector(values: list[float | Tensor], device: torch.device) -> Tensor:
    """Per-item scalars as one float64 vector on ``device`` (float32 on MPS): host floats are sent in one copy,
    device scalars stacked in one kernel."""
    dtype = _acc_dtype(device)
    if all(isinstance(v, float) for v in values):
        return _host_to(values, dtype, device)
    if len(values) == 1 and isinstance(values[0], Tensor) and values[0].dim() == 1:  # already the vector
        return values[0].to(device=device, dtype=dtype)
    return torch.stack([torch.as_tensor(v, device=device).to(dtype) for v in values])


def _process_packed(packed: _Packed, acc: _Accumulator, num_rows: int) -> None:
    """Sums of all AdamW groups: the fused kernel of :mod:`lightning_adamw.triton_sums` where it runs (CUDA),
    else the torch kernels of :mod:`lightning_adamw.packed_sums`."""
    items = packed.items
    # eta*u = s * m / (sqrt(v) + c*eps) with c = sqrt(1 - beta2^t), s = lr / (1 - beta1^t) * c
    eps_scaled: list[Any]
    scale: list[Any]
    if all(w.device_scalars is not None for w in packed.works):  # a few kernels on vectors, none per tensor
        vectors = [w.device_scalars for w in packed.works]
        bc2_vec = torch.cat([v[1] for v in vectors])  # type: ignore[index]
        eps_vec = torch.cat([v[1] * w.eps for v, w in zip(vectors, packed.works, strict=True)])  # type: ignore[index]
        eps_scaled, scale = [eps_vec], [torch.cat([v[0] for v in vectors]) * bc2_vec]  # type: ignore[index]
    else:  # steps on the host (the default), or vectors of some groups mixed with floats of others
        eps_scaled, scale = [], []
        for w in packed.works:
            step_sizes, bc2 = _item_scalars(w)
            eps_scaled += [b * w.eps for b in bc2]
            scale += [ss * b for ss, b in zip(step_sizes, bc2, strict=True)]
    eps_common, scale_common = _uniform_float(eps_scaled), _uniform_float(scale)

    # Each device's table starts from the plan's constant columns (numel, count); the sums are added to it.
    for device in packed.devices:
        base = _packed_base(packed, device, num_rows)
        if device in acc.tables:
            acc.tables[device] += base
        else:
            acc.tables[device] = base.clone()

    vectors_on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def fused_scalars(dev: torch.device) -> tuple[Tensor, Tensor]:
        if dev not in vectors_on:
            if eps_common is not None and scale_common is not None:
                both = shared_scalars(eps_common, scale_common, dev)
                vectors_on[dev] = (both[0:1], both[1:2])
            else:
                vectors_on[dev] = (_item_vector(eps_scaled, dev), _item_vector(scale, dev))
        return vectors_on[dev]

    for group in list(packed.fused):
        try:
            fused_table_sums(group, *fused_scalars(group.device), table=acc.table(group.device))
        except Exception as err:  # a Triton that cannot compile or launch here: the torch path, for good
            disable(repr(err))
            warnings.warn(
                f"WeightDecayMonitor: the fused Triton kernel failed ({err!r}); using the slower torch path",
                RuntimeWarning,
                stacklevel=2,
            )
            packed.fused.remove(group)
            packed.buckets.extend(build_layout(group.sources, packed.chunk))

    per_device: dict[torch.device, tuple[Tensor, Tensor | float, Tensor | float]] = {}
    for bucket in packed.buckets:
        dev = bucket.device
        if dev not in per_device:
            per_device[dev] = (
                torch.zeros(len(items), 4, dtype=_acc_dtype(dev), device=dev),
                eps_common if eps_common is not None else _item_vector(eps_scaled, dev),
                scale_common if scale_common is not None else _item_vector(scale, dev),
            )
        out, eps_arg, scale_arg = per_device[dev]
        adamw_item_sums(bucket, eps_arg, scale_arg, out)
    for dev, (out, _, scale_arg) in per_device.items():
        rows, weight = packed.static[dev][0], packed.static[dev][3]
        block = torch.stack(
            [out[:, 3], out[:, 0] * scale_arg * scale_arg, out[:, 1] * scale_arg, out[:, 2]], 1
        )
        if weight is not None:
            block = block * weight
        acc.table(dev)[:, :4].index_add_(0, rows, block)


def _packed_base(packed: _Packed, device: torch.device, num_rows: int) -> Tensor:
    """The plan's constant columns for the items on ``device``: numel and count (times replica weights), and the
    per-device index and weights the torch path needs. Built once per plan and device."""
    if device not in packed.static:
        items = packed.items
        adt = _acc_dtype(device)
        # items of other devices (a model split over devices) get zero rows here
        here = [1.0 if it.p.device == device else 0.0 for it in items]
        weights = [it.weight for it in items]
        rows = _host_to([it.row for it in items], torch.int64, device)
        weight = _host_to(weights, adt, device).unsqueeze(1) if any(w != 1.0 for w in weights) else None
        columns = torch.tensor(
            [[float(it.p.numel()) * h * wt, h * wt] for it, h, wt in zip(items, here, weights, strict=True)],
            dtype=adt,
        )
        base = torch.zeros(num_rows, _K, dtype=adt)
        base[:, _NUMEL : _COUNT + 1].index_add_(0, torch.tensor([it.row for it in items]), columns)
        packed.static[device] = (
            rows,
            base if device.type == "cpu" else base.to(device, non_blocking=True),
            None,
            weight,
        )
    return packed.static[device][1]


def _uniform_float(values: list[Any]) -> float | None:
    """The common value of a list of host floats, else ``None`` (steps differ, or scalars on a device)."""
    if not values or set(map(type, values)) != {float} or values.count(values[0]) != len(values):
        return None
    return values[0]


def _auto_chunk(works: list[_GroupWork], chunk_numel: int | None) -> int:
    if chunk_numel is not None:
        return max(1, int(chunk_numel))
    total = sum(it.p.numel() for w in works for it in w.items)
    # about 1/16 of the parameters at a time, so the extra buffer stays a small fraction of the model
    return int(min(max(total // 16, _MIN_AUTO_CHUNK), _MAX_AUTO_CHUNK))


def _split_from_groups(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None = None,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    cache_key: Any = None,
    triton: bool = True,
) -> UpdateSplit:
    with torch.no_grad():
        plan = _plan(param_groups, state, adam_family, snapshot, reduce, chunk_numel, cache_key, triton)
        works, num_rows = plan.works, plan.num_rows
        num_coupled = sum(1 for w in works if w.kind == "adam_l2")
        acc = _Accumulator(num_rows, num_coupled)
        main = _main_device(works)
        packed = plan.packed.indices if plan.packed is not None else set()
        if plan.packed is not None:
            _process_packed(plan.packed, acc, num_rows)
        others = [w for w in works if w.index not in packed]
        chunk = _auto_chunk(others, chunk_numel) if others else 0
        for w in others:
            for bucket in _buckets(w.items, chunk):
                _process_bucket(w, bucket, acc, grad_scale)
        _count_rows(works, acc, packed)
        adt = _acc_dtype(main)
        only = acc.tables.get(main) if len(acc.tables) == 1 else None
        if only is not None and only.dtype == adt:
            table = only  # one device: its table is the result (no copy)
        else:
            table = torch.zeros(num_rows, _K, dtype=adt, device=main)
            for t in acc.tables.values():
                table += t.to(main)
        extras: list[Tensor] = []
        if num_coupled:
            minmax = torch.full((num_coupled, 2), -math.inf, dtype=adt, device=main)
            for mm in acc.minmax.values():
                minmax = torch.maximum(minmax, mm[:num_coupled].to(main))
            if reduce is not None:
                reduce.all_reduce(minmax, "max")
            lo = torch.log(-minmax[:, 0])
            hi = torch.log(minmax[:, 1])
            median = _median_denominators(works, chunk, lo, hi, main, reduce)
            extras += [(-minmax[:, 0]), minmax[:, 1], median]
        if reduce is not None:
            reduce.all_reduce(table, "sum")
        parts = [table.reshape(-1), *extras]
        if found_inf is not None:  # a fused optimizer's skipped-step flag (GradScaler)
            parts.append(found_inf.detach().reshape(1).to(device=main, dtype=adt))
        # The one device -> host transfer of the whole computation.
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().tolist()

    if found_inf is not None and host[-1] > 0:
        return UpdateSplit(groups=[], skipped=True)
    rows = [host[i * _K : (i + 1) * _K] for i in range(num_rows)]
    offset = num_rows * _K
    dmin = host[offset : offset + num_coupled]
    dmax = host[offset + num_coupled : offset + 2 * num_coupled]
    dmed = host[offset + 2 * num_coupled : offset + 3 * num_coupled]
    groups: list[GroupSplit] = []
    for w in works:
        # positions (in the group) of the tensors this step updated (no gradient / no snapshot: not updated)
        live_pos = [i for i, r in enumerate(w.rows) if rows[r][_COUNT] > 0.0]
        if not live_pos:
            continue
        live = [rows[w.rows[i]] for i in live_pos]
        finite_flags = [math.isfinite(sum(sums)) for sums in live]  # a NaN or inf anywhere makes the sum so
        group_finite = all(finite_flags)
        group_rounding = max(w.rounding[i] for i in live_pos)
        tensors = _TensorSplits(w, live_pos, live, finite_flags)
        totals = [sum(column) for column in zip(*live, strict=True)]
        metrics: dict[str, float] = {}
        w_old_known = True
        if group_finite:
            raw = derive_metrics(
                w.kind,
                totals,
                lr=w.lr,
                weight_decay=w.weight_decay,
                beta1=w.beta1,
                steps_per_epoch=steps_per_epoch,
                group_level=True,
                rounding=group_rounding,
            )
            if w.kind == "adam_l2":
                ci = w.coupled_index
                lr_wd = w.lr * w.weight_decay
                if dmax[ci] > 0:
                    raw["eff_decay_rate_min"] = lr_wd / dmax[ci]
                if dmin[ci] > 0:
                    raw["eff_decay_rate_max"] = lr_wd / dmin[ci]
                if dmed[ci] > 0:
                    raw["eff_decay_rate_median"] = lr_wd / dmed[ci]
                group_finite = all(math.isfinite(x) for x in (dmin[ci], dmax[ci], dmed[ci]))
            metrics = {k: v for k, v in raw.items() if math.isfinite(v)} if group_finite else {}
            # (decay_norm is finite whenever w_old was reconstructed, and left out only when it was not)
            w_old_known = w.kind != "adamw" or not group_finite or "decay_norm" in raw
        groups.append(
            GroupSplit(
                name=w.label,
                kind=w.kind,
                lr=w.lr,
                weight_decay=w.weight_decay,
                numel=round(totals[_NUMEL]),
                num_tensors=len(live_pos),
                metrics=metrics,
                tensors=tensors,
                finite=group_finite,
                w_old_known=w_old_known,
            )
        )
    return UpdateSplit(groups=groups)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def update_split(
    optimizer: torch.optim.Optimizer,
    *,
    snapshot: Mapping[Tensor, Tensor] | None = None,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
    triton: bool = True,
) -> UpdateSplit:
    """Split the step ``optimizer`` has just taken; call it right after ``optimizer.step()``.

    ``torch.optim.Adam``/``AdamW`` groups are reconstructed from the optimizer state (no copy of any parameter).
    Other optimizers need ``snapshot`` (from :func:`take_snapshot` just before the step); without it their groups
    are left out. A fused optimizer's skipped step (``GradScaler`` overflow, seen through ``optimizer.found_inf``)
    returns ``UpdateSplit(skipped=True)``.

    On a CUDA device with Triton installed, AdamW groups are summed by one fused kernel
    (:mod:`lightning_adamw.triton_sums`); ``triton=False`` (or ``LIGHTNING_ADAMW_TRITON=0``) uses the torch path.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> split = update_split(opt)
        >>> sorted(split.metrics())[:3]
        ['adamw/group0/angular_update', 'adamw/group0/cos_grad_update_weight', 'adamw/group0/decay_norm']
    """
    return _split_from_groups(
        optimizer.param_groups,
        optimizer.state,
        adam_family=is_adam_family(optimizer),
        snapshot=snapshot,
        steps_per_epoch=steps_per_epoch,
        chunk_numel=chunk_numel,
        reduce=reduce,
        found_inf=getattr(optimizer, "found_inf", None),
        grad_scale=getattr(optimizer, "grad_scale", None),
        cache_key=optimizer,
        triton=triton,
    )


def adamw_update_split(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    per_layer: bool = False,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
) -> dict[str, float]:
    """Metrics of an Adam/AdamW step from its ``param_groups`` and ``state`` (post-step), as a flat dict.

    Groups with decoupled decay (or ``weight_decay == 0``) give ``adamw/<group>/<metric>``; groups of
    ``torch.optim.Adam`` with coupled L2 give the ``adam_l2/<group>/<metric>`` statistics.
    """
    split = _split_from_groups(
        param_groups,
        state,
        adam_family=True,
        steps_per_epoch=steps_per_epoch,
        chunk_numel=chunk_numel,
        reduce=reduce,
    )
    return split.metrics(per_layer=per_layer)


def take_snapshot(
    params: Iterable[Tensor] | torch.optim.Optimizer, *, only_local: bool = True
) -> dict[Tensor, Tensor]:
    """Copies of the parameters (the local shard of a DTensor), for the generic fallback.

    This costs one copy of the parameters, so the monitor takes it only on logging steps and frees it right after
    the step (see :class:`~lightning_adamw.monitor.WeightDecayMonitor`).
    """
    if isinstance(params, torch.optim.Optimizer):
        params = [p for g in params.param_groups for p in g["params"]]
    out: dict[Tensor, Tensor] = {}
    with torch.no_grad():
        for p in params:
            local = p.to_local() if (only_local and hasattr(p, "to_local")) else p
            out[p] = local.detach().clone()
    return out


def generic_update_split(
    optimizer: torch.optim.Optimizer,
    snapshot: Mapping[Tensor, Tensor],
    *,
    per_layer: bool = False,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
) -> dict[str, float]:
    """Weight norm, update norm, update-to-weight ratio and angular update of any optimizer's last step.

    ``snapshot`` holds the weights before the step (:func:`take_snapshot`). The snapshot buffers are used as
    scratch space and hold garbage afterwards.
    """
    split = _split_from_groups(
        optimizer.param_groups,
        optimizer.state,
        adam_family=False,
        snapshot=snapshot,
        chunk_numel=chunk_numel,
        reduce=reduce,
    )
    return split.metrics(per_layer=per_layer)
