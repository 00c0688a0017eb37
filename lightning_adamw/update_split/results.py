r"""Stage 4: the result types, assembled from the sums table fetched to the host.

A group's metrics come from the sum of its updated tensors' rows (a group's norm is the norm of all its tensors
together: squared norms and dot products are added before any root is taken); a tensor's from its own row, derived
only when first read (group-level logging never pays for per-tensor dictionaries). Formulas:
:mod:`~lightning_adamw.update_split.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_adamw.update_split.contract import NUM_COLUMNS, Col, StepScalars
from lightning_adamw.update_split.labels import KIND_PREFIX, Kind
from lightning_adamw.update_split.metrics import derive_metrics
from lightning_adamw.update_split.state import GroupWork

__all__ = ["GroupSplit", "TensorSplit", "UpdateSplit", "assemble"]


class TensorSplit:
    """Metrics of one parameter tensor updated by the step.

    Attributes:
        name: the parameter's name (the group's ``"param_names"``, else ``<group>.param{j}``).
        key: its label in per-layer metric keys (:func:`~lightning_adamw.update_split.layer_labels`: the name,
            or ``<group>/<name>`` when several groups of the optimizer have a tensor of that name).
        group: the label of its group.
        kind: ``"adamw"``, ``"adam_l2"`` or ``"generic"``.
        numel: number of elements (of the whole tensor, also when sharded).
        finite: ``False`` when its weights or update held NaN/inf (then ``metrics`` is empty).
        metrics: ``{metric: value}`` (plain floats, non-finite values removed; names and units in
            :mod:`~lightning_adamw.update_split.metrics`), derived from the tensor's sums on first access.
    """

    __slots__ = ("_args", "_metrics", "_sums", "finite", "group", "key", "kind", "name", "numel")

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
        self._args = (lr, weight_decay, beta1, rounding)

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            if not self.finite or self._sums is None:
                self._metrics = {}
            else:
                lr, wd, beta1, rounding = self._args
                raw = derive_metrics(
                    self.kind,
                    self._sums,
                    lr=lr,
                    weight_decay=wd,
                    beta1=beta1,
                    group_level=False,
                    rounding=rounding,
                )
                self._metrics = {k: v for k, v in raw.items() if math.isfinite(v)}
        return self._metrics

    def __repr__(self) -> str:
        return (
            f"TensorSplit(name={self.name!r}, kind={self.kind!r}, numel={self.numel}, finite={self.finite})"
        )


@dataclass
class GroupSplit:
    """Metrics of one parameter group.

    Attributes:
        name: the group's label, unique within the optimizer (:func:`~lightning_adamw.update_split.group_labels`).
        kind: ``"adamw"``, ``"adam_l2"`` or ``"generic"``; the metric prefix is :attr:`prefix`.
        lr: the learning rate :math:`\\eta` of the step; weight_decay: the group's :math:`\\lambda`.
        numel: elements of the tensors the step updated; num_tensors: how many tensors that is.
        metrics: ``{metric: value}``, non-finite values removed (empty when any tensor was not finite).
        tensors: per-tensor results (:class:`TensorSplit`), made when first read.
        finite: ``False`` when some tensor's weights or update held NaN/inf.
        w_old_known: ``False`` when the weights before the step could not be reconstructed (``lr *
            weight_decay`` at or too close to 1, see :func:`~lightning_adamw.update_split.w_old_reconstructible`):
            the metrics that need them are then left out.
    """

    name: str
    kind: Kind
    lr: float
    weight_decay: float
    numel: int
    num_tensors: int
    metrics: dict[str, float]
    tensors: Sequence[TensorSplit] = field(default_factory=list)
    finite: bool = True
    w_old_known: bool = True

    @property
    def prefix(self) -> str:
        """``adamw``, ``adam_l2`` or ``optim``: the first part of this group's metric keys."""
        return KIND_PREFIX[self.kind]


