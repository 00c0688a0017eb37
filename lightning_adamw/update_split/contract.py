r"""The sums contract: what a backend is given, what it must compute, in which precision, and where it writes.

Every metric of :func:`~lightning_adamw.update_split.update_split` is a closed-form function
(:mod:`~lightning_adamw.update_split.metrics`) of a few sums per parameter tensor. The backends
(:mod:`~lightning_adamw.update_split.backends`: ``reference``, ``foreach``, ``packed``, ``triton``) compute those
sums, each in its own way; this module is the one place that says what the sums are. Every backend implements
it, and ``tests/test_backends.py`` runs every backend against the float64 ``reference`` on the same inputs.

**The table.** One row per parameter of the optimizer (``TensorWork.row``), one column per :class:`Col`, dtype
:func:`acc_dtype` (float64; float32 on MPS), one table per device. With :math:`b` what the step subtracted
besides the decay — :math:`b = \eta u = \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}+\epsilon}`
for the Adam family (``v`` the ``amsgrad`` maximum where enabled), :math:`b = w_{old} - w_{new}` for other
optimizers (from a snapshot):

=========  ======================================  ===========================  ============================
column     sum                                     kinds                        written by
=========  ======================================  ===========================  ============================
``N``      :math:`\|w_{new}\|^2`                   all                          backends
``B``      :math:`\|b\|^2`                         all                          backends
``E``      :math:`\langle w_{new}, b\rangle`       all                          backends
``S``      :math:`\|w_{new} + b\|^2`               all                          backends
``G``      :math:`\|g\|^2`                         all                          backends
``F``      :math:`\pm\langle g, w_{new}+b\rangle`  ``adam_l2``                  backends (``-`` under
                                                                                ``maximize``)
``R``      :math:`\#\{i: 0 < |\Delta_i| < h_i\}`   ``adamw``, ``adam_l2``       backends
``RD``     :math:`\sum_{0<|\Delta_i|<h_i}          ``adamw``, ``adam_l2``       backends
           \Delta_i^2`
``NUMEL``  number of elements                      all                          the caller (constant per plan)
``COUNT``  1 (> 0: updated by this step)           all                          the caller (constant per plan)
``IDLE``   :math:`\|w\|^2` of a trainable tensor    all                          the caller (``sums.py``)
           the step did not update
``IDLE_    its number of elements                  all                          the caller (constant per plan)
NUMEL``
=========  ======================================  ===========================  ============================

``IDLE`` rows are the group's tensors with ``requires_grad`` that this step left alone (no gradient: an unused
branch, an MoE expert no token reached; or no Adam state yet): the group's weight vector still holds them, so
its weight norm and every ratio to it count them, with a zero update. Frozen tensors (``requires_grad=False``)
are not trained and are left out.

:math:`w_{new} + b` is :math:`(1 - \eta\lambda)\,w_{old}` for AdamW and :math:`w_{old}` otherwise. ``S`` is formed
elementwise, never as ``N + 2E + B``: for a weight that was 0 before the step that would cancel to rounding noise
exactly where it matters. ``G`` is the gradient the step used, ``p.grad`` read in the optimizer's step post-hook
(divided by the ``GradScaler`` scale a fused optimizer leaves in ``.grad``), and ``F`` is negated under
``maximize`` (torch negates :math:`g` before adding :math:`\lambda w`).

**Rounded away** (``R``, ``RD``): :math:`\Delta = w_{old} - \hat w_{new}` is the change the optimizer *computed*,
:math:`\hat w_{new} = (1-\eta\lambda) w_{old} - b` in exact arithmetic; with :math:`c = \eta\lambda/(1-\eta\lambda)`
(0 for Adam + L2) it is :math:`\Delta = c\,w_{new} + (1 + c)\,b` (:func:`decay_coefficient`), formed from
:math:`w_{new}` and :math:`b` without cancellation. :math:`h_i` is half the spacing of the parameter's storage
dtype at the stored :math:`w_{new,i}` (:func:`half_ulp`: :math:`2^{\lfloor\log_2|w|\rfloor}\,\epsilon_s/2`, at
least half the smallest subnormal spacing). A coordinate is rounded away when :math:`0 < |\Delta_i| < h_i`:
rounding :math:`w_{old,i} - \Delta_i` to the storage dtype gives :math:`w_{old,i}` back. The test is at
:math:`w_{new}`, which *is* :math:`w_{old}` wherever the update was lost; where it was kept and crossed a power of
two the spacing there may be twice that at :math:`w_{old}` (a coordinate in 2^p of a binade, counted as lost).
A tie (:math:`|\Delta| = h`) counts as kept; :math:`\Delta = 0` (nothing to apply) is not counted. ``h`` is exact
in any compute dtype (a power of two from the exponent bits); :math:`\Delta` is formed in the compute dtype, so a
coordinate within a few of its roundings of :math:`h` may be classified either way.

**The dtype rule** (:func:`compute_dtype`, one function used by every backend, read once per tensor into
``TensorWork.compute_dtype``): a tensor with at most one dimension larger than 1 (biases, norm gains,
LayerScale's ``(C, 1, 1)``, scalars) is computed in float64, elementwise and summed; every other tensor in
float32 (its own dtype when that is float64). Why: biases and gains grow from zero by updates of one sign, so the
update is nearly parallel to the weight and the angle's :math:`B - E^2/N` cancels; their products must be
exact, and they are a tiny share of any model. Float64 everywhere measured twice as slow on a CPU. MPS has no
float64: float32 throughout there. Half-precision inputs convert to float32 exactly.

**What a backend receives** (:class:`SumsRequest`): the items of one kind of group (possibly from several groups:
``parts``), each a :class:`TensorWork` holding flat local views of ``w_new``, ``exp_avg``, the denominator's
``v`` (Adam family) or the snapshot ``w_old`` (generic); per group the step's :class:`StepScalars` (bias
corrections replayed as the optimizer computed them, host floats or device vectors); the current gradients
(``p.grad``, read at each call) and the fused optimizer's ``grad_scale``. It was prepared once per plan by its own
``prepare(items, chunk_numel)`` (layouts, buckets, pointer tables).

**What a backend must do** (``add_sums``): for every item, add ``item.weight`` times each sum of
``SUM_COLUMNS[kind]`` into row ``item.row`` of ``tables.on(item.p.device)``, and nothing else; no host
synchronisation; no division or root of a sum. Accuracy: products in the item's compute dtype; partial sums of at
most ``Backend.partial_terms`` terms (``None``: a slice of at most the chunk) in that dtype, then added in the
table's dtype. ``tests/helpers/backend_bounds.py`` turns that into an error bound per column.

**Adding a sum** (as ``G`` for AdamW groups and ``R``, ``RD`` were added): a member of :class:`Col`, its kinds in
:data:`SUM_COLUMNS`, its computation in every backend that takes those kinds, and the formula that reads it in
:mod:`~lightning_adamw.update_split.metrics`. Nothing else reads column positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_adamw.update_split.labels import Kind

__all__ = [
    "EXPONENT_BITS",
    "NUM_COLUMNS",
    "SUM_COLUMNS",
    "Backend",
    "Col",
    "RequestPart",
    "StepScalars",
    "SumsRequest",
    "Tables",
    "TensorWork",
    "acc_dtype",
    "compute_dtype",
    "decay_coefficient",
    "half_ulp",
    "storage_spacing",
]


class Col(IntEnum):
    """Columns of the per-tensor sums table (see the module docstring)."""

    N = 0
    B = 1
    E = 2
    S = 3
    G = 4
    F = 5
    R = 6
    RD = 7
    NUMEL = 8
    COUNT = 9
    IDLE = 10
    IDLE_NUMEL = 11


#: Width of the sums table.
NUM_COLUMNS = len(Col)
#: The columns a backend fills for each kind of group.
SUM_COLUMNS: dict[str, tuple[Col, ...]] = {
    "adamw": (Col.N, Col.B, Col.E, Col.S, Col.G, Col.R, Col.RD),
    "adam_l2": (Col.N, Col.B, Col.E, Col.S, Col.G, Col.F, Col.R, Col.RD),
    # (b is the change a snapshot saw applied, not the one computed: nothing to compare with storage)
    "generic": (Col.N, Col.B, Col.E, Col.S, Col.G),
}


def compute_dtype(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype rule: the dtype a tensor's elementwise arithmetic and sums are computed in.

    float64 for a tensor with at most one dimension larger than 1 (biases, gains, scalars) and for float64
    tensors; float32 for every other tensor; float32 for everything on MPS (no float64 there). ``dtype`` is the
    real dtype of the flat local tensor (complex parameters are summed as their real view).
    """
    if device.type == "mps":
        return torch.float32
    if dtype == torch.float64 or sum(1 for d in shape if d > 1) <= 1:
        return torch.float64
    return torch.float32


