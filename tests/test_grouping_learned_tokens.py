"""Learned tokens and learned input arrays are embeddings whatever their shape; thin raw projections are not.

One kind, one decision: a class token stored as (C,) (CLIP), (1, C) or (1, 1, C) (BLIP, ViT), a mask embedding
stored as (C,) (wav2vec2) or (1, C) (DINOv2), Perceiver's (N, C) latent array and Reformer's axial position
factor tables (held in a ParameterList) are all embeddings: decayed by default, not decayed with
``exclude_embeddings=True``. A tensor whose name only mentions an embedding (``embed_scale``) is judged by its shape
as before. A raw (1, C) / (C, 1) projection cannot be told from a gain by its shape: it stays in no_decay as
``vector-shaped`` (a documented limitation, settled by ``decay_patterns``).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from lightning_adamw import classify_parameters
from lightning_adamw.param_groups import DECAY, NO_DECAY


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


class Holder(nn.Module):
    """Holds raw parameters of the given shapes under the given names (a class with no telling name)."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.ones(shape)))


TOKENS = {
    "class_embedding": (8,),  # CLIP
    "cls_token": (1, 1, 8),  # ViT, BLIP
    "mask_token": (1, 8),  # DINOv2
    "dist_token": (8,),
    "masked_spec_embed": (8,),  # wav2vec2 / HuBERT
    "mask_emb": (1, 1, 8),  # XLNet
    "pos_embed": (1, 5, 8),
    "register_tokens": (1, 4, 8),
    "latents": (4, 8),  # Perceiver, Flamingo's resampler
    "query_tokens": (1, 32, 8),  # BLIP-2
}


@pytest.mark.parametrize("exclude", [False, True])
def test_every_learned_token_is_an_embedding_whatever_its_shape(exclude: bool) -> None:
    got = reasons(nn.Sequential(nn.Linear(8, 8), Holder(**TOKENS)), exclude_embeddings=exclude)
    expected = (NO_DECAY, "embedding") if exclude else (DECAY, "embedding")
    assert {n: r for n, r in got.items() if n.startswith("1.")} == {f"1.{n}": expected for n in TOKENS}
    assert got["0.weight"] == (DECAY, "weight") and got["0.bias"] == (NO_DECAY, "bias")


def test_a_name_that_only_mentions_an_embedding_is_judged_by_its_shape() -> None:
    got = reasons(Holder(embed_scale=(8,), emb_gain=(1, 1, 8), emb_rel_k=(1, 9, 8), token_mix=(8,)))
    assert got["embed_scale"] == (NO_DECAY, "1-D")  # a gain on the embedding, not an embedding
    assert got["emb_gain"] == (NO_DECAY, "vector-shaped")
    assert got["emb_rel_k"] == (DECAY, "embedding")  # VITS's relative-position table
    assert got["token_mix"] == (NO_DECAY, "1-D")


class PerceiverLikeEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, 8))


class AxialPositionEmbeddings(nn.Module):
    """Reformer's layout: factor tables (4, 1, C) and (1, 4, C) in a ParameterList named ``weights``."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(4, 1, 8)), nn.Parameter(torch.randn(1, 4, 8))]
        )


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = PerceiverLikeEmbeddings()
        self.position_embeddings = AxialPositionEmbeddings()
        self.arrays = Holder(table=(4, 8))  # a raw table under a name that says nothing: a weight
        self.patch_embed = Holder(weight=(8, 12), bias=(8,))  # a raw projection in an embedding module


def test_tables_held_by_embedding_modules_are_embeddings_but_a_projection_there_is_not() -> None:
    got = reasons(Stem(), exclude_embeddings=True)
    assert got["embeddings.latents"] == (NO_DECAY, "embedding")
    assert got["position_embeddings.weights.0"] == (NO_DECAY, "embedding")
    assert got["position_embeddings.weights.1"] == (NO_DECAY, "embedding")
    assert got["arrays.table"] == (DECAY, "weight")
    assert got["patch_embed.weight"] == (DECAY, "weight")
    assert got["patch_embed.bias"] == (NO_DECAY, "bias")


def test_raw_thin_projections_are_vector_shaped_unless_a_pattern_says_otherwise() -> None:
    """Documented limitation: a raw (1, C) / (C, 1) parameter looks exactly like a gain. Inside nn.Linear it is a
    matrix (decayed); as a raw parameter the user's ``decay_patterns`` settles it."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.out_weight = nn.Parameter(torch.randn(1, 16))  # used as F.linear(x, out_weight)
            self.w_g = nn.Parameter(torch.randn(16, 1))  # SwiftFormer's additive-attention vector

    assert reasons(Head())["out_weight"] == (NO_DECAY, "vector-shaped")
    assert reasons(Head())["w_g"] == (NO_DECAY, "vector-shaped")
    got = reasons(Head(), decay_patterns=["out_weight", "w_g"])
    assert got["out_weight"] == (DECAY, "pattern:out_weight")
    assert got["w_g"] == (DECAY, "pattern:w_g")
    assert reasons(nn.Linear(16, 1))["weight"] == (DECAY, "weight")


