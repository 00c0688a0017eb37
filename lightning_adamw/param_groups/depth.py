"""Depth of every tensor for layer-wise learning-rate decay, and the learning-rate factor it gives.

Layer-wise lr decay (ELECTRA, Clark et al. 2020, sec. 3.3 / appendix; BEiT, Bao et al. 2022, sec. 2.4 "layer-wise
learning rate decay"): a tensor at depth ``d`` trains with ``lr * layer_decay ** (L + 1 - d)``, where ``L`` is the
number of blocks, the embeddings sit at depth 0, block ``k`` (1-based) at depth ``k`` and what follows the last
block (final norm, pooler, head) at ``L + 1``, at the full rate.

The depth comes from, in this order:

1. the ``layer_id`` option, a callable ``name -> depth`` (names as ``named_parameters()`` of the module prints
   them, wrapper attributes left out);
2. a hook of the model (with ``use_model_hooks``): a ``layer_id(name)`` method, or timm's
   ``group_matcher(coarse=False)`` (its regexes number the layers the way timm's own layer decay does). The
   outermost module that defines one is used, with names relative to it; tensors outside it go to depth 0 when
   they come before it and to the top depth when they come after it;
3. the block index in the name: the first ``<container>.<N>`` component, ``<container>`` one of ``layers``,
   ``layer``, ``blocks``, ``block``, ``h``, ``resblocks``, ``stages``, ``stage``, ``levels``
   (``vit.layers.3.…``, ``bert.encoder.layer.3.…``, ``transformer.h.3.…``). Nested stages
   (``stages.1.layers.2``, ``layers.1.blocks.2``: ConvNeXt, Swin, ResNet) are numbered as one running sequence of
   blocks; a tensor of a stage that is in none of its blocks (a downsampling layer) takes the depth of the block
   that follows it. Blocks are numbered 1..L in index order, counting blocks that hold parameters (frozen ones
   included, so freezing does not shift depths). Tensors outside the blocks: embeddings (an embedding layer, or a
   name component such as ``embeddings``, ``patch_embed``, ``cls_token``, ``pos_embed``) and whatever comes before
   the first block in ``named_parameters()`` order at depth 0; whatever comes after the last block at ``L + 1``.
   ``named_parameters()`` lists a module's own tensors before its children's, so a tensor held directly by a
   module that also contains the blocks (a root-level temperature) has no known place: an error, unless it has an
   embedding name. Two separate stacks (encoder and decoder, two towers) and a tensor among the blocks but in
   none are errors too; ``layer_id`` settles all of these.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_adamw.param_groups.names import ModuleNode, ParamSite
from lightning_adamw.param_groups.rules import is_embedding_layer, is_embedding_name, tensor_views

__all__ = [
    "BLOCK_CONTAINERS",
    "DepthPlan",
    "check_layer_decay",
    "find_depths",
    "layer_decay_scale",
    "matcher_layer_ids",
]

#: Names of the module lists that hold a network's blocks (``<container>.<index>`` in a tensor's name).
BLOCK_CONTAINERS: tuple[str, ...] = (
    "layers",
    "layer",
    "blocks",
    "block",
    "h",
    "resblocks",
    "stages",
    "stage",
    "levels",
)
# Containers of blocks inside a stage (``stages.1.layers.2``, ``layers.1.blocks.2``). Not the singular ``layer``:
# T5's ``block.3.layer.1`` and ResNet's ``layers.0.layer.2`` are sub-layers of one block.
_INNER_CONTAINERS = ("blocks", "block", "layers")
_BLOCK = re.compile(
    rf"(?:^|\.)(?P<outer>{'|'.join(BLOCK_CONTAINERS)})\.(?P<i>\d+)"
    rf"(?:\.(?P<inner>{'|'.join(_INNER_CONTAINERS)})\.(?P<j>\d+))?(?=\.|$)"
)
# timm's marker for "same layer as the previous group" (its final norm joins the last block).
_MATCH_PREVIOUS = 99999.0


def check_layer_decay(
    layer_decay: Any, layer_id: Any, num_layers: Any
) -> tuple[float | None, Callable[[str], Any] | None, int | None]:
    """The layer-decay options checked: ``layer_decay`` in (0, 1], ``layer_id`` callable, ``num_layers >= 1``.

    Raises:
        TypeError / ValueError: naming the option; ``layer_id`` or ``num_layers`` without ``layer_decay``.
    """
    if layer_decay is not None:
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)):
            raise TypeError(f"`layer_decay` must be a number in (0, 1], got {type(layer_decay).__name__}")
        layer_decay = float(layer_decay)
        if not (0.0 < layer_decay <= 1.0):
            raise ValueError(
                f"`layer_decay` must be in (0, 1] (each block's lr is the next one's times layer_decay), got "
                f"{layer_decay!r}"
            )
    if layer_id is not None and not callable(layer_id):
        raise TypeError(f"`layer_id` must be a callable name -> depth, got {type(layer_id).__name__}")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"`num_layers` must be an int >= 1, got {num_layers!r}")
    if layer_decay is None and (layer_id is not None or num_layers is not None):
        given = "`layer_id`" if layer_id is not None else "`num_layers`"
        raise ValueError(
            f"{given} is used only with `layer_decay`: set `layer_decay` (e.g. 0.75) or remove it"
        )
    return layer_decay, layer_id, num_layers


def layer_decay_scale(layer_decay: float, depth: int, num_layers: int) -> float:
    """``layer_decay ** (num_layers + 1 - depth)``: the lr factor of a tensor at ``depth`` (BEiT / ELECTRA)."""
    return layer_decay ** (num_layers + 1 - depth)


@dataclass(frozen=True)
class DepthPlan:
    """Depth of every tensor of a module (frozen ones too)."""

    depths: dict[str, int]
    """First name of each tensor -> depth in ``0..num_layers + 1``."""
    rules: dict[str, str]
    """First name -> how its depth was found (``"block of `vit.layers`"``, ``"embedding"``, ``"after the last block"``, ...)."""
    num_layers: int
    """``L``: depth ``L + 1`` trains at the full rate."""
    source: str
    """One line: where the depths came from."""


@dataclass(frozen=True)
class _Tensor:
    name: str
    names: tuple[str, ...]
    embedding: bool


def find_depths(
    module: nn.Module,
    nodes: list[ModuleNode],
    sites: Mapping[int, list[ParamSite]],
    *,
    layer_id: Callable[[str], Any] | None,
    num_layers: int | None,
    use_model_hooks: bool,
) -> DepthPlan:
    """Depth of every parameter of ``module`` (see the module docstring for the rules).

    Raises:
        ValueError / TypeError: no depth can be found (no block in any name and no hook: naming ``layer_decay``
            and suggesting ``layer_id=``), a tensor between blocks that is in none, two separate stacks of blocks,
            a depth that is not an int >= 0, more blocks or a larger depth than ``num_layers`` allows.
    """
    tensors = [
        _Tensor(
            places[0].name,
            tuple(dict.fromkeys(s.name for s in places)),
            any(is_embedding_layer(v.owner) and not v.gain for v in tensor_views(places))
            or any(is_embedding_name(s.name) for s in places),
        )
        for places in sites.values()
    ]
    if layer_id is not None:
        depths = {t.name: _check_depth(layer_id(t.name), t.name, "the `layer_id` option") for t in tensors}
        return _finish(depths, dict.fromkeys(depths, "layer_id"), num_layers, "the `layer_id` option")
    if use_model_hooks:
        hooked = _hook_module(nodes)
        if hooked is not None:
            return _from_hook(hooked, tensors, num_layers)
    return _from_names(module, tensors, num_layers)


def _check_depth(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{source} gave `{name}` the depth {value!r}: a depth must be an int >= 0")
    try:
        depth = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{source} gave `{name}` the depth {value!r} ({type(value).__name__}): a depth must be an int >= 0"
        ) from None
    if depth < 0:
        raise ValueError(f"{source} gave `{name}` the depth {depth}: a depth must be an int >= 0")
    return depth


def _finish(depths: dict[str, int], rules: dict[str, str], num_layers: int | None, source: str) -> DepthPlan:
    top = max(depths.values())
    if num_layers is None:
        if top == 0:
            raise ValueError(
                f"{source} put every tensor at depth 0: layer decay needs depths up to L + 1 (the head); set "
                "`layer_id` or `num_layers`"
            )
        num_layers = top - 1
    elif top > num_layers + 1:
        name = next(n for n, d in depths.items() if d == top)
        raise ValueError(
            f"{source} gave `{name}` the depth {top}, beyond `num_layers` + 1 = {num_layers + 1}: raise "
            "`num_layers` or leave it unset (then L + 1 is the largest depth)"
        )
    return DepthPlan(depths, rules, num_layers, source)


def _holds(name: str, path: str) -> bool:
    """The tensor ``name`` belongs directly to a module that contains ``path`` (the root, or a parent)."""
    owner = name.rpartition(".")[0]
    return owner == "" or path == owner or path.startswith(owner + ".")


def _ambiguous(name: str, where: str) -> ValueError:
    # named_parameters() lists a module's own tensors before its children's, whatever the forward pass does: for
    # a tensor held beside the blocks (a root-level temperature or gate) the order says nothing about its depth.
    return ValueError(
        f"`layer_decay`: `{name}` belongs to a module that also holds {where}, so whether it acts before or after "
        "the blocks is unknown; pass `layer_id=` (a callable name -> depth), or give it an embedding name if it "
        "is one (`*_embed`, `*_token`)"
    )


# ----------------------------------------------------------------------------------------------- model hooks


def _defines(module: nn.Module, method: str) -> bool:
    # Looked up on the class: an int attribute ``layer_id`` on a block (Llama's reference code) is no hook.
    return callable(getattr(type(module), method, None))


def _hook_module(nodes: list[ModuleNode]) -> ModuleNode | None:
    """The outermost module that defines ``layer_id()`` or ``group_matcher()``; error when there are several."""
    found: list[ModuleNode] = []
    for node in nodes:
        if not (_defines(node.module, "layer_id") or _defines(node.module, "group_matcher")):
            continue
        parent, inside = node.parent, False
        while parent is not None:
            if any(parent.module is f.module for f in found):
                inside = True
                break
            parent = parent.parent
        if not inside and not any(f.module is node.module for f in found):
            found.append(node)
    if len(found) > 1:
        listed = ", ".join(f"`{n.name or '<root>'}` ({type(n.module).__name__})" for n in found)
        raise ValueError(
            f"`layer_decay`: several modules declare their own layer numbering (layer_id() / group_matcher()): "
            f"{listed}; pass `layer_id=` (a callable name -> depth) to say how they combine"
        )
    return found[0] if found else None


def _from_hook(node: ModuleNode, tensors: list[_Tensor], num_layers: int | None) -> DepthPlan:
    module = node.module
    where = f"`{type(module).__name__}`" + (f" at `{node.name}`" if node.name else "")
    prefix = f"{node.name}." if node.name else ""
    inside = [t for t in tensors if t.name.startswith(prefix)]
    if not inside:
        raise ValueError(f"`layer_decay`: {where} declares a layer numbering but holds no parameter")
    relative = [t.name[len(prefix) :] for t in inside]
    if _defines(module, "layer_id"):
        source = f"{where}.layer_id()"
        depths = {
            t.name: _check_depth(module.layer_id(r), t.name, source)
            for t, r in zip(inside, relative, strict=True)
        }
        rule = "layer_id()"
    else:
        source = f"{where}.group_matcher(coarse=False)"
        try:
            matcher = module.group_matcher(coarse=False)
        except TypeError as err:
            raise TypeError(f"`layer_decay`: calling {source} failed: {err}") from None
        ids = matcher_layer_ids(relative, matcher, source)
        depths = {t.name: ids[r] for t, r in zip(inside, relative, strict=True)}
        rule = "group_matcher()"
    rules = dict.fromkeys(depths, rule)
    top = max(depths.values())
    positions = {t.name: k for k, t in enumerate(tensors)}
    first, last = min(positions[t.name] for t in inside), max(positions[t.name] for t in inside)
    for k, t in enumerate(tensors):
        if t.name in depths:
            continue
        if node.name and _holds(t.name, node.name):
            raise _ambiguous(t.name, where)
        if k < first:
            depths[t.name], rules[t.name] = 0, f"before {where}"
        elif k > last:
            depths[t.name], rules[t.name] = top, f"after {where}"
        else:
            raise ValueError(
                f"`layer_decay`: `{t.name}` lies among the tensors of {where} but is not one of them; pass "
                "`layer_id=` (a callable name -> depth)"
            )
    return _finish(depths, rules, num_layers, source)


def matcher_layer_ids(names: list[str], matcher: Any, source: str = "group_matcher") -> dict[str, int]:
    """Layer ids from a timm-style ``group_matcher``, numbered the way timm's layer decay numbers them.

    ``matcher`` is an ordered dict ``{group: regex | [(regex, suffix), ...] | None}`` or a callable ``name ->
    ordinal(s)``. A name matched (``re.match``) by the ``k``-th entry gets the sort key ``(k, *captured numbers,
    *suffix)``; unmatched names (the head) sort last. Distinct keys are numbered 0, 1, 2, ... in sorted order, and a
    key ending in 99999 joins the previous number (timm's ``MATCH_PREV_GROUP``: its final norm shares the last
    block's depth).
    """
    keys: dict[str, tuple[float, ...]] = {}
    if isinstance(matcher, Mapping):
        compiled: list[tuple[re.Pattern[str], int, tuple[float, ...]]] = []
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
            for entry in specs:
                try:
                    regex, suffix = entry
                    compiled.append((re.compile(regex), ordinal, tuple(float(s) for s in (suffix or ()))))
                except (TypeError, ValueError, re.error) as err:
                    raise ValueError(
                        f"{source} returned an entry {entry!r} that is not (regex, suffix): {err}"
                    ) from None
        for name in names:
            keys[name] = (math.inf,)
            for regex, ordinal, suffix in compiled:
                m = regex.match(name)
                if m:
                    try:
                        captured = tuple(float(g) for g in m.groups() if g is not None)
                    except ValueError:
                        raise ValueError(
                            f"{source}: the regex {regex.pattern!r} captured a non-number in `{name}`"
                        ) from None
                    keys[name] = (float(ordinal), *captured, *suffix)
                    break
    elif callable(matcher):
        for name in names:
            ordinal = matcher(name)
            parts = ordinal if isinstance(ordinal, Iterable) and not isinstance(ordinal, str) else (ordinal,)
            try:
                keys[name] = tuple(float(p) for p in parts)
            except (TypeError, ValueError):
                raise TypeError(
                    f"{source} gave `{name}` the ordinal {ordinal!r}: it must be numbers"
                ) from None
    else:
        raise TypeError(
            f"{source} returned {type(matcher).__name__}: expected a dict of regexes or a callable"
        )
    ids: dict[tuple[float, ...], int] = {}
    current = -1
    for key in sorted(set(keys.values())):
        if current < 0 or key[-1] != _MATCH_PREVIOUS:
            current += 1
        ids[key] = current
    return {name: ids[key] for name, key in keys.items()}


# ----------------------------------------------------------------------------------------------- names


def _from_names(module: nn.Module, tensors: list[_Tensor], num_layers: int | None) -> DepthPlan:
    # (stack, i, j): the stack is the path of the container (``convnext.encoder.stages``), j the block inside a
    # stage (None for a tensor of the stage itself, or when blocks are not nested).
    found: dict[str, tuple[str, int, int | None]] = {}
    for t in tensors:
        m = _BLOCK.search(t.name)
        if m is not None:
            stack = t.name[: m.start("i") - 1]
            found[t.name] = (stack, int(m["i"]), int(m["j"]) if m["j"] is not None else None)
    stacks = list(dict.fromkeys(s for s, _, _ in found.values()))
    if not stacks:
        example = tensors[0].name if tensors else "?"
        raise ValueError(
            f"`layer_decay`: no block index found in the parameter names of {type(module).__name__} (e.g. "
            f"`{example}`); the rule looks for `<container>.<N>` with container one of "
            f"{', '.join(BLOCK_CONTAINERS)}. Pass `layer_id=` (a callable name -> depth), or give the model a "
            "`layer_id(name)` or timm-style `group_matcher()` method"
        )
    if len(stacks) > 1:
        counts = {s: len({(i, j) for st, i, j in found.values() if st == s}) for s in stacks}
        listed = ", ".join(f"`{s}.<N>` ({n} blocks)" for s, n in counts.items())
        raise ValueError(
            f"`layer_decay`: {type(module).__name__} has separate stacks of blocks: {listed}; their depths do not "
            "form one sequence (encoder and decoder, two towers, a head made of blocks). Pass `layer_id=` (a "
            "callable name -> depth) to number them"
        )
    stack = stacks[0]
    nested = any(j is not None for _, _, j in found.values())
    block_keys = sorted(
        {(i, j) if nested else (i,) for _, i, j in found.values() if not nested or j is not None}
    )
    rank = {key: k + 1 for k, key in enumerate(block_keys)}
    count = len(block_keys)
    if num_layers is not None and num_layers < count:
        raise ValueError(
            f"`num_layers` (L of the layer-decay formula) is {num_layers}, but {type(module).__name__} has {count} "
            f"blocks in `{stack}`: leave it unset to count them, or pass `layer_id=`"
        )
    top = (num_layers if num_layers is not None else count) + 1

    depths: dict[str, int] = {}
    rules: dict[str, str] = {}
    block_rule = f"block of `{stack}`"
    in_block = [
        k for k, t in enumerate(tensors) if t.name in found and (not nested or found[t.name][2] is not None)
    ]
    first, last = in_block[0], in_block[-1]
    for k, t in enumerate(tensors):
        hit = found.get(t.name)
        if hit is not None:
            _, i, j = hit
            if not nested:
                depths[t.name], rules[t.name] = rank[(i,)], block_rule
                continue
            if j is not None:
                depths[t.name], rules[t.name] = rank[(i, j)], block_rule
                continue
            # A tensor of a stage outside its blocks (downsampling): the depth of the block it feeds.
            following = next((n for n in in_block if n > k), None)
            source = tensors[following if following is not None else last].name
            depths[t.name] = rank[(found[source][1], found[source][2])]
            rules[t.name] = "stage (next block)" if following is not None else "stage (last block)"
        elif t.embedding:
            depths[t.name], rules[t.name] = 0, "embedding"
        elif _holds(t.name, stack):
            raise _ambiguous(t.name, f"`{stack}`")
        elif k < first:
            depths[t.name], rules[t.name] = 0, "before the first block"
        elif k > last:
            depths[t.name], rules[t.name] = top, "after the last block"
        else:
            raise ValueError(
                f"`layer_decay`: `{t.name}` comes between the blocks of `{stack}` but belongs to none, so its depth "
                "is unknown; pass `layer_id=` (a callable name -> depth) or move it out of the block sequence"
            )
    shape = f"`{stack}.<N>`" + (" and the blocks of each stage, numbered in one sequence" if nested else "")
    source = (
        f"block index in {shape} ({count} blocks, L = {top - 1}): embeddings and tensors before the first block "
        f"at depth 0, block k at depth k, tensors after the last block at depth {top}"
    )
    return DepthPlan(depths, rules, top - 1, source)
