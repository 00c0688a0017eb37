"""What a tensor is, and which group that puts it in: the per-tensor rules of ``build_param_groups``.

Every rule looks at what the model says about the tensor (its module, its attribute name, its shape, the flags the
model set on it), never at a wrapper's naming. :func:`decide` applies them in order; the first that matches wins.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_adamw.param_groups.names import ParamSite

__all__ = [
    "DECAY",
    "DEFAULT_MATRIX_CLASS_PATTERN",
    "DEFAULT_NORM_CLASS_PATTERN",
    "MATRIX_TYPES",
    "NORM_TYPES",
    "NO_DECAY",
    "ParamDecision",
    "TensorView",
    "decide",
    "is_embedding_layer",
    "is_embedding_name",
    "is_norm_layer",
    "name_words",
    "pattern_matches",
    "tensor_views",
]

DECAY = "decay"
NO_DECAY = "no_decay"

#: torch's own normalization layers. ``_NormBase`` covers BatchNorm*, SyncBatchNorm and InstanceNorm*.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)

#: Class-name rule for norm layers defined outside torch: ``LlamaRMSNorm``, ``T5LayerNorm``,
#: ``LayerNorm2d``, ``BatchNormAct2d``, ``GroupNormAct``, ``FusedRMSNorm``, ``ScaleNorm``, ``FrozenBatchNorm2d``...
#: It matches a name that ends in ``Norm`` (optionally ``1d``/``2d``/``3d``), contains ``NormAct``, or contains
#: one of the well-known norm names. ``Normalize``/``Normal`` do not match.
DEFAULT_NORM_CLASS_PATTERN = r"Norm(?:[123][dD])?$|NormAct|(?:Layer|Batch|Group|Instance|RMS|Scale)Norm"

#: torch layers whose ``*weight*`` tensors are weight matrices (or kernels) whatever their shape: ``Linear(C, 1)``
#: has a (1, C) weight and ``Conv2d(C, 1, 1)`` a (1, C, 1, 1) one, yet both are matrices to decay.
#: ``_ConvNd`` covers every conv and transposed conv; ``RNNBase``/``RNNCellBase`` own ``weight_ih_l0``... (an
#: ``LSTM(1, H)`` has a (4H, 1) input matrix).
MATRIX_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
)

#: Class-name rule for matrix layers defined outside torch: GPT-2's ``Conv1D``, ``ColumnParallelLinear``,
#: ``Linear8bitLt``, ``Linear4bit``, ``StdConv2dSame``, ``DenseGeneral``, ``VocabParallelEmbedding``... The layer
#: kind must end the name (with an optional dimension/variant suffix), so a model-prefixed block such as
#: ``ConvNextV2GRN`` (a norm whose ``weight`` is a (1, 1, 1, C) gain) or ``LinearAttention`` does not match.
DEFAULT_MATRIX_CLASS_PATTERN = (
    r"(?:Linear|Conv|Dense|Embedding)(?:Transpose)?(?:[123][dD])?(?:Same|Bag|General|\d*bit\w*|FP8|Fp8)?$"
)

# Names that say embedding or learned token, anywhere in the name (``patch_embed``, ``embed_tokens``,
# ``word_embeddings_layernorm``, ``emb_rel_k``, ``cls_token``). For a tensor's own leaf name this only says that it
# belongs to an embedding; see ``_EMBEDDING_NOUN`` for the leaf that *is* one.
_EMBEDDING_LEAF = re.compile(r"(?:^|_)(?:embed|embeds|embedding|embeddings|emb)(?:$|_)|(?:^|_)tokens?$")
# A leaf whose last word names an embedding or a learned input array: ViT ``pos_embed``, CLIP ``class_embedding``,
# wav2vec2 ``masked_spec_embed``, XLNet ``mask_emb``, learned tokens (``cls_token``, DeiT ``distillation_token``,
# ``mask_token``, DINOv2 ``register_tokens``, BLIP-2 ``query_tokens``) and Perceiver / Flamingo ``latents`` (a
# learned array of queries, like DETR's ``query_embed`` table). Such a tensor is an embedding whatever its shape
# (CLIP's class embedding is (C,), BLIP's (1, 1, C)), so ``exclude_embeddings`` decides for all of them.
_EMBEDDING_NOUN = re.compile(r"(?:^|_)(?:embed|embeds|embedding|embeddings|emb|tokens?|latents)$")
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
# Embedding tables of libraries that do not subclass nn.Embedding (Megatron's VocabParallelEmbedding, ...).
_EMBEDDING_CLASS = re.compile(r"Embedding(?:Bag)?(?:\d*bit\w*)?$")
# Modules that hold learned input arrays as raw tensors: ViT's ``ViTEmbeddings``, Perceiver's ``PerceiverEmbeddings``
# (its ``latents``), Reformer's ``AxialPositionEmbeddings`` (its ``weights`` list of factor tables).
_EMBEDDINGS_HOLDER_CLASS = re.compile(r"Embeddings$")
_MATRIX_CLASS = re.compile(DEFAULT_MATRIX_CLASS_PATTERN)

# The parametrization that torch.nn.utils.parametrizations.weight_norm registers (private: looked up defensively;
# without it, original0 is treated like the weight it is part of, i.e. decayed with a matrix layer).
_WEIGHT_NORM_PARAMETRIZATION: type | None = getattr(parametrizations, "_WeightNorm", None)

_BIAS_WORDS = frozenset({"bias", "biases"})
# Words of an identifier: runs of capitals (``HTTP``), capitalised or lower-case words; ``_``, ``.`` and digits
# separate words and are dropped.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


@functools.lru_cache(maxsize=8192)
def name_words(name: str) -> frozenset[str]:
    """Lower-cased words of an identifier: ``relative_position_bias_table`` -> {relative, position, bias, table},
    ``biasK`` -> {bias, k}, ``weight_ih_l0`` -> {weight, ih, l}; ``unbiased`` is one word."""
    return frozenset(w.lower() for w in _WORD.findall(name))


@dataclass(frozen=True)
class ParamDecision:
    """Where one parameter goes and why."""

    name: str
    """Parameter name as the user's own module shows it (wrapper attributes left out; first name of a tied one)."""
    group: str
    """``"decay"`` or ``"no_decay"``."""
    reason: str
    """The rule that decided it, e.g. ``"norm:LayerNorm"``, ``"bias"``, ``"vector-shaped"``, ``"pattern:*.gate"``."""
    shape: tuple[int, ...]
    numel: int
    aliases: tuple[str, ...] = ()
    """Other names of the same tensor (tied weights)."""
    frozen: bool = False
    """``requires_grad`` was False when classified (only with ``include_frozen=True``)."""
    depth: int | None = None
    """Layer-decay depth: 0 embeddings, 1..L the blocks, L+1 what follows them (only with ``layer_decay``)."""
    depth_rule: str = ""
    """How ``depth`` was found, e.g. ``"block of `vit.layers`"``, ``"embedding"``, ``"after the last block"``, ``"layer_id"``."""
    lr_scale: float = 1.0
    """Factor on the optimizer's lr: ``layer_decay ** (L + 1 - depth)`` times the matching override's
    ``lr_scale``. 1.0 for a tensor whose ``param._optim`` declares its own absolute ``lr``."""
    override: str | None = None
    """Name of the first ``group_overrides`` entry whose pattern matches the tensor, if any."""
    weight_decay: float | None = None
    """Weight decay set for this tensor alone (an override's ``weight_decay`` or ``param._optim``); ``None``: the
    group's (the ``weight_decay`` option for decay tensors, 0 for no-decay ones)."""
    weight_decay_scale: float = 1.0
    """Factor on the ``weight_decay`` option from an override's ``weight_decay_scale`` (decay tensors only)."""
    declared: tuple[tuple[str, Any], ...] = ()
    """Hyperparameters the model set in ``param._optim`` other than ``weight_decay`` (``lr``, ``betas``, ...), in
    the dict's order: the tensor's group carries exactly these values."""
    subgroup: str = ""
    """What splits the tensor's class further: ``"layer_3"``, ``"embed/backbone"``, ``"declared_0"``; the group
    name is ``<group>/<subgroup>`` (``"decay/layer_3"``), or just ``group`` when empty."""


