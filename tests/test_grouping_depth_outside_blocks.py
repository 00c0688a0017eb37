"""Layer decay: where the tensors outside the blocks go, when ``named_parameters()`` order is not forward order.

A tensor outside the block stack is placed by the name of its *branch*, the component where its name leaves the
path to the blocks: an embedding (layer or name) at depth 0, a final norm / head / output projection (``final_*``,
``post_*``, ``*_out``, ``head``, ``classifier``, ``pooler``) at L + 1 wherever it is defined; otherwise by
registration order. Where neither settles it (a norm that the module holding the blocks defines before them,
as wav2vec2 does for a norm it applies before *or*, in its stable-layer-norm variant, after the blocks; a
projection named "embed" registered after the last block), it is an error naming the tensor and ``layer_id``,
and ``layer_id`` may return None for the tensors the automatic rule should keep placing.

Expected depths are written by hand from each architecture (its forward pass), independently of the rule.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters

LR = 1e-3


def depths(model: nn.Module, **options) -> dict[str, int]:
    return {
        d.name: d.depth for d in classify_parameters(model, layer_decay=0.5, include_frozen=True, **options)
    }


# ----------------------------------------------------------------------------------------------- hand-written


class OPTLikeDecoder(nn.Module):
    """Attribute order of transformers' OPTDecoder: the final norm and both projections before the layers."""

    def __init__(self, dim: int = 8, depth: int = 4, proj: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, proj)
        self.project_out = nn.Linear(dim, proj, bias=False)  # applied after the layers
        self.project_in = nn.Linear(proj, dim, bias=False)  # applied before them
        self.final_layer_norm = nn.LayerNorm(dim)  # applied after the last layer
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.project_in(self.embed_tokens(ids))
        for layer in self.layers:
            h = layer(h)
        return self.project_out(self.final_layer_norm(h))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = OPTLikeDecoder()
        self.lm_head = nn.Linear(4, 50, bias=False)


def test_a_final_norm_and_output_projection_defined_before_the_blocks_get_the_full_rate() -> None:
    d = depths(LM())
    assert d["decoder.embed_tokens.weight"] == 0 and d["decoder.project_in.weight"] == 0
    assert d["decoder.layers.0.weight"] == 1 and d["decoder.layers.3.bias"] == 4
    assert d["decoder.final_layer_norm.weight"] == d["decoder.final_layer_norm.bias"] == 5
    assert d["decoder.project_out.weight"] == 5 and d["lm_head.weight"] == 5
    groups = build_param_groups(LM(), 0.1, layer_decay=0.5, lr=LR)
    lrs = {n: g["lr"] for g in groups for n, _ in g["params"]}
    assert lrs["decoder.final_layer_norm.weight"] == LR and lrs["decoder.embed_tokens.weight"] == LR * 0.5**5


class Encoder(nn.Module):
    """wav2vec2's encoder layout: `layer_norm` is defined before `layers`; `stable` applies it after them."""

    def __init__(self, stable: bool, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.stable = stable
        self.pos_conv_embed = nn.Conv1d(dim, dim, 3, padding=1)
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv_embed(x.transpose(1, 2)).transpose(1, 2)
        if not self.stable:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.stable else x


class Speech(nn.Module):
    def __init__(self, stable: bool) -> None:
        super().__init__()
        self.feature_projection = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))  # a stem: before, by order
        self.encoder = Encoder(stable)
        self.lm_head = nn.Linear(8, 5)


@pytest.mark.parametrize("stable", [False, True])
def test_a_norm_defined_beside_the_blocks_before_them_is_an_error_settled_by_layer_id(stable: bool) -> None:
    # Same names, same registration order, different forward: no rule can tell the two apart.
    with pytest.raises(
        ValueError,
        match=r"`encoder.layer_norm.weight` belongs to the norm layer `encoder.layer_norm` \(LayerNorm\), which "
        r"`encoder` defines before its blocks `encoder.layers`.* `layer_id=lambda name: 3 if "
        r"name.startswith\('encoder.layer_norm.'\) else None`",
    ):
        classify_parameters(Speech(stable), layer_decay=0.5)
    depth = 3 if stable else 0
    d = depths(Speech(stable), layer_id=lambda n: depth if n.startswith("encoder.layer_norm.") else None)
    assert d["encoder.layer_norm.weight"] == d["encoder.layer_norm.bias"] == depth
    assert d["feature_projection.0.weight"] == 0 and d["feature_projection.1.weight"] == 0
    assert d["encoder.pos_conv_embed.weight"] == 0
    assert (
        d["encoder.layers.0.weight"] == 1 and d["encoder.layers.1.weight"] == 2 and d["lm_head.weight"] == 3
    )
    rule = {
        x.name: x.depth_rule
        for x in classify_parameters(
            Speech(stable), layer_decay=0.5, layer_id=lambda n: depth if "layer_norm" in n else None
        )
    }
    assert (
        rule["encoder.layer_norm.weight"] == "layer_id" and rule["lm_head.weight"] == "after the last block"
    )