def acc_dtype(device: torch.device) -> torch.dtype:
    """dtype of the sums table on ``device``: float64, float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


#: the exponent bits of float32 / float64 (the compute dtypes), and the signed integer dtype of the same width
EXPONENT_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def storage_spacing(storage: torch.dtype) -> tuple[float, float]:
    """``(eps, tiny)`` of a storage dtype: the spacing of its numbers in ``[1, 2)`` and its smallest normal
    number. Its spacing at :math:`|w|` is :math:`2^{\\lfloor\\log_2|w|\\rfloor}\\,` ``eps`` for normal numbers and
    ``tiny * eps`` (the subnormal spacing) below ``tiny``. Non-float dtypes: ``(0, 0)``."""
    if not storage.is_floating_point:
        return 0.0, 0.0
    info = torch.finfo(storage)
    return float(info.eps), float(info.tiny)


def half_ulp(w: Tensor, storage: torch.dtype, *, scale: float = 1.0) -> Tensor:
    r"""``scale`` times half the spacing of ``storage`` at each element of ``w`` (a float32 or float64 tensor of
    values representable in ``storage``): :math:`2^{\lfloor\log_2|w|\rfloor}\,\epsilon_s/2`, at least half the
    smallest subnormal spacing (also at :math:`w = 0`). Exact: the power of two is read from ``w``'s exponent
    bits, and ``scale = 2/eps`` (a power of two) gives just the power of two, at least ``tiny``. New tensor."""
    eps, tiny = storage_spacing(storage)
    int_dtype, mask = EXPONENT_BITS[w.dtype]
    power = w.view(int_dtype).bitwise_and(mask).view(w.dtype)  # 2^floor(log2|w|); 0 below w's normal range
    return power.mul_(0.5 * eps * scale).clamp_min_(0.5 * eps * tiny * scale)


def decay_coefficient(kind: str, lr: float, weight_decay: float) -> float:
    r""":math:`c` of :math:`\Delta = c\,w_{new} + (1 + c)\,b`, the change an optimizer step computed:
    :math:`\eta\lambda / (1 - \eta\lambda)` for AdamW (:math:`w_{old} = (w_{new} + b)/(1 - \eta\lambda)`), 0
    for Adam + L2 (its decay is inside :math:`b`). 0 also where :math:`1 - \eta\lambda = 0` (then
    :math:`w_{old}` is gone and the metrics that need it are left out)."""
    if kind != "adamw":
        return 0.0
    lr_wd = lr * weight_decay
    q = 1.0 - lr_wd
    return lr_wd / q if q != 0.0 else 0.0


@dataclass
class TensorWork:
    """One updated parameter tensor, as every backend sees it (flat local views; no copy)."""

    #: row of the sums table
    row: int
    #: multiplies every sum: ``1/r`` for a parameter replicated on ``r`` ranks (:class:`ShardReduce`), else 1
    weight: float
    #: the parameter (its ``.grad``, a new tensor after each ``zero_grad``, is read at every call)
    param: Tensor
    #: the weights after the step, ``w_new``: the flat local shard (real view of complex parameters)
    p: Tensor
    #: :func:`compute_dtype` of this tensor
    compute_dtype: torch.dtype
    #: ``exp_avg`` and the denominator's ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad), flat (Adam family)
    m: Tensor | None = None
    v: Tensor | None = None
    #: the weights before the step from a snapshot, flat (generic optimizers; scratch space afterwards)
    snap: Tensor | None = None
    #: the optimizer state of the parameter (its ``step`` is read at every call)
    state: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StepScalars:
    """One group's hyperparameters of this step, and its items' bias corrections as the optimizer computed them."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    maximize: bool
    #: ``torch.optim.SGD``'s ``momentum`` (a group with its ``momentum``, ``dampening`` and ``nesterov``), else
    #: ``None`` (read by the SGD steady-state formula only)
    sgd_momentum: float | None = None
    #: per item :math:`\eta / (1 - \beta_1^t)`: host floats, one vector on the device of ``step``, or 0-d tensors
    #: (steps spread over devices); empty for generic groups
    step_size: Sequence[Any] | Tensor = ()
    #: per item :math:`\sqrt{1 - \beta_2^t}`, in the same form
    bc2_sqrt: Sequence[Any] | Tensor = ()