@dataclass(frozen=True, slots=True)
class TensorView:
    """One site of a tensor, seen through weight-norm / parametrization plumbing.

    ``owner`` and ``leaf`` are the layer and attribute the tensor *stands for*: the ``weight_v`` of an old-style
    ``weight_norm`` and the ``parametrizations.weight.original`` of a parametrized layer stand for that layer's
    ``weight``. ``gain`` marks a weight-norm magnitude (``weight_g``, ``original0`` of ``weight_norm``): a
    per-output-channel gain of shape (out, 1, ...), not a matrix.
    """

    name: str
    owner: nn.Module
    leaf: str
    attr: str
    """Attribute under which ``owner`` sits in its parent (T5's ``relative_attention_bias``)."""
    gain: bool
    holder: nn.Module
    """The module the tensor belongs to: ``owner``, or for a ``ParameterList`` / ``ParameterDict`` the module that
    holds the list (Reformer's ``AxialPositionEmbeddings`` for its ``weights.0``)."""
    holder_attr: str
    """Attribute under which ``holder`` sits in its parent."""


def _view(site: ParamSite) -> TensorView:
    node, leaf = site.node, site.leaf
    owner = node.module
    holder, holder_attr = owner, node.attr
    if isinstance(owner, (nn.ParameterList, nn.ParameterDict)) and node.parent is not None:
        holder, holder_attr = node.parent.module, node.parent.attr
    if isinstance(owner, parametrize.ParametrizationList):
        # layer.parametrizations.<tensor>.original[0|1]: the layer is two levels up, the tensor is the key.
        layer = node.parent.parent if node.parent is not None else None
        if layer is not None:
            gain = (
                leaf == "original0"
                and _WEIGHT_NORM_PARAMETRIZATION is not None
                and isinstance(owner[0], _WEIGHT_NORM_PARAMETRIZATION)
            )
            return TensorView(site.name, layer.module, node.attr, layer.attr, gain, layer.module, layer.attr)
    for hook in owner._forward_pre_hooks.values():
        # Old-style torch.nn.utils.weight_norm / spectral_norm keep their tensors on the layer itself.
        if isinstance(hook, WeightNorm):
            if leaf == f"{hook.name}_g":
                return TensorView(site.name, owner, hook.name, node.attr, True, owner, node.attr)
            if leaf == f"{hook.name}_v":
                return TensorView(site.name, owner, hook.name, node.attr, False, owner, node.attr)
        elif isinstance(hook, SpectralNorm) and leaf == f"{hook.name}_orig":
            return TensorView(site.name, owner, hook.name, node.attr, False, owner, node.attr)
    return TensorView(site.name, owner, leaf, node.attr, False, holder, holder_attr)


