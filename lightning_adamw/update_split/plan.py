"""The plan of a call — which tensors take part, their rows, and which backend sums which — and the cache of plans
an owner reuses from one call to the next.

Building a plan reads the optimizer's state (:mod:`~lightning_adamw.update_split.state`) and lets each chosen
backend prepare its layout (:mod:`~lightning_adamw.update_split.backends`); both cost far more than a call on a
model with many tensors, and neither changes while the optimizer keeps its tensors. A :class:`PlanCache`, owned by
the caller (the monitor keeps one; a training loop can pass its own as ``update_split(..., cache=...)``), keeps one
plan per optimizer and reuses it while the optimizer's *signature* (which tensors, where their memory is, which
state tensors, which have a gradient) and the choice of backends are unchanged. A plan is never changed after it
is built: when a backend fails at run time, the cache records the failure (and warns once) and a new plan is built
without that backend. Without a cache every call builds its own plan.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.backends import Assignment, assign
from lightning_adamw.update_split.backends import triton as triton_backend
from lightning_adamw.update_split.contract import NUM_COLUMNS, Col, acc_dtype
from lightning_adamw.update_split.labels import group_kind
from lightning_adamw.update_split.reduce import ShardReduce
from lightning_adamw.update_split.state import GroupWork, local_flat, read_state, v_key

__all__ = ["Plan", "PlanCache", "plan_for"]


@dataclass(frozen=True)
class Plan:
    """What one call needs besides this step's scalars; reused while :attr:`signature` and the choice hold."""

    #: what the plan depends on (``None``: not cacheable, e.g. snapshot groups)
    signature: tuple[Any, ...] | None
    #: ``(forced backend, excluded backends, chunk_numel)`` and the reducer, as chosen
    choice: tuple[str | None, frozenset[str], int | None]
    reduce: ShardReduce | None
    works: tuple[GroupWork, ...]
    num_rows: int
    assignments: tuple[Assignment, ...]
    #: per device: the table's constant columns (``NUMEL`` and ``COUNT`` of the items there, times weights)
    base: Mapping[torch.device, Tensor]
    #: where the sums end up (the first item's device)
    device: torch.device


