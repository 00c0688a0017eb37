"""Depth of every tensor for layer-wise learning-rate decay, and the learning-rate factor it gives.

Layer-wise lr decay (ELECTRA, Clark et al. 2020, sec. 3.3 / appendix; BEiT, Bao et al. 2022, sec. 2.4 "layer-wise
learning rate decay"): a tensor at depth ``d`` trains with ``lr * layer_decay ** (L + 1 - d)``, where ``L`` is the
number of blocks, the embeddings sit at depth 0, block ``k`` (1-based) at depth ``k`` and what follows the last
block (final norm, pooler, head) at ``L + 1``, at the full rate.

The depth comes from, in this order:

1. the ``layer_id`` option, a callable ``name -> depth`` (names as ``named_parameters()`` of the module prints
   them, wrapper attributes left out); ``None`` for a tensor leaves it to the rules below;
2. a hook of the model (with ``use_model_hooks``): a ``layer_id(name)`` method, or timm's
   ``group_matcher(coarse=False)`` (its regexes number the layers the way timm's own layer decay does). The
   outermost module that defines one is used, with names relative to it; tensors outside it are placed around it
   as below;
3. the block index in the name: the first ``<container>.<N>`` component, ``<container>`` one of ``layers``,
   ``layer``, ``blocks``, ``block``, ``h``, ``resblocks``, ``stages``, ``stage``, ``levels``
   (``vit.layers.3.…``, ``bert.encoder.layer.3.…``, ``transformer.h.3.…``). Nested stages
   (``stages.1.layers.2``, ``layers.1.blocks.2``: ConvNeXt, Swin, ResNet) are numbered as one running sequence of
   blocks; a tensor of a stage that is in none of its blocks (a downsampling layer) takes the depth of the block
   that follows it. Blocks are numbered 1..L in index order, counting blocks that hold parameters (frozen ones
   included, so freezing does not shift depths). Two separate stacks (encoder and decoder, two towers) and a
   tensor among the blocks but in none are errors.

A tensor outside the blocks (or outside the hooked module) is placed by its *branch*: the component where its
name leaves the path to the blocks (``final_layer_norm`` in ``model.decoder.final_layer_norm.weight`` beside
``model.decoder.layers``; ``decoder`` in ViTMAE's ``decoder.decoder_embed.weight``). Only the branch's name says
where the branch sits; the names inside it describe its internals (MAE's decoder has an "embed" of its own).

- an embedding layer (a lookup table is an input wherever it is defined: DeBERTa's ``encoder.rel_embeddings``)
  -> 0;
- a branch named as an output (a word ``head``, ``classifier``, ``pooler``, ``final``, ``post``, ``out``,
  ``output``: OPT's ``final_layer_norm`` and ``project_out``, which its decoder defines *before* ``layers``) ->
  ``L + 1``;
- a branch named as an embedding (``embeddings``, ``patch_embed``, ``cls_token``, ``pos_embed``) -> 0 when it is
  registered before the blocks or is a tensor held directly by a module on the path to them, or when it is a
  norm (mBART's ``layernorm_embedding``, defined after ``layers``); a projection with such a name registered
  after the blocks (the reference MAE's root-level ``decoder_embed``) is an error;
- otherwise the registration order: after the last block -> ``L + 1``; before the first -> 0, except a norm
  layer that the module holding the blocks defines before them without a ``pre``/``in``/``input``/``stem`` word:
  wav2vec2's encoder defines ``layer_norm`` before ``layers`` and applies it before them, its stable-layer-norm
  variant defines it in the same place and applies it after the last block, so this is an error; and a tensor
  held directly by a module on the path to the blocks (a root-level temperature: ``named_parameters()`` lists a
  module's own tensors first whatever the forward pass does) is an error.

Every error names the tensor and suggests ``layer_id``, which may return ``None`` for the tensors the automatic rule
should keep placing: ``layer_id=lambda name: 13 if name.startswith("wav2vec2.encoder.layer_norm.") else None``.
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
from lightning_adamw.param_groups.rules import (
    DEFAULT_NORM_CLASS_PATTERN,
    NORM_TYPES,
    is_embedding_layer,
    is_embedding_name,
    is_norm_layer,
    name_words,
)

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
_DEFAULT_NORM_RE = re.compile(DEFAULT_NORM_CLASS_PATTERN)
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


@dataclass(frozen=True)
class _Stack:
    """What the tensors outside the blocks are placed around: the block container (or the hooked module)."""

    path: str
    """Dotted path of the container of the blocks (``model.decoder.layers``), or of the hooked module."""
    first: int
    last: int
    """Positions, in ``named_parameters()`` order, of its first and last tensor."""
    top: int
    """``L + 1``."""
    where: str
    """How messages name it: ``"`model.decoder.layers`"``, ``"`TimmLikeViT` at `backbone`"``."""
    before: str
    after: str
    """Depth rules of the tensors registered before / after it."""


# Words of a name outside the blocks that say where it acts. Output side: heads, poolers, final and post norms,
# output projections (OPT's ``final_layer_norm`` and ``project_out``, DistilBERT's ``pre_classifier``, RWKV's
# ``ln_out``). Input side (only consulted for a norm defined beside the blocks, before them): ``pre_norm``,
# ``norm_in``, ``stem_norm``.
_OUTPUT_WORDS = frozenset({"head", "heads", "classifier", "pooler", "final", "post", "out", "output"})
_INPUT_WORDS = frozenset({"pre", "in", "input", "stem"})


def find_depths(
    module: nn.Module,
    nodes: list[ModuleNode],
    sites: Mapping[int, list[ParamSite]],
    *,
    layer_id: Callable[[str], Any] | None,
    num_layers: int | None,
    use_model_hooks: bool,
    norm_types: tuple[type[nn.Module], ...] = NORM_TYPES,
    norm_name_re: re.Pattern[str] | None = _DEFAULT_NORM_RE,
) -> DepthPlan:
    """Depth of every parameter of ``module`` (see the module docstring for the rules).

    ``layer_id`` may return ``None`` for a tensor: the automatic rule (hooks, then names) places it.
    ``norm_types`` / ``norm_name_re`` say which modules are norm layers (as for the grouping).

    Raises:
        ValueError / TypeError: no depth can be found (no block in any name and no hook: naming ``layer_decay``
            and suggesting ``layer_id=``), a tensor between blocks that is in none, a tensor whose place relative to
            the blocks is unknown (held directly by a module on the path to the blocks, a norm layer defined beside
            the blocks before them, an embedding name after the last block), two separate stacks of blocks, a depth
            that is not an int >= 0 or None, more blocks or a larger depth than ``num_layers`` allows.
    """
    tensors = [
        _Tensor(places[0].name, tuple(dict.fromkeys(s.name for s in places))) for places in sites.values()
    ]
    forced: dict[str, int] = {}
    left: list[str] = []
    if layer_id is not None:
        for t in tensors:
            value = layer_id(t.name)
            if value is None:
                left.append(t.name)
            else:
                forced[t.name] = _check_depth(value, t.name, "the `layer_id` option")
        if not left:
            return _finish(forced, dict.fromkeys(forced, "layer_id"), num_layers, "the `layer_id` option")
    modules = {node.name: node.module for node in nodes}  # a wrapper's node comes first: the wrapped one wins

    def is_norm(m: nn.Module) -> bool:
        return is_norm_layer(m, norm_types, norm_name_re)

    try:
        hooked = _hook_module(nodes) if use_model_hooks else None
        if hooked is not None:
            return _from_hook(hooked, tensors, num_layers, forced, modules, is_norm)
        return _from_names(module, tensors, num_layers, forced, modules, is_norm)
    except ValueError as err:
        if not forced:
            raise
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise ValueError(
            f"`layer_id` returned None for `{left[0]}`{more}, which leaves their depth to the automatic rule: {err}"
        ) from None


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


def _apply_forced(depths: dict[str, int], rules: dict[str, str], forced: Mapping[str, int], top: int) -> None:
    """Depths the ``layer_id`` option gave, over the automatic ones; none may exceed ``top`` (L + 1)."""
    for name, depth in forced.items():
        if depth > top:
            raise ValueError(
                f"the `layer_id` option gave `{name}` the depth {depth}, beyond L + 1 = {top} of the automatic "
                "rule that places the tensors it returned None for: return depths in 0..L + 1, or set `num_layers`"
            )
        depths[name], rules[name] = depth, "layer_id"


def _remedy(subject: str, top: int) -> str:
    return (
        f"pass `layer_id=` returning its depth and None for every other tensor (the automatic rule then places "
        f"them), e.g. `layer_id=lambda name: {top} if name.startswith({subject!r}) else None` ({top} = L + 1: "
        "after the last block, full lr; 0: before the first block)"
    )


def _place(
    t: _Tensor, k: int, stack: _Stack, modules: Mapping[str, nn.Module], is_norm: Callable[[nn.Module], bool]
) -> tuple[int, str]:
    """Depth and depth rule of a tensor outside the blocks; tied tensors: the first of its names that is placed."""
    errors: list[ValueError] = []
    for name in t.names:
        try:
            return _place_name(name, k, stack, modules, is_norm)
        except ValueError as err:
            errors.append(err)
    raise errors[0]


def _place_name(
    name: str, k: int, stack: _Stack, modules: Mapping[str, nn.Module], is_norm: Callable[[nn.Module], bool]
) -> tuple[int, str]:
    """Where a tensor outside the blocks acts, from the *branch*: the component where its name leaves the path to
    the blocks (``final_layer_norm`` in ``model.decoder.final_layer_norm.weight`` beside ``model.decoder.layers``;
    ``decoder`` in ViTMAE's ``decoder.decoder_embed.weight``). Only the branch's own name says where it sits
    relative to the blocks; the names inside it describe its internals (MAE's decoder has its own "embed")."""
    parts = name.split(".")
    path = stack.path.split(".") if stack.path else []
    p = 0
    while p < min(len(parts) - 1, len(path)) and parts[p] == path[p]:
        p += 1
    position = "before" if k < stack.first else "after" if k > stack.last else "between"
    if p >= len(path) or position == "between":
        raise ValueError(
            f"`layer_decay`: `{name}` comes between the blocks of {stack.where} but belongs to none, so its depth "
            "is unknown; pass `layer_id=` (a callable name -> depth) or move it out of the block sequence"
        )
    branch = parts[p]
    branch_path = ".".join(parts[: p + 1])
    # raw: held directly by a module on the path to the blocks (the root, the module that holds the blocks).
    raw = p == len(parts) - 1
    held = None if raw else modules.get(branch_path)
    if held is not None and is_embedding_layer(held):
        # A lookup table of ids is an input wherever it is registered (DeBERTa's encoder.rel_embeddings).
        return 0, "embedding"
    output = bool(name_words(branch) & _OUTPUT_WORDS)
    if is_embedding_name(branch) and not output:
        if raw or position == "before":
            return 0, "embedding"
        if held is not None and is_norm(held):
            # A norm named for the embedding normalizes its output (mBART's decoder defines `layernorm_embedding`
            # after `layers` and applies it to the embeddings).
            return 0, "embedding"
        subject = f"{branch_path}."
        raise ValueError(
            f"`layer_decay`: `{name}` is named like an input embedding (`{branch}`) but is registered after the last "
            f"block of {stack.where}: an input embedding defined late belongs at depth 0, a projection into a "
            f"decoder after the blocks (MAE's `decoder_embed`) at {stack.top}, and which one it is is unknown; "
            + _remedy(subject, stack.top)
        )
    if raw:
        if output:
            return stack.top, "final/head name"
        raise ValueError(
            f"`layer_decay`: `{name}` belongs to a module that also holds {stack.where}, so whether it acts before "
            "or after the blocks is unknown (`named_parameters()` lists a module's own tensors first, whatever the "
            "forward pass does); give it an embedding name if it is one (`*_embed`, `*_token`), or "
            + _remedy(name, stack.top)
        )
    if position == "after":
        return stack.top, stack.after
    if output:
        return stack.top, "final/head name"  # a final norm or head defined before the blocks (OPT)
    beside = p == len(path) - 1
    if beside and held is not None and is_norm(held) and not name_words(branch) & _INPUT_WORDS:
        # The module that runs the blocks applies its other layers around the loop in any order, whatever order
        # it defines them in: wav2vec2's encoder defines `layer_norm` before `layers` and applies it before them,
        # its stable-layer-norm variant defines it in the same place and applies it after the last block.
        holder = ".".join(path[:-1])
        raise ValueError(
            f"`layer_decay`: `{name}` belongs to the norm layer `{branch_path}` ({type(held).__name__}), which "
            f"{f'`{holder}`' if holder else 'the root module'} defines before its blocks {stack.where}: whether its "
            "forward applies it before the first block (depth 0) or after the last one (a final norm defined "
            f"first, depth {stack.top}) is unknown; name it `final_*` or `pre_*`, or "
            + _remedy(f"{branch_path}.", stack.top)
        )
    return 0, stack.before


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


def _from_hook(
    node: ModuleNode,
    tensors: list[_Tensor],
    num_layers: int | None,
    forced: Mapping[str, int],
    modules: Mapping[str, nn.Module],
    is_norm: Callable[[nn.Module], bool],
) -> DepthPlan:
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
            if t.name not in forced
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
    top = max(depths.values(), default=0)
    positions = {t.name: k for k, t in enumerate(tensors)}
    stack = _Stack(
        node.name,
        min(positions[t.name] for t in inside),
        max(positions[t.name] for t in inside),
        top,
        where,
        f"before {where}",
        f"after {where}",
    )
    for k, t in enumerate(tensors):
        if t.name in depths or t.name in forced:
            continue
        depths[t.name], rules[t.name] = _place(t, k, stack, modules, is_norm)
    _apply_forced(depths, rules, forced, top)
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


def _from_names(
    module: nn.Module,
    tensors: list[_Tensor],
    num_layers: int | None,
    forced: Mapping[str, int],
    modules: Mapping[str, nn.Module],
    is_norm: Callable[[nn.Module], bool],
) -> DepthPlan:
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
    outside = _Stack(
        stack, in_block[0], in_block[-1], top, f"`{stack}`", "before the first block", "after the last block"
    )
    for k, t in enumerate(tensors):
        if t.name in forced:
            continue
        hit = found.get(t.name)
        if hit is None:
            depths[t.name], rules[t.name] = _place(t, k, outside, modules, is_norm)
            continue
        _, i, j = hit
        if not nested:
            depths[t.name], rules[t.name] = rank[(i,)], block_rule
        elif j is not None:
            depths[t.name], rules[t.name] = rank[(i, j)], block_rule
        else:
            # A tensor of a stage outside its blocks (downsampling): the depth of the block it feeds.
            following = next((n for n in in_block if n > k), None)
            source = tensors[following if following is not None else in_block[-1]].name
            depths[t.name] = rank[(found[source][1], found[source][2])]
            rules[t.name] = "stage (next block)" if following is not None else "stage (last block)"
    _apply_forced(depths, rules, forced, top)
    shape = f"`{stack}.<N>`" + (" and the blocks of each stage, numbered in one sequence" if nested else "")
    source = (
        f"block index in {shape} ({count} blocks, L = {top - 1}): embeddings and tensors before the first block "
        f"at depth 0, block k at depth k, final norms, heads and tensors after the last block at depth {top}"
    )
    return DepthPlan(depths, rules, top - 1, source)