def tensor_views(sites: Sequence[ParamSite]) -> list[TensorView]:
    """The :class:`TensorView` of each site of one tensor."""
    return [_view(s) for s in sites]


def is_embedding_layer(owner: nn.Module) -> bool:
    """``nn.Embedding`` / ``nn.EmbeddingBag``, or a class named like one (Megatron's ``VocabParallelEmbedding``)."""
    return isinstance(owner, _EMBEDDING_TYPES) or _EMBEDDING_CLASS.search(type(owner).__name__) is not None


def is_embedding_name(name: str) -> bool:
    """A dotted name with a component that says embedding or learned token (``embeddings``, ``patch_embed``,
    ``embed_tokens``, ``cls_token``, ``pos_embed``, ``latents``)."""
    return any(_EMBEDDING_LEAF.search(part) or _EMBEDDING_NOUN.search(part) for part in name.split("."))


def is_norm_layer(
    module: nn.Module,
    norm_types: tuple[type[nn.Module], ...] = NORM_TYPES,
    norm_name_re: re.Pattern[str] | None = re.compile(DEFAULT_NORM_CLASS_PATTERN),
) -> bool:
    """A normalization layer: one of ``norm_types`` or a class whose name ``norm_name_re`` matches."""
    return isinstance(module, norm_types) or (
        norm_name_re is not None and norm_name_re.search(type(module).__name__) is not None
    )


