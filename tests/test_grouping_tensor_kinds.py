"""Rules that see what a tensor is: gains and shifts of any shape, biases of any name, matrices with a side of 1.

The kinds: (1) norm-like affine tensors held by classes not named *Norm* (GRN, LayerScale, temperatures) must
not be decayed, whatever their shape, as long as at most one dimension is larger than 1; (2) weight matrices of
Linear/Conv/Embedding-like layers stay decayed even when one side is 1 (``Linear(C, 1)``); (3) a leaf with "bias"
as a word of its name is a bias whatever its shape; (4) weight-norm and parametrized tensors are classified by
what they stand for.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import DECAY, DEFAULT_MATRIX_CLASS_PATTERN, NO_DECAY


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


class Holder(nn.Module):
    """Holds raw parameters of the given shapes under the given names (a class with no telling name)."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.ones(shape)))


# ----------------------------------------------------------------------------------------------- gains and shifts


class GRN(nn.Module):
    """ConvNeXt-V2 Global Response Normalization, paper style: (1, 1, 1, C) gain and shift, channels last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))


class ChannelsFirstGRN(nn.Module):
    """The same layer written for channels-first input: (1, C, 1, 1) tensors named weight / bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1))


@pytest.mark.parametrize(
    ("name", "shape", "reason"),
    [
        ("gamma", (1, 1, 1, 8), "vector-shaped"),  # GRN, channels last
        ("gamma", (1, 8, 1, 1), "vector-shaped"),  # GRN, channels first
        ("gamma", (8, 1, 1), "vector-shaped"),  # LayerScale of a conv net (C, 1, 1)
        ("gamma", (1, 1, 8), "vector-shaped"),  # LayerScale of a transformer (1, 1, C)
        ("gamma", (8,), "1-D"),  # timm LayerScale
        ("temperature", (), "1-D"),  # CLIP's logit scale
        ("logit_scale", (4, 1, 1), "vector-shaped"),  # Swin-V2 per-head logit scale
        ("scale", (1, 1), "vector-shaped"),
        ("shift", (1, 8, 1), "vector-shaped"),
    ],
)
def test_gains_shifts_scales_and_temperatures_of_any_shape_are_not_decayed(
    name: str, shape: tuple[int, ...], reason: str
) -> None:
    assert reasons(nn.Sequential(nn.Linear(8, 8), Holder(**{name: shape})))[f"1.{name}"] == (NO_DECAY, reason)


def test_both_grn_styles_next_to_decayed_matrices() -> None:
    block = nn.ModuleDict(
        {
            "dw": nn.Conv2d(8, 8, 7, groups=8),
            "pw": nn.Linear(8, 32),
            "grn": GRN(32),
            "grn_cf": ChannelsFirstGRN(32),
        }
    )
    assert reasons(block) == {
        "dw.weight": (DECAY, "weight"),
        "dw.bias": (NO_DECAY, "bias"),
        "pw.weight": (DECAY, "weight"),
        "pw.bias": (NO_DECAY, "bias"),
        "grn.gamma": (NO_DECAY, "vector-shaped"),
        "grn.beta": (NO_DECAY, "vector-shaped"),
        "grn_cf.weight": (NO_DECAY, "vector-shaped"),
        "grn_cf.bias": (NO_DECAY, "bias"),
    }
    table = describe_param_groups(block, 0.1)
    assert any("vector-shaped" in line and "grn.gamma" in line for line in table.splitlines())


def test_a_raw_tensor_with_two_real_dimensions_is_still_a_weight() -> None:
    assert reasons(Holder(table=(4, 8), cube=(1, 4, 8)))["table"] == (DECAY, "weight")
    assert reasons(Holder(table=(4, 8), cube=(1, 4, 8)))["cube"] == (DECAY, "weight")


# ----------------------------------------------------------------------------------------------- thin matrices


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(8, 1),  # (1, 8): a regression / one-label head
        nn.Linear(1, 8),  # (8, 1)
        nn.Linear(1, 1),
        nn.Bilinear(8, 8, 1),
        nn.Conv1d(8, 1, 1),
        nn.Conv2d(8, 1, 1),  # (1, 8, 1, 1)
        nn.Conv3d(8, 1, 1),
        nn.ConvTranspose2d(8, 1, 1),  # (8, 1, 1, 1)
        nn.ConvTranspose1d(1, 8, 1),
        nn.Conv2d(8, 8, 1, groups=8),  # depthwise 1x1: (8, 1, 1, 1)
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise 3x3: (8, 1, 3, 3)
        nn.LSTM(1, 4),  # weight_ih_l0 (16, 1)
        nn.GRUCell(1, 4),
    ],
    ids=lambda m: repr(m).split("\n")[0],
)
def test_weight_matrices_with_a_side_of_one_stay_decayed(layer: nn.Module) -> None:
    got = reasons(layer)
    weights = {n: r for n, r in got.items() if "weight" in n}
    assert weights and all(r == (DECAY, "weight") for r in weights.values()), got
    assert all(r == (NO_DECAY, "bias") for n, r in got.items() if "bias" in n)