@pytest.mark.parametrize("name", ["pre_norm", "norm_in", "stem_norm", "final_norm", "post_norm", "norm_out"])
def test_a_norm_named_for_its_side_is_placed_by_its_name(name: str) -> None:
    model = Speech(stable=False)
    model.encoder.add_module(name, nn.LayerNorm(8))
    del model.encoder.layer_norm
    # add_module appends: move the norm before the layers, where the name alone must place it.
    layers = model.encoder._modules.pop("layers")
    model.encoder.add_module("layers", layers)
    expected = 0 if name.startswith(("pre", "stem")) or name.endswith("in") else 3
    assert depths(model)[f"encoder.{name}.weight"] == expected


def test_layer_id_returning_none_leaves_the_rest_to_the_automatic_rule_and_is_checked() -> None:
    with pytest.raises(ValueError, match=r"gave `lm_head.weight` the depth 9, beyond L \+ 1 = 5"):
        depths(LM(), layer_id=lambda n: 9 if n.startswith("lm_head") else None)
    with pytest.raises(
        ValueError, match=r"`layer_id` returned None for `decoder.weight` and 1 more.*no block index found"
    ):
        classify_parameters(
            nn.ModuleDict({"decoder": nn.Linear(2, 2), "head": nn.Linear(2, 2)}),
            layer_decay=0.5,
            layer_id=lambda n: 1 if n.startswith("head") else None,
        )
    # Every tensor None: the automatic rule alone.
    assert depths(LM(), layer_id=lambda n: None) == depths(LM())


class MAEEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(12, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.norm = nn.LayerNorm(8)


class MAEDecoder(nn.Module):
    """Runs after the encoder: its `decoder_embed` projects into the decoder's width, its `mask_token` fills in."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(8, 4)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.decoder_layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.decoder_pred = nn.Linear(4, 12)


class MAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = MAEEncoder()
        self.decoder = MAEDecoder()


def test_everything_in_a_branch_after_the_blocks_is_after_them_whatever_its_inner_names() -> None:
    d = depths(MAE())
    assert d["encoder.patch_embed.weight"] == 0 and d["encoder.blocks.1.weight"] == 2
    after = [n for n in d if n.startswith(("encoder.norm", "decoder."))]
    assert "decoder.decoder_embed.weight" in after and "decoder.mask_token" in after
    assert {d[n] for n in after} == {3}


def test_an_embedding_name_registered_after_the_blocks_beside_them_is_an_error() -> None:
    """The reference MAE code holds everything at the root: `decoder_embed` comes after `blocks`."""
    model = MAEEncoder()
    model.decoder_embed = nn.Linear(8, 4)
    with pytest.raises(
        ValueError,
        match=r"`decoder_embed.weight` is named like an input embedding \(`decoder_embed`\) but is registered "
        r"after the last block of `blocks`.*layer_id=lambda name: 3 if name.startswith\('decoder_embed.'\)",
    ):
        classify_parameters(model, layer_decay=0.5)
    # A raw token at the root has no order at all: its embedding name places it at depth 0 (BEiT's mask token).
    del model.decoder_embed
    model.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
    assert depths(model)["mask_token"] == 0


def test_lookup_tables_and_embedding_norms_registered_after_the_blocks_stay_inputs() -> None:
    """DeBERTa's encoder defines its relative-position table after `layer`; mBART's decoder defines
    `layernorm_embedding` after `layers`: both act on the inputs of the blocks."""
    model = MAEEncoder()
    model.rel_embeddings = nn.Embedding(8, 8)
    model.layernorm_embedding = nn.LayerNorm(8)
    d = depths(model)
    assert d["rel_embeddings.weight"] == 0 and d["layernorm_embedding.weight"] == 0 and d["norm.weight"] == 3


def test_a_head_defined_before_the_blocks_gets_the_full_rate_and_a_plain_stem_depth_zero() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.conv1 = nn.Conv2d(3, 8, 3)  # a stem without a telling name: before, by order
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    d = depths(Net())
    assert d["head.weight"] == 3 and d["conv1.weight"] == 0 and d["blocks.0.weight"] == 1


def test_a_raw_tensor_beside_the_blocks_is_an_error_unless_its_name_places_it() -> None:
    model = MAEEncoder()
    model.logit_scale = nn.Parameter(torch.ones(()))
    with pytest.raises(
        ValueError, match=r"`logit_scale` belongs to a module that also holds `blocks`.*layer_id="
    ):
        classify_parameters(model, layer_decay=0.5)
    del model.logit_scale
    model.head_scale = nn.Parameter(torch.ones(()))
    assert depths(model)["head_scale"] == 3


class Matched(MAEEncoder):
    """A backbone with timm's numbering hook (stem 0, blocks 1..2, final norm with the last block)."""

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}