def _is_learned_array(view: TensorView, shape: tuple[int, ...]) -> bool:
    """A raw tensor that is an embedding or a learned input array, judged by its name or its holder.

    - its leaf's last word names one (``class_embedding``, ``masked_spec_embed``, ``cls_token``, ``latents``):
      whatever its shape;
    - its leaf only mentions one (VITS's ``emb_rel_k`` relative-position table) and it is a table (two or more
      dimensions larger than 1): a vector-shaped ``embed_scale`` is a gain;
    - it is a table held by a module named as embeddings (attribute ``embeddings`` / ``position_embeddings``, or a
      class ending in ``Embeddings``) and is not a layer's weight: Perceiver's ``embeddings.latents``, Reformer's
      axial ``position_embeddings.weights.0`` (a ``ParameterList``).
    """
    if view.gain:
        return False
    if _EMBEDDING_NOUN.search(view.leaf):
        return True
    if sum(s > 1 for s in shape) < 2:
        return False
    if _EMBEDDING_LEAF.search(view.leaf):
        return True
    if "weight" in name_words(view.leaf) or isinstance(view.owner, MATRIX_TYPES):
        return False
    return bool(
        _EMBEDDING_LEAF.search(view.holder_attr)
        or _EMBEDDINGS_HOLDER_CLASS.search(type(view.holder).__name__)
    )


def _is_bias(view: TensorView) -> bool:
    if name_words(view.leaf) & _BIAS_WORDS:
        return True
    # A lookup table of learned biases added to attention scores (T5's ``relative_attention_bias``, an
    # nn.Embedding). Hugging Face's Trainer leaves it undecayed too: it excludes every name containing "bias".
    # Only embedding tables count: a ``bias_proj`` Linear is a projection matrix and is decayed.
    return bool(name_words(view.attr) & _BIAS_WORDS) and is_embedding_layer(view.owner)


def _is_matrix_weight(view: TensorView, matrix_re: re.Pattern[str]) -> bool:
    if view.gain or "weight" not in name_words(view.leaf):
        return False
    return isinstance(view.owner, MATRIX_TYPES) or matrix_re.search(type(view.owner).__name__) is not None