def test_embedding_with_one_dimension_stays_an_embedding() -> None:
    assert reasons(nn.Embedding(1, 8)) == {"weight": (DECAY, "embedding")}
    assert reasons(nn.Embedding(10, 1)) == {"weight": (DECAY, "embedding")}


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer with a transposed (in, out) weight, not an nn.Linear."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class ColumnParallelLinear(Conv1D):
    pass


class Linear8bitLt(Conv1D):
    pass


class ConvNextV2GRN(ChannelsFirstGRN):
    """A norm-like block whose model prefix contains "Conv": not a conv layer."""


def test_third_party_matrix_layers_recognised_by_class_name() -> None:
    got = reasons(
        nn.ModuleDict(
            {
                "c_proj": Conv1D(1, 8),  # (8, 1)
                "tp": ColumnParallelLinear(1, 8),
                "q8": Linear8bitLt(1, 8),
                "grn": ConvNextV2GRN(8),
            }
        )
    )
    assert got["c_proj.weight"] == got["tp.weight"] == got["q8.weight"] == (DECAY, "weight")
    assert got["grn.weight"] == (NO_DECAY, "vector-shaped")


def test_matrix_class_pattern_matches_layer_kinds_only() -> None:
    import re

    rule = re.compile(DEFAULT_MATRIX_CLASS_PATTERN)
    for cls in [
        "Conv1D",
        "Conv2d",
        "StdConv2dSame",
        "ConvTranspose2d",
        "Linear",
        "ColumnParallelLinear",
        "RowParallelLinear",
        "Linear8bitLt",
        "Linear4bit",
        "Dense",
        "DenseGeneral",
        "VocabParallelEmbedding",
        "EmbeddingBag",
    ]:
        assert rule.search(cls), cls
    for cls in [
        "ConvNextV2GRN",
        "LinearAttention",
        "ConvNextLayer",
        "DenseBlock",
        "EmbeddingsProjector",
        "GRN",
    ]:
        assert not rule.search(cls), cls


# ----------------------------------------------------------------------------------------------- biases


@pytest.mark.parametrize(
    ("leaf", "shape"),
    [
        ("bias", (8,)),
        ("in_proj_bias", (24,)),
        ("bias_k", (1, 1, 8)),
        ("bias_v", (1, 1, 8)),
        ("q_bias", (8,)),
        ("relative_position_bias_table", (9, 2)),  # Swin / BEiT: (positions, heads), a 2-D learned table
        ("attention_biases", (2, 16)),  # LeViT
        ("rel_pos_bias", (2, 7, 7)),
        ("logit_bias", (1, 10)),
        ("biasK", (1, 1, 8)),
        ("pos_bias2", (4, 4)),
    ],
)
def test_a_leaf_with_bias_as_a_word_is_a_bias_whatever_its_shape(leaf: str, shape: tuple[int, ...]) -> None:
    assert reasons(nn.Sequential(nn.Linear(2, 2), Holder(**{leaf: shape})))[f"1.{leaf}"] == (NO_DECAY, "bias")


@pytest.mark.parametrize("leaf", ["unbiased", "biased_weight", "biasing", "debias_matrix"])
def test_bias_must_be_a_whole_word(leaf: str) -> None:
    assert reasons(Holder(**{leaf: (4, 4)}))[leaf] == (DECAY, "weight")


def test_multihead_attention_bias_kv_and_projections() -> None:
    got = reasons(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert got == {
        "in_proj_weight": (DECAY, "weight"),
        "in_proj_bias": (NO_DECAY, "bias"),
        "bias_k": (NO_DECAY, "bias"),
        "bias_v": (NO_DECAY, "bias"),
        "out_proj.weight": (DECAY, "weight"),
        "out_proj.bias": (NO_DECAY, "bias"),
    }
    separate = reasons(nn.MultiheadAttention(8, 2, kdim=1, vdim=1))  # k/v projections of shape (8, 1)
    assert separate["k_proj_weight"] == separate["v_proj_weight"] == (DECAY, "weight")


class T5Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8, bias=False)
        self.relative_attention_bias = nn.Embedding(32, 2)  # a learned bias added to attention scores
        self.bias_proj = nn.Linear(8, 2)  # a projection that computes a bias: a matrix, decayed


