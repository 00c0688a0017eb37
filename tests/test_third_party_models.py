"""Grouping on real third-party architectures (Hugging Face transformers, built from tiny configs, no download).

For every family the expectation is written out by hand from the architecture, independently of the rules: a
list of regexes naming the tensors that must not be decayed (norm gains and shifts, biases, layer-scale gains,
temperatures, tensors the model's authors exclude), everything else decayed. The families were picked because
their norms are not named *Norm* (ConvNeXt-V2's GRN), their biases are not named ``bias`` (T5's
``relative_attention_bias`` table, BEiT's ``relative_position_bias_table``), or they hold raw gains and
temperatures of shape (1, 1, C), (heads, 1, 1) or () (RWKV, Swin-V2, CLIP). Classification heads are built with
one label, so ``Linear(C, 1)`` weights of shape (1, C) are there to prove that they stay decayed.

timm cannot be installed beside this torch build (it needs torchvision), so its traits are emulated at the end
by small hand-written modules with timm's class and tensor names and shapes.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters
from lightning_adamw.param_groups import DECAY, NO_DECAY

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev extra: pip install -e '.[dev]'"
)
t = transformers


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    no_decay: tuple[str, ...]
    """Regexes (searched) naming every tensor that must not be decayed; all others must be."""
    norms: dict[str, int] = field(default_factory=dict)
    """How many tensors each norm class must claim (a norm found only by accident, e.g. as 1-D, fails)."""
    thin_matrices: tuple[str, ...] = ()
    """Regexes of weight matrices with a side of 1 (shape (1, C), (C, 1)...) that must exist and be decayed."""


FAMILIES: dict[str, Family] = {
    "llama (RMSNorm LLM, tied)": Family(
        lambda: t.LlamaForCausalLM(
            t.LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        ),
        no_decay=(r"layernorm\.weight$", r"model\.norm\.weight$"),
        norms={"norm:LlamaRMSNorm": 5},
    ),
    "bert (encoder)": Family(
        lambda: t.BertForSequenceClassification(
            t.BertConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=1,
            )
        ),
        no_decay=(r"\.bias$", r"LayerNorm\.weight$"),
        norms={"norm:LayerNorm": 10},
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "t5 (T5LayerNorm, relative attention bias table)": Family(
        lambda: t.T5ForConditionalGeneration(
            t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ),
        # T5 adds a learned per-bucket bias to the attention scores, stored as an nn.Embedding.
        no_decay=(r"layer_norm\.weight$", r"relative_attention_bias\.weight$"),
        norms={"norm:T5LayerNorm": 12},
    ),
    "bart (encoder-decoder)": Family(
        lambda: t.BartForConditionalGeneration(
            t.BartConfig(
                vocab_size=64,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
            )
        ),
        no_decay=(r"\.bias$", r"layer_norm\.weight$", r"layernorm_embedding\.weight$"),
        norms={"norm:LayerNorm": 14},
    ),
    "gpt2 (Conv1D, tied)": Family(
        lambda: t.GPT2LMHeadModel(
            t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        ),
        no_decay=(r"\.bias$", r"\.ln_(?:1|2|f)\.weight$"),
        norms={"norm:LayerNorm": 10},
    ),
    "vit (vision transformer)": Family(
        lambda: t.ViTForImageClassification(
            t.ViTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=32,
                patch_size=8,
                num_labels=1,
            )
        ),
        no_decay=(r"\.bias$", r"layernorm(?:_before|_after)?\.weight$"),
        norms={"norm:LayerNorm": 10},
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "convnext (custom LayerNorm, layer scale)": Family(
        lambda: t.ConvNextForImageClassification(
            t.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=1)
        ),
        no_decay=(
            r"\.bias$",
            r"layernorm\.weight$",
            r"downsampling_layer\.0\.weight$",
            r"layer_scale_parameter$",
        ),
        norms={"norm:ConvNextLayerNorm": 16, "norm:LayerNorm": 2},
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "resnet (CNN with BatchNorm)": Family(
        lambda: t.ResNetForImageClassification(
            t.ResNetConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], embedding_size=8, num_labels=1)
        ),
        no_decay=(r"\.bias$", r"normalization\.weight$"),
        norms={"norm:BatchNorm2d": 32},
        thin_matrices=(r"^classifier\.1\.weight$",),
    ),
    "convnext-v2 (GRN gain and shift of shape (1, 1, 1, C))": Family(
        lambda: t.ConvNextV2ForImageClassification(
            t.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=1)
        ),
        no_decay=(r"\.bias$", r"layernorm\.weight$", r"downsampling_layer\.0\.weight$", r"\.grn\.weight$"),
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "swin-v2 (logit scale (heads, 1, 1), continuous position bias MLP)": Family(
        lambda: t.Swinv2ForImageClassification(
            t.Swinv2Config(
                image_size=32,
                patch_size=4,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=4,
                num_labels=1,
            )
        ),
        # The continuous-position-bias MLP's weights are the matrices of an MLP (the bias it outputs is a
        # buffer-free function of the coordinates), so they are decayed; its own biases are not. Swin-V2's
        # reference code lists "cpb_mlp" in no_weight_decay_keywords(); the Hugging Face port has no such hook
        # (pass no_decay_patterns="*continuous_position_bias_mlp*" to follow the reference recipe).
        no_decay=(r"\.bias$", r"norm\.weight$", r"layernorm(?:_before|_after)?\.weight$", r"\.logit_scale$"),
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "clip (0-d logit scale, 1-D class embedding token)": Family(
        lambda: t.CLIPModel(
            t.CLIPConfig(
                text_config={
                    "vocab_size": 64,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "max_position_embeddings": 16,
                    "bos_token_id": 0,
                    "eos_token_id": 1,
                },
                vision_config={
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 8,
                },
                projection_dim=8,
            )
        ),
        # No decay on gains, biases and the logit scale. The (C,) class embedding is a learned token like BLIP's
        # (1, 1, C) one: an embedding, decayed unless exclude_embeddings=True (OpenCLIP's recipe, which excludes
        # every tensor with ndim < 2, would not decay it; pass no_decay_patterns="*class_embedding" for that).
        no_decay=(
            r"\.bias$",
            r"layer_norm\d?\.weight$",
            r"layrnorm\.weight$",
            r"layernorm\.weight$",
            r"^logit_scale$",
        ),
    ),
    "rwkv (time-mix gains (1, 1, C), time_decay, time_first)": Family(
        lambda: t.RwkvForCausalLM(
            t.RwkvConfig(
                vocab_size=64,
                context_length=16,
                hidden_size=16,
                num_hidden_layers=2,
                attention_hidden_size=16,
                intermediate_size=32,
            )
        ),
        # RWKV's own trainer decays only tensors with two or more non-trivial dimensions.
        no_decay=(
            r"\.bias$",
            r"(?:pre_ln|ln1|ln2|ln_out)\.weight$",
            r"\.time_mix_\w+$",
            r"\.time_decay$",
            r"\.time_first$",
        ),
    ),
    "beit (layer scale lambda_1/2, relative position bias table)": Family(
        lambda: t.BeitForImageClassification(
            t.BeitConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=16,
                patch_size=8,
                use_relative_position_bias=True,
                layer_scale_init_value=0.1,
                num_labels=1,
            )
        ),
        no_decay=(r"\.bias$", r"layernorm(?:_before|_after)?\.weight$", r"\.lambda_[12]$", r"bias_table$"),
        thin_matrices=(r"^classifier\.weight$",),
    ),
    "deit (cls and distillation tokens, two one-label heads)": Family(
        lambda: t.DeiTForImageClassificationWithTeacher(
            t.DeiTConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=16,
                patch_size=8,
                num_labels=1,
            )
        ),
        # Learned tokens and position embeddings are embeddings: decayed unless exclude_embeddings=True.
        no_decay=(r"\.bias$", r"layernorm(?:_before|_after)?\.weight$"),
        thin_matrices=(r"^cls_classifier\.weight$", r"^distillation_classifier\.weight$"),
    ),
    "dinov2 with registers (layer scale lambda1, register tokens)": Family(
        lambda: t.Dinov2WithRegistersModel(
            t.Dinov2WithRegistersConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                mlp_ratio=2,
                image_size=16,
                patch_size=8,
                num_register_tokens=2,
            )
        ),
        no_decay=(r"\.bias$", r"norm\d?\.weight$", r"\.lambda1$"),
    ),
    "mamba (A_log, D, dt_proj of rank 1)": Family(
        lambda: t.MambaForCausalLM(
            t.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
        ),
        # transformers' MambaMixer does not flag A_log / D with `_no_weight_decay` (the reference mamba_ssm code
        # does): D is 1-D and not decayed, A_log is a 2-D (d_inner, d_state) table and is decayed like any matrix
        # unless the user adds no_decay_patterns="*.A_log" (checked below). dt_proj is a Linear(1, d_inner) here.
        no_decay=(r"\.bias$", r"norm(?:_f)?\.weight$", r"\.D$"),
        thin_matrices=(r"dt_proj\.weight$",),
    ),
    "falcon (parallel attention, no biases)": Family(
        lambda: t.FalconForCausalLM(
            t.FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        ),
        no_decay=(r"\.bias$", r"layernorm\.weight$", r"ln_f\.weight$"),
    ),
    "gpt-neox": Family(
        lambda: t.GPTNeoXForCausalLM(
            t.GPTNeoXConfig(
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
        ),
        no_decay=(r"\.bias$", r"layernorm\.weight$", r"final_layer_norm\.weight$"),
    ),
    "perceiver (learned latents)": Family(
        lambda: t.PerceiverModel(
            t.PerceiverConfig(
                num_latents=4,
                d_latents=16,
                d_model=8,
                num_blocks=1,
                num_self_attends_per_block=1,
                num_self_attention_heads=2,
                num_cross_attention_heads=1,
                qk_channels=8,
                v_channels=8,
            )
        ),
        # The latent array is a (num_latents, d_latents) array of learned queries, an embedding: decayed unless
        # exclude_embeddings=True (test_learned_tokens_and_arrays_follow_exclude_embeddings).
        no_decay=(r"\.bias$", r"layernorm\d?\.weight$"),
    ),
}


@functools.cache
def build(family: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return FAMILIES[family].build()


def expected_group(family: str, name: str) -> str:
    return NO_DECAY if any(re.search(p, name) for p in FAMILIES[family].no_decay) else DECAY


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_tensor_in_the_wrong_group(family: str) -> None:
    model = build(family)
    spec = FAMILIES[family]
    decisions = classify_parameters(model)
    # One decision per distinct tensor, in named_parameters() order and under the names it prints.
    assert [d.name for d in decisions] == [n for n, p in model.named_parameters() if p.requires_grad]
    wrong = [
        (d.name, d.shape, d.group, d.reason) for d in decisions if d.group != expected_group(family, d.name)
    ]
    assert wrong == []
    claimed = Counter(d.reason for d in decisions if d.reason.startswith("norm:"))
    if spec.norms:
        assert dict(claimed) == spec.norms
    by_name = {d.name: d for d in decisions}
    for pattern in spec.thin_matrices:
        thin = [d for n, d in by_name.items() if re.search(pattern, n)]
        assert thin, pattern
        for d in thin:
            assert min(d.shape) == 1 and (d.group, d.reason) == (DECAY, "weight"), d
    # Every trainable tensor in exactly one group, tied ones once.
    groups = build_param_groups(model, 0.1)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters() if p.requires_grad})


def test_tied_head_of_llama_and_gpt2_is_grouped_once_as_embedding() -> None:
    for family in ("llama (RMSNorm LLM, tied)", "gpt2 (Conv1D, tied)"):
        decisions = {d.name: d for d in classify_parameters(build(family))}
        embed = next(d for d in decisions.values() if "lm_head.weight" in d.aliases)
        assert embed.reason == "embedding" and embed.group == DECAY
        excluded = {d.name: d for d in classify_parameters(build(family), exclude_embeddings=True)}
        assert excluded[embed.name].group == NO_DECAY


def test_reasons_name_the_rule_that_saw_each_kind() -> None:
    reasons = {
        d.name: d.reason for d in classify_parameters(build("convnext (custom LayerNorm, layer scale)"))
    }
    assert {r for n, r in reasons.items() if "layer_scale" in n} == {"1-D"}
    reasons = {}
    for family in FAMILIES:
        if family.startswith(("convnext-v2", "swin-v2", "rwkv", "t5")):
            reasons.update({d.name: d.reason for d in classify_parameters(build(family))})
    grn = [r for n, r in reasons.items() if n.endswith("grn.weight")]
    assert grn and set(grn) == {"vector-shaped"}
    assert {r for n, r in reasons.items() if n.endswith("grn.bias")} == {"bias"}
    assert {r for n, r in reasons.items() if n.endswith("logit_scale")} == {"vector-shaped"}
    assert {r for n, r in reasons.items() if ".time_mix_" in n} == {"vector-shaped"}
    assert {r for n, r in reasons.items() if "relative_attention_bias" in n} == {"bias"}


def test_learned_tokens_are_embeddings() -> None:
    for family, tokens in (
        ("deit (cls and distillation tokens, two one-label heads)", ("cls_token", "distillation_token")),
        ("dinov2 with registers (layer scale lambda1, register tokens)", ("cls_token", "register_tokens")),
    ):
        model = build(family)
        by_leaf = {d.name.rsplit(".", 1)[-1]: d for d in classify_parameters(model)}
        assert all(by_leaf[t].reason == "embedding" and by_leaf[t].group == DECAY for t in tokens)
        excluded = {d.name.rsplit(".", 1)[-1]: d for d in classify_parameters(model, exclude_embeddings=True)}
        assert all(excluded[t].group == NO_DECAY for t in tokens)


def test_learned_tokens_and_arrays_follow_exclude_embeddings() -> None:
    """A learned token or input array is an embedding whatever its shape: CLIP's (C,) class embedding, DeiT's
    (1, 1, C) tokens, Perceiver's (N, C) latents; exclude_embeddings moves all of them, and nothing else."""
    families = (
        "clip (0-d logit scale, 1-D class embedding token)",
        "deit (cls and distillation tokens, two one-label heads)",
        "perceiver (learned latents)",
    )
    for family in families:
        model = build(family)
        plain = {d.name: d for d in classify_parameters(model)}
        excluded = {d.name: d for d in classify_parameters(model, exclude_embeddings=True)}
        arrays = [n for n in plain if re.search(r"class_embedding$|_token$|\.latents$", n)]
        assert arrays, family
        for name in arrays:
            assert (plain[name].group, plain[name].reason) == (DECAY, "embedding"), name
            assert (excluded[name].group, excluded[name].reason) == (NO_DECAY, "embedding"), name
        moved = {n for n in plain if plain[n].group != excluded[n].group}
        assert moved == {n for n in plain if plain[n].reason == "embedding"}, family