def decide(
    shape: tuple[int, ...],
    views: Sequence[TensorView],
    *,
    declared: tuple[str, str] | None,
    decay_pats: tuple[str, ...],
    no_decay_pats: tuple[str, ...],
    hook_names: set[str],
    hook_keywords: set[tuple[str, str]],
    norm_types: tuple[type[nn.Module], ...],
    norm_name_re: re.Pattern[str] | None,
    exclude_embeddings: bool,
    used_patterns: set[str],
    matrix_re: re.Pattern[str] = _MATRIX_CLASS,
) -> tuple[str, str]:
    """``(group, reason)`` of one tensor from all its views (a tied tensor has several).

    ``declared`` is ``(group, reason)`` of a flag the model set on the tensor itself (``(NO_DECAY,
    "param._no_weight_decay")``, ``(DECAY, "param._optim")`` for a non-zero ``_optim`` weight decay), or ``None``.
    ``hook_keywords`` holds ``(prefix, keyword)`` pairs: a module's ``no_weight_decay_keywords()`` apply to the names
    of its own tensors, relative to it (``prefix`` is its path with a trailing dot, ``""`` for the root).

    Raises:
        ValueError: a ``decay_patterns`` and a ``no_decay_patterns`` pattern both match the tensor.
    """
    names = [v.name for v in views]
    forced = [p for p in decay_pats if any(pattern_matches(p, n) for n in names)]
    excluded = [p for p in no_decay_pats if any(pattern_matches(p, n) for n in names)]
    used_patterns.update(forced, excluded)
    if forced and excluded:
        raise ValueError(
            f"parameter `{names[0]}` is matched by `decay_patterns` {forced[0]!r} and by `no_decay_patterns` "
            f"{excluded[0]!r}: make the patterns disjoint"
        )
    if forced:
        return DECAY, f"pattern:{forced[0]}"
    if excluded:
        return NO_DECAY, f"pattern:{excluded[0]}"

    # What the model declares: its no_weight_decay() hooks, then flags on the tensor itself.
    for n in names:
        hit = n in hook_names or any(fnmatch.fnmatchcase(n, h) for h in hook_names if "*" in h or "?" in h)
        if hit:
            return NO_DECAY, "no_weight_decay()"
        # timm / Swin convention: a keyword is a substring of the names the declaring module itself prints, so a
        # backbone's "proj" does not reach a head's `head_proj` (as its no_weight_decay() names do not either).
        if any(n.startswith(prefix) and k in n[len(prefix) :] for prefix, k in hook_keywords):
            return NO_DECAY, "no_weight_decay_keywords()"
    if declared is not None:
        return declared

    # Norm layers: torch's own types and `extra_norm_types` are trusted whatever the shape (LayerNorm((C, H, W)) has
    # a (C, H, W) elementwise gain). A class matched by its name only is a guess: it is trusted for vector-shaped
    # tensors (gains and shifts), not for a tensor with two or more dimensions larger than 1, which is a matrix the
    # class holds (an AdaLayerNorm's modulation projection, a SpectralNorm-wrapped weight) and goes on to the rules
    # below.
    vector_shaped = sum(s > 1 for s in shape) <= 1
    name_matched: str | None = None
    for v in views:
        cls = type(v.owner)
        if isinstance(v.owner, norm_types):
            return NO_DECAY, f"norm:{cls.__name__}"
        if norm_name_re is not None and norm_name_re.search(cls.__name__):
            if vector_shaped:
                return NO_DECAY, f"norm:{cls.__name__}"
            name_matched = name_matched or cls.__name__

    if any(_is_bias(v) for v in views):
        return NO_DECAY, "bias"

    ndim = len(shape)
    is_embedding = any(is_embedding_layer(v.owner) and not v.gain for v in views) or any(
        _is_learned_array(v, shape) for v in views
    )
    if is_embedding:
        return (NO_DECAY, "embedding") if exclude_embeddings else (DECAY, "embedding")

    # Gains, shifts, scales, temperatures: at most one dimension larger than 1, whatever the class is called
    # (GRN's (1, 1, 1, C), LayerScale's (C, 1, 1), Swin-V2's (heads, 1, 1) logit scale, RWKV's (1, 1, C) time
    # mixes; RWKV's own trainer decays only tensors whose squeezed ndim is >= 2). The weight of a matrix layer
    # is a matrix even when one of its sides is 1 (Linear(C, 1)).
    if ndim <= 1:
        return NO_DECAY, "1-D"
    if vector_shaped and not any(_is_matrix_weight(v, matrix_re) for v in views):
        return NO_DECAY, "vector-shaped"
    return DECAY, f"matrix-in-norm:{name_matched}" if name_matched is not None else "weight"


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob by default (``*`` crosses dots); ``re:`` prefix for a regular expression searched in the name."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)