class _TensorSplits(Sequence[TensorSplit]):
    """A group's :class:`TensorSplit` objects, made on first access: group-level logging needs none of them
    (with hundreds of tensors, making them was a visible share of the monitor's time on a GPU)."""

    def __init__(
        self,
        work: GroupWork,
        scalars: StepScalars,
        positions: list[int],
        sums: list[list[float]],
        finite: list[bool],
    ) -> None:
        self._args = (work.label, work.kind, scalars.lr, scalars.weight_decay, scalars.beta1)
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
                    numel=round(sums[Col.NUMEL]),
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
    """Everything computed for one optimizer step: one :class:`GroupSplit` per group the step updated.

    Attributes:
        groups: the groups with at least one updated tensor, in the optimizer's order.
        skipped: ``True`` when the step was not applied (a fused optimizer's ``GradScaler`` overflow); then
            ``groups`` is empty and nothing is reported.
    """

    groups: list[GroupSplit]
    skipped: bool = False

    @property
    def nonfinite_tensors(self) -> list[str]:
        """Per-layer labels (:func:`~lightning_adamw.update_split.layer_labels`) of tensors whose weights or
        update were NaN/inf."""
        return [key for g in self.groups for key in _nonfinite_keys(g)]

    @property
    def w_old_unknown(self) -> list[GroupSplit]:
        """Groups whose weights before the step could not be reconstructed
        (see :func:`~lightning_adamw.update_split.w_old_reconstructible`)."""
        return [g for g in self.groups if not g.w_old_known]

    def metrics(self, per_layer: bool = False, label_prefix: str = "") -> dict[str, float]:
        """Flat ``{"<prefix>/<group>/<metric>": value}`` dict; per-layer keys under ``<prefix>_layer/<param>/``.

        ``<group>`` is the group's unique label (:func:`~lightning_adamw.update_split.group_labels`),
        ``<param>`` the tensor's unique label (:func:`~lightning_adamw.update_split.layer_labels`: its name, or
        ``<group>/<name>`` when several groups have a tensor of that name). ``label_prefix`` is prepended to both
        (used to keep several optimizers apart: ``opt0.``, ``opt1.``). Non-finite values never appear (they are
        counted in :attr:`nonfinite_tensors` instead).
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


def assemble(
    works: Sequence[GroupWork],
    scalars: Sequence[StepScalars],
    host: Sequence[float],
    num_rows: int,
    *,
    steps_per_epoch: float | None,
) -> UpdateSplit:
    """The :class:`UpdateSplit` from the host copy of the sums table (``num_rows x NUM_COLUMNS``, row-major),
    followed by ``(min, max, median)`` of each coupled-L2 group's denominators."""
    k = NUM_COLUMNS
    rows = [host[i * k : (i + 1) * k] for i in range(num_rows)]
    offset = num_rows * k
    groups: list[GroupSplit] = []
    for w, sc in zip(works, scalars, strict=True):
        # positions (in the group) of the tensors this step updated (no gradient / no snapshot: not updated)
        live_pos = [i for i, r in enumerate(w.rows) if rows[r][Col.COUNT] > 0.0]
        if not live_pos:
            continue
        live = [rows[w.rows[i]] for i in live_pos]
        finite_flags = [math.isfinite(sum(sums)) for sums in live]  # a NaN or inf anywhere makes the sum so
        totals = [sum(column) for column in zip(*live, strict=True)]
        if w.idle:  # the trainable tensors the step left alone: in the group's weights, with a zero update
            idle_rows = [rows[r] for r, _, _ in w.idle]
            totals[Col.IDLE] = sum(r[Col.IDLE] for r in idle_rows)
            totals[Col.IDLE_NUMEL] = sum(r[Col.IDLE_NUMEL] for r in idle_rows)
        group_finite = all(finite_flags) and math.isfinite(totals[Col.IDLE])
        denominators = None
        if w.kind == "adam_l2":
            lo, hi, median = host[offset + 3 * w.coupled_index : offset + 3 * w.coupled_index + 3]
            denominators = (lo, median, hi)
            group_finite = group_finite and all(math.isfinite(x) for x in denominators)
        metrics: dict[str, float] = {}
        w_old_known = True
        if group_finite:
            raw = derive_metrics(
                w.kind,
                totals,
                lr=sc.lr,
                weight_decay=sc.weight_decay,
                beta1=sc.beta1,
                steps_per_epoch=steps_per_epoch,
                group_level=True,
                rounding=max(w.rounding[i] for i in live_pos),
                denominators=denominators,
                sgd_momentum=sc.sgd_momentum,
            )
            metrics = {key: v for key, v in raw.items() if math.isfinite(v)}
            # (decay_norm is there whenever w_old was reconstructed, and left out only when it was not)
            w_old_known = w.kind != "adamw" or "decay_norm" in raw
        groups.append(
            GroupSplit(
                name=w.label,
                kind=w.kind,
                lr=sc.lr,
                weight_decay=sc.weight_decay,
                numel=round(totals[Col.NUMEL]),
                num_tensors=len(live_pos),
                metrics=metrics,
                tensors=_TensorSplits(w, sc, live_pos, live, finite_flags),
                finite=group_finite,
                w_old_known=w_old_known,
            )
        )
    return UpdateSplit(groups=groups)