class PlanCache:
    """Plans of the optimizers one owner splits, reused from one call to the next (see the module docstring).

    Keep one per training loop or callback; plans are dropped with their optimizer. :attr:`failed` holds the
    backends that failed at run time (name -> error), which no later plan of this cache uses.
    """

    def __init__(self) -> None:
        self._plans: weakref.WeakKeyDictionary[Any, Plan] = weakref.WeakKeyDictionary()
        #: backends that failed at run time in this cache's calls: name -> the error
        self.failed: dict[str, str] = {}

    def get(self, key: Any) -> Plan | None:
        """The cached plan of ``key`` (an optimizer), if any."""
        return self._plans.get(key)

    def put(self, key: Any, plan: Plan) -> None:
        self._plans[key] = plan

    def __contains__(self, key: Any) -> bool:
        return key in self._plans

    def __getstate__(self) -> dict[str, Any]:
        # a pickled owner (a callback sent to spawned processes) takes no plan along: plans hold the tensors of
        # this process; the failures it learned stay
        return {"failed": dict(self.failed)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._plans = weakref.WeakKeyDictionary()
        self.failed = dict(state.get("failed", {}))

    def record_failure(self, backend: str, error: BaseException) -> None:
        """Remember that ``backend`` failed (no later plan uses it) and warn, once per backend."""
        if backend in self.failed:
            return
        self.failed[backend] = repr(error)
        warnings.warn(
            f"WeightDecayMonitor: the {backend} backend failed ({error!r}); its tensors are summed by the next"
            " backend of the dispatch table from now on (slower, same numbers)",
            RuntimeWarning,
            stacklevel=3,
        )


def plan_for(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
    chunk_numel: int | None,
    triton: bool,
    backend: str | None,
    cache: PlanCache | None,
    key: Any,
) -> Plan:
    """The cached plan of ``key`` when nothing it depends on changed, else a new one (cached when it may be)."""
    exclude = set(cache.failed) if cache is not None else set()
    if not triton or triton_backend.switched_off():
        exclude.add("triton")
    choice = (backend, frozenset(exclude), chunk_numel)
    signature = _signature(param_groups, state, adam_family) if snapshot is None else None
    cacheable = cache is not None and key is not None and signature is not None
    if cacheable:
        cached = cache.get(key)  # type: ignore[union-attr]
        if (
            cached is not None
            and cached.signature == signature
            and cached.choice == choice
            and cached.reduce is reduce
        ):
            return cached
    works, num_rows = read_state(
        param_groups, state, adam_family=adam_family, snapshot=snapshot, reduce=reduce
    )
    assignments = assign(works, forced=backend, exclude=exclude, chunk_numel=chunk_numel)
    items = [it for w in works for it in w.items]
    device = items[0].p.device if items else torch.device("cpu")
    plan = Plan(
        signature=signature,
        choice=choice,
        reduce=reduce,
        works=tuple(works),
        num_rows=num_rows,
        assignments=tuple(assignments),
        base=_base(works, num_rows),
        device=device,
    )
    if cacheable and _contiguous(works):
        cache.put(key, plan)  # type: ignore[union-attr]
    return plan


def _base(works: Sequence[GroupWork], num_rows: int) -> dict[torch.device, Tensor]:
    """Per device, a table holding only the constant columns: ``NUMEL`` and ``COUNT`` of the updated tensors,
    ``IDLE_NUMEL`` of the idle ones (a tensor sliced in several pieces counts once; replica weights make
    replicated shards sum to one)."""
    by_device: dict[torch.device, tuple[list[int], list[list[float]]]] = {}
    for w in works:
        for it in w.items:
            rows, values = by_device.setdefault(it.p.device, ([], []))
            rows.append(it.row)
            values.append([float(it.p.numel()) * it.weight, it.weight, 0.0])
        for row, param, weight in w.idle if w.items else ():  # (a group with no update is not reported)
            flat = local_flat(param)
            rows, values = by_device.setdefault(flat.device, ([], []))
            rows.append(row)
            values.append([0.0, 0.0, float(flat.numel()) * weight])
    out = {}
    for device, (rows, values) in by_device.items():
        base = torch.zeros(num_rows, NUM_COLUMNS, dtype=acc_dtype(device))
        columns = torch.tensor([Col.NUMEL, Col.COUNT, Col.IDLE_NUMEL])
        base[:, columns] = base[:, columns].index_add(
            0, torch.tensor(rows), torch.tensor(values, dtype=base.dtype)
        )
        out[device] = base if device.type == "cpu" else base.to(device, non_blocking=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The signature: what a cached plan depends on
# ----------------------------------------------------------------------------------------------------------------
def _data_ptr(t: Tensor) -> int:
    # a DTensor's own data_ptr is not its shard's; FSDP1 swaps `param.data`, which changes the pointer
    return getattr(t, "_local_tensor", t).data_ptr()


_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_EXP_AVG = operator.itemgetter("exp_avg")
_STEP = operator.itemgetter("step")


def _signature(
    param_groups: Sequence[Mapping[str, Any]], state: Mapping[Tensor, Mapping[str, Any]], adam_family: bool
) -> tuple[Any, ...] | None:
    """Which tensors, where their memory is, which state tensors, which have a gradient; ``None`` when nothing
    may be cached (snapshot-based groups). Called at every logged step, so it only reads ids and pointers."""
    sig: list[Any] = []
    for group in param_groups:
        kind = group_kind(group, adam_family)
        if kind == "generic":
            return None
        v_name = v_key(group)
        sig.append((kind, v_name, len(group["params"]), group.get("name"), id(group.get("param_names"))))
        fast = _group_signature(group["params"], state, v_name)
        if fast is not None:
            sig.append(fast)
            continue
        for p in group["params"]:
            st = state.get(p)
            if p.grad is None or not st or "exp_avg" not in st or "step" not in st:
                sig.append((id(p), p.requires_grad))
            else:
                m, v = st["exp_avg"], st[v_name]
                sig.append((id(p), _data_ptr(p), id(st), id(m), id(v), _data_ptr(m), _data_ptr(v)))
    return tuple(sig)


def _group_signature(
    params: Sequence[Tensor], state: Mapping[Tensor, Mapping[str, Any]], v_name: str
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
            tuple(map(_REQUIRES_GRAD, params)),  # which are trainable (the idle ones among them)
            tuple(map(id, states)),
            tuple(map(id, map(_EXP_AVG, states))),
            tuple(map(id, map(operator.itemgetter(v_name), states))),
            # (the fused kernel reads raw pointers: a state tensor whose storage was swapped must rebuild)
            tuple(map(Tensor.data_ptr, map(_EXP_AVG, states))),
            tuple(map(Tensor.data_ptr, map(operator.itemgetter(v_name), states))),
        )
        deque(map(_STEP, states), maxlen=0)  # every one has a step
    except (TypeError, KeyError):  # a state that is None or lacks a key
        return None
    return sig


def _contiguous(works: Sequence[GroupWork]) -> bool:
    """Whether every tensor of the plan is contiguous: ``reshape(-1)`` copies the others, and a cached copy would
    go stale (checked when a plan is built; the signature's data pointers and state ids cover later swaps)."""
    for w in works:
        for it in w.items:
            tensors = [it.param]
            if it.state is not None:
                tensors += [
                    it.state.get("exp_avg"),
                    it.state.get("exp_avg_sq"),
                    it.state.get("max_exp_avg_sq"),
                ]
            if not all(getattr(t, "_local_tensor", t).is_contiguous() for t in tensors if t is not None):
                return False
    return True