def test_mamba_a_log_follows_the_reference_recipe_with_a_pattern() -> None:
    model = build("mamba (A_log, D, dt_proj of rank 1)")
    decisions = classify_parameters(model, no_decay_patterns="*.A_log")
    a_log = [d for d in decisions if d.name.endswith("A_log")]
    assert len(a_log) == 2 and all((d.group, d.reason) == (NO_DECAY, "pattern:*.A_log") for d in a_log)


# ----------------------------------------------------------------------------------------------- timm traits
# timm is not installable here (it needs torchvision); these modules copy the names, classes and shapes of timm's
# layers that matter for grouping.


class LayerScale(nn.Module):
    """timm.layers.LayerScale: ``gamma`` of shape (C,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))


class LayerScale2d(nn.Module):
    """timm.layers.LayerScale2d: ``gamma`` of shape (C,), viewed as (C, 1, 1) in forward; the channels-first
    variant of other codebases stores it as (C, 1, 1) directly (the ``gamma_chw`` tensor below)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))
        self.gamma_chw = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))


class GlobalResponseNorm(nn.Module):
    """timm.layers.GlobalResponseNorm (ConvNeXt-V2): ``weight`` and ``bias`` of shape (C,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class TimmBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.grn = GlobalResponseNorm(4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.ls = LayerScale(dim)
        self.ls2d = LayerScale2d(dim)
        self.head = nn.Linear(dim, 1)


def test_timm_style_layer_scale_and_grn() -> None:
    got = {d.name: (d.group, d.reason) for d in classify_parameters(TimmBlock())}
    assert got == {
        "conv_dw.weight": (DECAY, "weight"),
        "conv_dw.bias": (NO_DECAY, "bias"),
        "norm.weight": (NO_DECAY, "norm:LayerNorm"),
        "norm.bias": (NO_DECAY, "norm:LayerNorm"),
        "fc1.weight": (DECAY, "weight"),
        "fc1.bias": (NO_DECAY, "bias"),
        "grn.weight": (NO_DECAY, "norm:GlobalResponseNorm"),
        "grn.bias": (NO_DECAY, "norm:GlobalResponseNorm"),
        "fc2.weight": (DECAY, "weight"),
        "fc2.bias": (NO_DECAY, "bias"),
        "ls.gamma": (NO_DECAY, "1-D"),
        "ls2d.gamma": (NO_DECAY, "1-D"),
        "ls2d.gamma_chw": (NO_DECAY, "vector-shaped"),
        "head.weight": (DECAY, "weight"),
        "head.bias": (NO_DECAY, "bias"),
    }