def test_embedding_table_under_a_bias_name_is_a_bias_but_a_projection_is_not() -> None:
    got = reasons(T5Attention())
    assert got["relative_attention_bias.weight"] == (NO_DECAY, "bias")
    assert got["bias_proj.weight"] == (DECAY, "weight")
    assert got["bias_proj.bias"] == (NO_DECAY, "bias")


# ----------------------------------------------------------------------------------------------- learned tokens


def test_learned_tokens_are_embeddings_before_the_vector_rule() -> None:
    tokens = Holder(
        cls_token=(1, 1, 8),
        mask_token=(1, 8),
        register_tokens=(1, 4, 8),
        query_tokens=(1, 32, 8),
        tokens=(4, 8),
    )
    assert set(reasons(tokens).values()) == {(DECAY, "embedding")}
    assert set(reasons(tokens, exclude_embeddings=True).values()) == {(NO_DECAY, "embedding")}


# ----------------------------------------------------------------------------------------------- weight norm


def test_parametrized_weight_norm_gain_and_direction() -> None:
    head = nn.utils.parametrizations.weight_norm(nn.Linear(8, 1))  # g (1, 1), v (1, 8)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))  # g (4, 1, 1, 1), v (4, 3, 3, 3)
    got = reasons(nn.ModuleDict({"head": head, "conv": conv}))
    for layer in ("head", "conv"):
        assert got[f"{layer}.parametrizations.weight.original0"] == (NO_DECAY, "vector-shaped")
        assert got[f"{layer}.parametrizations.weight.original1"] == (DECAY, "weight")
        assert got[f"{layer}.bias"] == (NO_DECAY, "bias")


def test_old_style_weight_norm_and_spectral_norm() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old-style helper
        wn = nn.utils.weight_norm(nn.Conv2d(3, 1, 3))  # weight_g (1, 1, 1, 1), weight_v (1, 3, 3, 3)
    sn = nn.utils.spectral_norm(nn.Linear(8, 1))  # weight_orig (1, 8)
    got = reasons(nn.ModuleDict({"wn": wn, "sn": sn}))
    assert got["wn.weight_g"] == (NO_DECAY, "vector-shaped")
    assert got["wn.weight_v"] == (DECAY, "weight")
    assert got["sn.weight_orig"] == (DECAY, "weight")


def test_other_parametrizations_stand_for_the_layer_tensor() -> None:
    thin = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 1))  # original (1, 8)
    ortho = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    norm = nn.LayerNorm(4)
    nn.utils.parametrize.register_parametrization(norm, "weight", nn.Identity())
    nn.utils.parametrize.register_parametrization(thin, "bias", nn.Identity())
    got = reasons(nn.ModuleDict({"thin": thin, "ortho": ortho, "norm": norm}))
    assert got["thin.parametrizations.weight.original"] == (DECAY, "weight")
    assert got["thin.parametrizations.bias.original"] == (NO_DECAY, "bias")
    assert got["ortho.parametrizations.weight.original"] == (DECAY, "weight")
    assert got["norm.parametrizations.weight.original"][0] == NO_DECAY
    assert got["norm.parametrizations.weight.original"][1].startswith("norm:")


# ----------------------------------------------------------------------------------------------- on real steps


def test_adamw_decays_exactly_the_matrices_and_leaves_gains_alone() -> None:
    """With zero gradients AdamW's step is the decay alone: w <- w (1 - lr wd) in the decay group, w in the other.

    The factor is one float32 multiply per element, so the result must be exact to one rounding (rtol 2**-23).
    """
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "head": nn.Linear(8, 1),
            "conv": nn.Conv2d(8, 1, 1),
            "grn": GRN(8),
            "ls": Holder(gamma=(8, 1, 1)),
            "mha": nn.MultiheadAttention(8, 2, add_bias_kv=True),
        }
    )
    for p in model.parameters():
        nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.5
    optimizer = torch.optim.AdamW(build_param_groups(model, wd), lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = {"head.weight", "conv.weight", "mha.in_proj_weight", "mha.out_proj.weight"}
    for name, p in model.named_parameters():
        factor = 1 - lr * wd if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=2**-23, atol=0, msg=name)