@dataclass
class RequestPart:
    """The items of one parameter group in a request, with the group's scalars."""

    items: Sequence[TensorWork]
    scalars: StepScalars
    #: the current flat local gradient of each item (``p.grad`` when the step post-hook runs: accumulated,
    #: unscaled, clipped), for the kinds whose columns include ``G``
    grads: Sequence[Tensor] | None = None


@dataclass
class SumsRequest:
    """Everything one backend call sums: the items of one kind of group, with this step's scalars."""

    kind: Kind
    parts: Sequence[RequestPart]
    #: a fused optimizer's ``GradScaler`` scale still in ``.grad`` (``G`` and ``F`` are divided by it)
    grad_scale: Tensor | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def items(self) -> list[TensorWork]:
        if "items" not in self._cache:
            self._cache["items"] = [it for part in self.parts for it in part.items]
        return self._cache["items"]

    def per_item(self) -> tuple[list[Any], list[Any], list[float]]:
        """``(step_size, bc2_sqrt, eps)`` with one entry per item (floats, or 0-d device tensors)."""
        if "per_item" not in self._cache:
            step_size: list[Any] = []
            bc2: list[Any] = []
            eps: list[float] = []
            for part in self.parts:
                s = part.scalars
                step_size += _entries(s.step_size)
                bc2 += _entries(s.bc2_sqrt)
                eps += [s.eps] * len(part.items)
            self._cache["per_item"] = (step_size, bc2, eps)
        return self._cache["per_item"]

    def decay_coefficients(self) -> list[float]:
        """:func:`decay_coefficient` of each item's group, one host float per item."""
        if "decay" not in self._cache:
            self._cache["decay"] = [
                decay_coefficient(self.kind, part.scalars.lr, part.scalars.weight_decay)
                for part in self.parts
                for _ in part.items
            ]
        return self._cache["decay"]

    def shared_decay_coefficient(self) -> float | None:
        """The :func:`decay_coefficient` every item shares (one group, or groups with one ``lr * weight_decay``),
        else ``None``."""
        return _uniform_float(self.decay_coefficients())

    def eps_and_scale(self) -> tuple[list[Any], list[Any]]:
        r"""The step rewritten for one division: :math:`\eta u = s\,m / (\sqrt v + c\epsilon)` with
        :math:`c = \sqrt{1-\beta_2^t}`, :math:`s = \eta c / (1 - \beta_1^t)`. Returns ``(c*eps, s)``: one entry per
        item, or a single vector each when every group's corrections are vectors on a device (capturable or
        fused optimizers: a few kernels, none per tensor)."""
        if "eps_scale" not in self._cache:
            vectors = [p.scalars for p in self.parts]
            if vectors and all(isinstance(s.step_size, Tensor) and s.step_size.dim() == 1 for s in vectors):
                # (float32 corrections of capturable optimizers: their products formed in the table's dtype)
                dt = acc_dtype(vectors[0].step_size.device)  # type: ignore[union-attr]
                bc2 = torch.cat([s.bc2_sqrt for s in vectors]).to(dt)  # type: ignore[misc]
                eps = torch.cat([s.bc2_sqrt.to(dt) * s.eps for s in vectors])  # type: ignore[union-attr]
                scale = torch.cat([s.step_size for s in vectors]).to(dt) * bc2  # type: ignore[misc]
                self._cache["eps_scale"] = ([eps], [scale])
            else:
                step_size, bc2_list, eps_list = self.per_item()
                self._cache["eps_scale"] = (
                    [b * e for b, e in zip(bc2_list, eps_list, strict=True)],
                    [s * b for s, b in zip(step_size, bc2_list, strict=True)],
                )
        return self._cache["eps_scale"]

    def shared_eps_and_scale(self) -> tuple[float, float] | None:
        """``(c*eps, s)`` as two host floats when every item shares them (the same ``step``: the usual case)."""
        eps, scale = self.eps_and_scale()
        e, s = _uniform_float(eps), _uniform_float(scale)
        return None if e is None or s is None else (e, s)

    def eps_and_scale_vectors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(c*eps, s)`` as two vectors (one value per item, :func:`acc_dtype`) on ``device``."""
        key = ("vectors", device)
        if key not in self._cache:
            eps, scale = self.eps_and_scale()
            self._cache[key] = (item_vector(eps, device), item_vector(scale, device))
        return self._cache[key]


def _entries(values: Sequence[Any] | Tensor) -> list[Any]:
    return list(values.unbind(0)) if isinstance(values, Tensor) else list(values)


def _uniform_float(values: list[Any]) -> float | None:
    """The common value of a list of host floats, else ``None`` (steps differ, or scalars on a device)."""
    if not values or set(map(type, values)) != {float} or values.count(values[0]) != len(values):
        return None
    return values[0]


def host_to(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values as a tensor on ``device``. A blocking host-to-device copy waits for the device (and counts as
    a sync); small index / weight lists are sent asynchronously instead."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def item_vector(values: list[Any], device: torch.device) -> Tensor:
    """Per-item scalars as one :func:`acc_dtype` vector on ``device``: host floats in one copy, device scalars
    stacked in one kernel, an existing vector converted."""
    dtype = acc_dtype(device)
    if all(isinstance(v, float) for v in values):
        return host_to(values, dtype, device)
    if len(values) == 1 and isinstance(values[0], Tensor) and values[0].dim() == 1:  # already the vector
        return values[0].to(device=device, dtype=dtype)
    return torch.stack([torch.as_tensor(v, device=device).to(dtype) for v in values])


class Tables:
    """The per-device sums tables of one call (``num_rows x NUM_COLUMNS``, :func:`acc_dtype`); backends add into
    ``on(device)``. Each starts from the plan's constant columns (``NUMEL``, ``COUNT``) for that device."""

    def __init__(self, num_rows: int, base: Mapping[torch.device, Tensor]) -> None:
        self.num_rows = num_rows
        self.tables: dict[torch.device, Tensor] = {device: t.clone() for device, t in base.items()}

    def on(self, device: torch.device) -> Tensor:
        if device not in self.tables:
            self.tables[device] = torch.zeros(
                self.num_rows, NUM_COLUMNS, dtype=acc_dtype(device), device=device
            )
        return self.tables[device]

    def add(self, device: torch.device, rows: Tensor, columns: Sequence[Col], block: Tensor) -> None:
        """``table[rows[i], columns[k]] += block[i, k]`` on ``device`` (rows may repeat: slices of one tensor)."""
        table = self.on(device)
        first = int(columns[0])
        if list(columns) == list(range(first, first + len(columns))):
            table[:, first : first + len(columns)].index_add_(0, rows, block.to(table.dtype))
        else:
            for k, col in enumerate(columns):
                table[:, int(col)].index_add_(0, rows, block[:, k].to(table.dtype))