def test_around_a_hooked_backbone_the_same_placement_applies() -> None:
    class Lit(nn.Module):
        def __init__(self, norm_first: bool = False) -> None:
            super().__init__()
            if norm_first:
                self.norm = nn.LayerNorm(8)  # a norm beside the backbone, defined before it
            self.classifier = nn.Linear(8, 2)  # defined first, applied last
            self.adapter = nn.Linear(12, 12)  # a plain stem before the backbone: depth 0
            self.backbone = Matched()

    # The hook numbers stem 0, blocks 1..2, its final norm 2: the top is 2.
    d = {x.name: (x.depth, x.depth_rule) for x in classify_parameters(Lit(), layer_decay=0.5)}
    assert d["classifier.weight"] == (2, "final/head name")
    assert d["adapter.weight"] == (0, "before `Matched` at `backbone`")
    assert d["backbone.blocks.1.weight"] == (2, "group_matcher()")
    with pytest.raises(
        ValueError, match=r"`norm.weight` belongs to the norm layer `norm` \(LayerNorm\), which the root"
    ):
        classify_parameters(Lit(norm_first=True), layer_decay=0.5)
    d = depths(Lit(norm_first=True), layer_id=lambda n: 2 if n.startswith("norm.") else None)
    assert d["norm.weight"] == 2 and d["backbone.patch_embed.weight"] == 0 and d["backbone.norm.weight"] == 2


# ----------------------------------------------------------------------------------------------- transformers

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev extra: pip install -e '.[dev]'"
)
t = transformers
SMALL = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32}
AUDIO = {
    "conv_dim": (8, 8),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "vocab_size": 16,
}


def by_regex(embed: str, block: str, num_layers: int = 3) -> Callable[[str], int]:
    """0 for names matching ``embed``, k + 1 for block k (``block`` captures k), L + 1 for the rest."""

    def depth(name: str) -> int:
        if re.search(embed, name):
            return 0
        m = re.search(block, name)
        return int(m[1]) + 1 if m else num_layers + 1

    return depth