# ----------------------------------------------------------------------------------------------- transformers

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev extra: pip install -e '.[dev]'"
)
t = transformers
SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
AUDIO = {
    "conv_dim": (8, 8),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
VISION = {"image_size": 16, "patch_size": 8}

MODELS = {
    "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL, **VISION)),
    "blip": lambda: t.BlipVisionModel(t.BlipVisionConfig(**SMALL, **VISION)),
    "wav2vec2": lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(**SMALL, **AUDIO, vocab_size=16)),
    "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**SMALL, **VISION)),
    "reformer": lambda: t.ReformerModel(
        t.ReformerConfig(
            hidden_size=16,
            num_attention_heads=2,
            attention_head_size=8,
            attn_layers=["local"],
            feed_forward_size=32,
            vocab_size=32,
            axial_pos_shape=[4, 4],
            axial_pos_embds_dim=[8, 8],
            max_position_embeddings=16,
        )
    ),
    "perceiver": lambda: t.PerceiverModel(
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
}

# Per model, the learned tokens / arrays by name, with the shape each stores it in.
ARRAYS = {
    "clip": {"embeddings.class_embedding": (16,)},
    "blip": {"embeddings.class_embedding": (1, 1, 16), "embeddings.position_embedding": (1, 5, 16)},
    "wav2vec2": {"masked_spec_embed": (16,)},
    "dinov2": {"embeddings.cls_token": (1, 1, 16), "embeddings.mask_token": (1, 16)},
    "reformer": {
        "embeddings.position_embeddings.weights.0": (4, 1, 8),
        "embeddings.position_embeddings.weights.1": (1, 4, 8),
    },
    "perceiver": {"embeddings.latents": (4, 16)},
}


@functools.cache
def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return MODELS[name]()


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_learned_tokens_are_embeddings_in_every_shape(name: str) -> None:
    model = build(name)
    plain = {d.name: d for d in classify_parameters(model)}
    excluded = {d.name: d for d in classify_parameters(model, exclude_embeddings=True)}
    for tensor, shape in ARRAYS[name].items():
        assert plain[tensor].shape == shape
        assert (plain[tensor].group, plain[tensor].reason) == (DECAY, "embedding"), tensor
        assert (excluded[tensor].group, excluded[tensor].reason) == (NO_DECAY, "embedding"), tensor
    # exclude_embeddings moves exactly the embeddings, and every embedding.
    moved = {n for n in plain if plain[n].group != excluded[n].group}
    assert moved == {n for n, d in plain.items() if d.reason == "embedding"}
    assert moved >= set(ARRAYS[name])


def test_swiftformer_additive_attention_vector_is_vector_shaped() -> None:
    model = t.SwiftFormerModel(t.SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16]))
    w_g = [d for d in classify_parameters(model) if d.name.endswith("attn.w_g")]
    assert w_g and all((d.group, d.reason) == (NO_DECAY, "vector-shaped") and d.shape[1] == 1 for d in w_g)
    forced = classify_parameters(model, decay_patterns="*.attn.w_g")
    assert all(d.group == DECAY for d in forced if d.name.endswith("attn.w_g"))