class Backend(Protocol):
    """What every backend module provides (see the module docstring for the contract)."""

    #: the name in the dispatch table and in ``update_split(..., backend=...)``
    name: str
    #: the kinds of groups it sums
    kinds: frozenset[str]
    #: most terms one partial sum adds in the compute dtype before the table's dtype takes over (``None``: a
    #: slice of at most the chunk); what the error bounds of the tests are derived from
    partial_terms: int | None
    #: whether it can fail at run time for reasons outside the code (a Triton that cannot compile or launch);
    #: the caller then rebuilds the plan without it
    fallible: bool

    def accepts(self, item: TensorWork) -> bool:
        """Whether this backend can sum ``item`` (device, dtypes, memory layout)."""
        ...

    def prepare(self, items: Sequence[TensorWork], chunk_numel: int | None) -> Any:
        """Whatever it reuses from call to call for these items (built once per plan)."""
        ...

    def add_sums(self, prepared: Any, request: SumsRequest, tables: Tables) -> None:
        """Add every item's weighted sums into its row of its device's table (see the module docstring)."""
        ...


def auto_chunk(numels: Sequence[int], chunk_numel: int | None, *, lo: int, hi: int, divisor: int) -> int:
    """Elements per chunk: ``chunk_numel`` when given, else ``total // divisor`` clamped to ``[lo, hi]`` (the extra
    memory then stays a small fraction of the parameters)."""
    if chunk_numel is not None:
        return max(1, int(chunk_numel))
    total = sum(numels)
    return int(min(max(total // divisor, lo), hi))