OPT = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "ffn_dim": 32, "vocab_size": 64}
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[str], int]]] = {
    # OPTDecoder defines final_layer_norm before layers and applies it after them.
    "opt": (
        lambda: t.OPTForCausalLM(t.OPTConfig(**OPT, word_embed_proj_dim=16)),
        by_regex(r"decoder\.embed_", r"decoder\.layers\.(\d+)\."),
    ),
    # OPT-350m: word_embed_proj_dim != hidden_size adds project_in (before) and project_out (after), both defined
    # before the layers; post-norm (no final norm).
    "opt-350m-style": (
        lambda: t.OPTForCausalLM(t.OPTConfig(**OPT, word_embed_proj_dim=8, do_layer_norm_before=False)),
        by_regex(r"decoder\.embed_|project_in", r"decoder\.layers\.(\d+)\."),
    ),
    # ViTMAE for pre-training: the decoder after the encoder (decoder_embed, mask_token included) at L + 1.
    "vit-mae": (
        lambda: t.ViTMAEForPreTraining(
            t.ViTMAEConfig(
                **SMALL,
                image_size=16,
                patch_size=8,
                decoder_hidden_size=8,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=16,
            )
        ),
        by_regex(r"^vit\.embeddings\.", r"^vit\.(?:encoder\.layer|layers)\.(\d+)\."),
    ),
    # mBART's decoder defines layernorm_embedding after the layers and applies it to the embeddings.
    "mbart-causal": (
        lambda: t.MBartForCausalLM(
            t.MBartConfig(
                d_model=16, decoder_layers=3, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64
            )
        ),
        by_regex(r"decoder\.embed_|layernorm_embedding", r"decoder\.layers\.(\d+)\."),
    ),
    "llama": (
        lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, vocab_size=64, num_key_value_heads=1)),
        by_regex(r"embed_tokens", r"model\.layers\.(\d+)\."),
    ),
    "gpt2": (
        lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64)),
        by_regex(r"transformer\.w[tp]e", r"transformer\.h\.(\d+)\."),
    ),
    "dinov2": (
        lambda: t.Dinov2Model(t.Dinov2Config(**SMALL, image_size=16, patch_size=8)),
        by_regex(r"^embeddings\.", r"encoder\.layer\.(\d+)\."),
    ),
    "beit": (
        lambda: t.BeitForImageClassification(
            t.BeitConfig(**SMALL, image_size=16, patch_size=8, use_relative_position_bias=True, num_labels=2)
        ),
        by_regex(r"beit\.embeddings\.", r"beit\.(?:encoder\.layer|layers)\.(\d+)\."),
    ),
    "mamba": (
        lambda: t.MambaForCausalLM(
            t.MambaConfig(hidden_size=16, num_hidden_layers=3, vocab_size=64, state_size=4)
        ),
        by_regex(r"backbone\.embeddings", r"backbone\.layers\.(\d+)\."),
    ),
    "deberta-v2": (
        lambda: t.DebertaV2ForSequenceClassification(
            t.DebertaV2Config(**SMALL, vocab_size=64, relative_attention=True, pos_att_type=["p2c", "c2p"])
        ),
        # The relative-position table is defined after the layers and feeds every one of them: an embedding.
        by_regex(r"embeddings\.|rel_embeddings", r"encoder\.layer\.(\d+)\."),
    ),
}


@functools.cache
def build(family: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return CASES[family][0]()


@pytest.mark.parametrize("family", list(CASES))
def test_transformers_models_get_the_forward_order_depths(family: str) -> None:
    model = build(family)
    expected = CASES[family][1]
    got = {d.name: d.depth for d in classify_parameters(model, layer_decay=0.5, include_frozen=True)}
    assert got == {n: expected(n) for n in got}
    # And the learning rates of the optimizer groups follow: lr * 0.5 ** (L + 1 - depth).
    groups = build_param_groups(model, 0.1, layer_decay=0.5, lr=LR)
    for group in groups:
        for name, _ in group["params"]:
            assert group["lr"] == LR * 0.5 ** (4 - expected(name)), name


def wav2vec2(stable: bool) -> nn.Module:
    extra = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"} if stable else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t.Wav2Vec2ForCTC(t.Wav2Vec2Config(**SMALL, **AUDIO, **extra))


@pytest.mark.parametrize("stable", [False, True])
def test_wav2vec2_encoder_norm_is_an_error_and_layer_id_settles_it(stable: bool) -> None:
    model = wav2vec2(stable)
    with pytest.raises(ValueError, match=r"`wav2vec2.encoder.layer_norm.weight` belongs to the norm layer"):
        classify_parameters(model, layer_decay=0.5)
    norm_depth = 4 if stable else 0  # the stable variant applies it after the last layer
    got = depths(
        model, layer_id=lambda n: norm_depth if n.startswith("wav2vec2.encoder.layer_norm.") else None
    )
    expected = by_regex(
        r"feature_extractor|feature_projection|pos_conv_embed|masked_spec_embed", r"\.layers\.(\d+)\."
    )
    for name, depth in got.items():
        assert depth == (norm_depth if ".encoder.layer_norm." in name else expected(name)), name


def test_encoder_decoder_models_still_ask_for_layer_id() -> None:
    model = t.WhisperForConditionalGeneration(
        t.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, num_mel_bins=8, max_source_positions=8,
            max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"separate stacks of blocks: `model.encoder.layers.<N>`"):
        classify_parameters(model, layer_decay=0.5)
