"""Layer-wise learning-rate decay in ``build_param_groups``: depths, learning rates, groups, errors.

A tensor at depth ``d`` must train with ``lr * layer_decay ** (L + 1 - d)`` (BEiT / ELECTRA): embeddings at 0, block
``k`` at ``k``, what follows the last block at ``L + 1``. The expected depths below are written out by hand from
each architecture (regexes on its names), independently of the rule in ``param_groups/depth.py``; learning rates
are checked in real optimizer groups and, for the hand-written ViT, through one real AdamW step in float64.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import DECAY, NO_DECAY, apply_lr_scales, matcher_layer_ids

LR = 1e-3


# ----------------------------------------------------------------------------------------------- a ViT by hand


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ v)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))  # LayerScale gain: 1-D, no decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.gamma * self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's names: patch_embed, cls_token, pos_embed, blocks.N, norm, head."""

    def __init__(
        self, depth: int = 3, dim: int = 8, patch: int = 2, image: int = 4, classes: int = 3
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def vit_depth(name: str, num_layers: int = 3) -> int:
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m[1]) + 1 if m else num_layers + 1


def param_names(group: dict) -> list[str]:
    """Names of a group from build_param_groups ((name, tensor) pairs) or of an optimizer's (``param_names``)."""
    return group["param_names"] if "param_names" in group else [n for n, _ in group["params"]]


def lr_by_name(groups: list[dict]) -> dict[str, float]:
    return {n: g["lr"] for g in groups for n in param_names(g)}


def group_of(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in param_names(g)}


def test_vit_like_every_tensor_gets_lr_times_decay_to_the_distance_from_the_head() -> None:
    model = TinyViT()
    groups = build_param_groups(model, 0.05, layer_decay=0.65, lr=LR)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(lr_by_name(groups)) == sorted(names)
    for name, lr in lr_by_name(groups).items():
        assert lr == LR * 0.65 ** (3 + 1 - vit_depth(name)), name
    by_name = group_of(groups)
    for name in names:
        group = by_name[name]
        assert group["layer_depth"] == vit_depth(name)
        expected_class = (
            NO_DECAY if name.endswith("bias") or "norm" in name or name.endswith("gamma") else DECAY
        )
        assert group["name"].split("/")[0] == expected_class, name
        assert group["weight_decay"] == (0.05 if expected_class == DECAY else 0.0)
    assert [g["name"] for g in groups] == [
        "decay/embed",
        "no_decay/embed",
        *(f"{c}/layer_{k}" for k in (1, 2, 3) for c in ("decay", "no_decay")),
        "decay/head",
        "no_decay/head",
    ]


def test_one_real_adamw_step_applies_each_groups_lr_and_decay() -> None:
    torch.manual_seed(0)
    model = TinyViT().double()
    for p in model.parameters():
        nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = build_param_groups(model, 0.1, layer_decay=0.5, lr=LR)
    optimizer = torch.optim.AdamW(groups, lr=LR, eps=1e-8)
    assert len(optimizer.param_groups) == 10
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64)).square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        lr = LR * 0.5 ** (4 - vit_depth(name))
        wd = group_of(optimizer.param_groups)[name]["weight_decay"]
        # First AdamW step: w <- w (1 - lr wd) - lr g / (|g| + eps) (bias corrections make m_hat = g, v_hat = g^2).
        g, w = grads[name], before[name]
        expected = w * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        # float64, a handful of operations per element: error ~1e-15 relative to |w| + lr.
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14, msg=name)


def test_frozen_blocks_do_not_shift_the_depths_of_the_others() -> None:
    model = TinyViT()
    for p in [
        *model.patch_embed.parameters(),
        *model.blocks[0].parameters(),
        model.cls_token,
        model.pos_embed,
    ]:
        p.requires_grad_(False)
    groups = build_param_groups(model, 0.05, layer_decay=0.65, lr=LR)
    lrs = lr_by_name(groups)
    assert "blocks.0.attn.qkv.weight" not in lrs
    for name, lr in lrs.items():
        assert lr == LR * 0.65 ** (4 - vit_depth(name)), name


def test_layer_decay_one_keeps_the_depth_groups_at_the_full_rate_without_lr() -> None:
    groups = build_param_groups(TinyViT(), 0.05, layer_decay=1.0)  # no `lr` needed: every scale is 1
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert "decay/layer_2" in [g["name"] for g in groups]


def test_scales_without_lr_are_refused_and_deferred_scales_are_applied_once() -> None:
    model = TinyViT()
    with pytest.raises(ValueError, match=r"lr_scale .* torch optimizer ignores `lr_scale`: pass `lr=`"):
        build_param_groups(model, 0.05, layer_decay=0.65)
    groups = build_param_groups(model, 0.05, layer_decay=0.65, defer_lr_scale=True)
    assert all("lr" not in g for g in groups)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    assert apply_lr_scales(optimizer) == len(groups)
    assert apply_lr_scales(optimizer) == 0  # marked: never scaled twice
    expected = lr_by_name(build_param_groups(model, 0.05, layer_decay=0.65, lr=LR))
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert group["lr"] == expected[name]


def test_describe_shows_lr_scale_depth_and_the_depth_rule() -> None:
    text = describe_param_groups(TinyViT(), 0.05, layer_decay=0.5)
    header = text.splitlines()[0].split()
    assert header[:8] == ["group", "lr_scale", "weight_decay", "depth", "tensors", "params", "share", "rules"]
    row = next(line.split() for line in text.splitlines() if line.startswith("decay/layer_1 "))
    assert row[1:4] == ["0.125", "0.05", "1"]  # 0.5 ** (3 + 1 - 1)
    assert "block of `blocks`: 39 tensors" in text and "after the last block: 4 tensors" in text
    assert "embedding: 4 tensors" in text  # patch_embed weight and bias, cls_token, pos_embed


# ----------------------------------------------------------------------------------------------- model hooks


class TimmLikeViT(TinyViT):
    """timm's ``group_matcher`` convention: stem at 0, blocks 1..L, the final norm joins the last block (99999)."""

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|pos_embed|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }


def test_timm_group_matcher_numbers_layers_the_way_timm_does() -> None:
    decisions = {d.name: d for d in classify_parameters(TimmLikeViT(), layer_decay=0.5)}
    assert decisions["pos_embed"].depth == 0 and decisions["patch_embed.bias"].depth == 0
    assert decisions["blocks.1.mlp.0.weight"].depth == 2
    assert decisions["norm.weight"].depth == 3  # joins the last block, as in timm
    assert decisions["head.weight"].depth == 4  # unmatched: the top, full rate
    assert decisions["norm.weight"].lr_scale == 0.5 and decisions["head.weight"].lr_scale == 1.0
    assert decisions["head.weight"].depth_rule == "group_matcher()"
    # Without the model's hooks the name rule applies: the final norm is after the last block.
    plain = {d.name: d for d in classify_parameters(TimmLikeViT(), layer_decay=0.5, use_model_hooks=False)}
    assert plain["norm.weight"].depth == 4


def test_matcher_ids_follow_timms_numbering() -> None:
    names = ["cls_token", "blocks.0.a", "blocks.10.a", "blocks.2.a", "norm.weight", "head.weight"]
    matcher = {"stem": r"^cls_token", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}
    # Numeric order (10 after 2), the 99999 suffix joins the previous id, unmatched names come last.
    assert matcher_layer_ids(names, matcher) == {
        "cls_token": 0,
        "blocks.0.a": 1,
        "blocks.2.a": 2,
        "blocks.10.a": 3,
        "norm.weight": 3,
        "head.weight": 4,
    }
    assert matcher_layer_ids(names, lambda n: 0 if n == "cls_token" else 1)["head.weight"] == 1


class Wrapper(nn.Module):
    """A LightningModule-like holder: the hooked backbone is a sub-module, an extra head follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = TimmLikeViT()
        self.extra = nn.Linear(3, 2)


def test_hook_of_a_sub_module_with_names_relative_to_it() -> None:
    decisions = {d.name: d for d in classify_parameters(Wrapper(), layer_decay=0.5)}
    assert decisions["backbone.blocks.0.norm1.weight"].depth == 1
    assert decisions["backbone.head.weight"].depth == 4
    assert decisions["extra.weight"].depth == 4 and decisions["extra.weight"].lr_scale == 1.0
    assert decisions["extra.weight"].depth_rule == "after `TimmLikeViT` at `backbone`"


class LayerIdViT(TinyViT):
    def layer_id(self, name: str) -> int:
        return 0 if not name.startswith(("blocks", "norm", "head")) else 1 if name.startswith("blocks") else 2


def test_layer_id_method_of_the_model() -> None:
    decisions = {d.name: d for d in classify_parameters(LayerIdViT(), layer_decay=0.5)}
    assert decisions["cls_token"].depth == 0 and decisions["blocks.2.attn.qkv.weight"].depth == 1
    assert decisions["head.weight"].depth == 2
    assert decisions["cls_token"].lr_scale == 0.25


def test_layer_id_option_wins_over_hooks_and_names() -> None:
    def depth(name: str) -> int:
        return 0 if name.startswith("blocks.0") else 2

    groups = build_param_groups(TimmLikeViT(), 0.05, layer_decay=0.5, layer_id=depth, lr=LR)
    lrs = lr_by_name(groups)
    assert lrs["blocks.0.attn.qkv.weight"] == LR * 0.25 and lrs["cls_token"] == LR
    # num_layers sets L: depth 2 is then a middle layer (0.5 ** (4 + 1 - 2)).
    groups = build_param_groups(TimmLikeViT(), 0.05, layer_decay=0.5, layer_id=depth, num_layers=4, lr=LR)
    assert lr_by_name(groups)["cls_token"] == LR * 0.5**3
    assert "decay/layer_2" in [g["name"] for g in groups] and "decay/head" not in [g["name"] for g in groups]


@pytest.mark.parametrize(
    ("layer_id", "num_layers", "error", "message"),
    [
        (lambda n: -1, None, ValueError, r"the `layer_id` option gave `cls_token` the depth -1"),
        (lambda n: 1.5, None, TypeError, r"gave `cls_token` the depth 1.5 \(float\)"),
        (lambda n: True, None, TypeError, r"the depth True"),
        (lambda n: 0, None, ValueError, r"put every tensor at depth 0"),
        (lambda n: 9, 3, ValueError, r"the depth 9, beyond `num_layers` \+ 1 = 4"),
        ("blocks", None, TypeError, r"`layer_id` must be a callable"),
    ],
)
def test_bad_layer_id_is_an_error_naming_it(
    layer_id: Callable[[str], object] | str, num_layers: int | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build_param_groups(TinyViT(), 0.05, layer_decay=0.5, layer_id=layer_id, num_layers=num_layers, lr=LR)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"layer_decay": 0.0}, ValueError, r"`layer_decay` must be in \(0, 1\]"),
        ({"layer_decay": 1.5}, ValueError, r"`layer_decay` must be in \(0, 1\]"),
        ({"layer_decay": -0.5}, ValueError, r"`layer_decay` must be in \(0, 1\]"),
        ({"layer_decay": float("nan")}, ValueError, r"`layer_decay` must be in \(0, 1\]"),
        ({"layer_decay": True}, TypeError, r"`layer_decay` must be a number"),
        ({"layer_decay": "0.5"}, TypeError, r"`layer_decay` must be a number"),
        ({"layer_id": lambda n: 0}, ValueError, r"`layer_id` is used only with `layer_decay`"),
        ({"num_layers": 3}, ValueError, r"`num_layers` is used only with `layer_decay`"),
        ({"layer_decay": 0.5, "num_layers": 0}, ValueError, r"`num_layers` must be an int >= 1"),
        (
            {"layer_decay": 0.5, "num_layers": 2},
            ValueError,
            r"`num_layers` \(L of the layer-decay formula\) is 2, but TinyViT has 3 blocks",
        ),
    ],
)
def test_bad_layer_decay_options_name_the_option(options: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_param_groups(TinyViT(), 0.05, lr=LR, **options)


def test_no_depth_found_names_layer_decay_and_suggests_layer_id() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`layer_decay`: no block index found .* Pass `layer_id=`"):
        build_param_groups(model, 0.05, layer_decay=0.5, lr=LR)


def test_separate_stacks_of_blocks_are_an_error_naming_them() -> None:
    class TwoTowers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = nn.Module()
            self.text.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.image = nn.Module()
            self.image.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(
        ValueError,
        match=r"separate stacks of blocks: `text.layers.<N>` \(2 blocks\), `image.layers.<N>` \(1 blocks\)",
    ):
        build_param_groups(TwoTowers(), 0.05, layer_decay=0.5, lr=LR)


def test_tensor_between_blocks_is_an_error_naming_it_and_layer_id() -> None:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict({"0": nn.Linear(4, 4), "gate": nn.Linear(4, 4), "1": nn.Linear(4, 4)})
            self.out = nn.Linear(4, 2)

    with pytest.raises(
        ValueError, match=r"`layers.gate.weight` comes between the blocks of `layers` .* `layer_id=`"
    ):
        build_param_groups(Stack(), 0.05, layer_decay=0.5, lr=LR)
    depth = {"layers.0": 1, "layers.gate": 1, "layers.1": 2, "out": 3}
    groups = build_param_groups(
        Stack(), 0.05, layer_decay=0.5, layer_id=lambda n: depth[n.rsplit(".", 1)[0]], lr=LR
    )
    assert lr_by_name(groups)["layers.gate.weight"] == LR * 0.25 and lr_by_name(groups)["out.bias"] == LR


def test_a_tensor_held_beside_the_blocks_is_an_error_unless_it_is_an_embedding() -> None:
    model = TinyViT()
    model.logit_scale = nn.Parameter(
        torch.ones(())
    )  # listed first by named_parameters, acts after the blocks
    with pytest.raises(
        ValueError, match=r"`logit_scale` belongs to a module that also holds `blocks`.*`layer_id=`"
    ):
        build_param_groups(model, 0.05, layer_decay=0.5, lr=LR)
    del model.logit_scale
    model.register_tokens = nn.Parameter(torch.zeros(1, 2, 8))  # an embedding name: depth 0
    assert {d.name: d.depth for d in classify_parameters(model, layer_decay=0.5)}["register_tokens"] == 0


def test_a_stage_without_blocks_takes_the_depth_of_the_block_that_follows() -> None:
    class Stages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.stages = nn.ModuleList()
            for _ in range(2):
                stage = nn.Module()
                stage.downsample = nn.Conv2d(4, 4, 1)
                stage.blocks = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])
                self.stages.append(stage)
            self.head = nn.Linear(4, 2)

    depths = {d.name: (d.depth, d.depth_rule) for d in classify_parameters(Stages(), layer_decay=0.5)}
    assert depths["stem.weight"] == (0, "before the first block")
    assert depths["stages.0.downsample.weight"] == (1, "stage (next block)")
    assert depths["stages.1.downsample.bias"] == (3, "stage (next block)")
    assert depths["stages.1.blocks.1.weight"] == (4, "block of `stages`")
    assert depths["head.weight"] == (5, "after the last block")


# ----------------------------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev extra: pip install -e '.[dev]'"
)


def hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def hf_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def hf_convnext() -> nn.Module:
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 3], num_stages=2, num_labels=2)
    return transformers.ConvNextForImageClassification(config)


def hf_swin() -> nn.Module:
    config = transformers.SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=2, num_labels=2
    )
    return transformers.SwinForImageClassification(config)


def flat_depth(
    name: str, stages: list[int], stage_re: str, block_re: str, down_re: str, down_next: bool
) -> int:
    """Depth in a nested network, by hand: blocks numbered in one sequence over the stages."""
    offsets = [sum(stages[:s]) for s in range(len(stages))]
    m = re.search(block_re, name)
    if m:
        return offsets[int(m[1])] + int(m[2]) + 1
    m = re.search(down_re, name)
    if m:  # a stage's downsampling layer: with the block it feeds
        stage = int(m[1]) + (1 if down_next else 0)
        return offsets[stage] + 1
    if re.search(stage_re, name) or ".embeddings." in name:
        return 0
    return sum(stages) + 1


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[str], int]]] = {
    "vit": (
        hf_vit,
        lambda n: (
            0 if ".embeddings." in n else int(m[1]) + 1 if (m := re.search(r"\.layers\.(\d+)\.", n)) else 4
        ),
    ),
    "bert": (
        hf_bert,
        lambda n: (
            0 if ".embeddings." in n else int(m[1]) + 1 if (m := re.search(r"\.layer\.(\d+)\.", n)) else 3
        ),
    ),
    # ConvNeXt: stages.S.downsampling_layer comes before the stage's own blocks.
    "convnext": (
        hf_convnext,
        lambda n: flat_depth(
            n, [2, 3], r"^$", r"stages\.(\d+)\.layers\.(\d+)\.", r"stages\.(\d+)\.downsampling", False
        ),
    ),
    # Swin: layers.S.downsample ends stage S and feeds stage S + 1.
    "swin": (
        hf_swin,
        lambda n: flat_depth(
            n, [2, 2], r"^$", r"layers\.(\d+)\.blocks\.(\d+)\.", r"layers\.(\d+)\.downsample", True
        ),
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_transformers_models_lr_per_tensor_and_no_decay_at_every_depth(family: str) -> None:
    build, expected_depth = CASES[family]
    model = build()
    groups = build_param_groups(model, 0.05, layer_decay=0.65, lr=LR)
    depths = {n: expected_depth(n) for n, _ in model.named_parameters()}
    top = max(depths.values())
    assert sorted(lr_by_name(groups)) == sorted(depths)
    for name, lr in lr_by_name(groups).items():
        assert lr == LR * 0.65 ** (top - depths[name]), name
    no_decay_depths = set()
    for group in groups:
        kind = group["name"].split("/")[0]
        for name, p in group["params"]:
            is_norm_or_bias = re.search(r"(?i)bias|norm|layer_scale", name) is not None
            assert (kind == NO_DECAY) == (is_norm_or_bias or p.ndim <= 1), name
            if kind == NO_DECAY:
                no_decay_depths.add(group["layer_depth"])
    assert no_decay_depths == set(range(top + 1))  # biases / norms in no_decay at every depth
    assert len({g["name"] for g in groups}) == len(groups)


class _TiedLM(nn.Module):
    """Embedding, two blocks, and an output head tied to the embedding (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_head_says_which_lr_the_one_tensor_gets() -> None:
    model = _TiedLM()
    with pytest.warns(
        UserWarning, match=r"`head.weight` is the same tensor as `embed.weight` \(tied"
    ) as caught:
        groups = build_param_groups(model, 0.1, layer_decay=0.5, lr=1.0)
    (message,) = [str(w.message) for w in caught if "tied" in str(w.message)]
    assert "depth 0" in message and "lr scale 0.125" in message  # 0.5^(L + 1 - 0), L = 2
    (group,) = [g for g in groups if any(name == "embed.weight" for name, _ in g["params"])]
    assert group["lr"] == 0.125  # the tensor trains once, at the embedding's rate, as the warning says
    # with its own depth from layer_id, the warning reports that depth instead
    with pytest.warns(UserWarning, match="depth 3"):
        build_param_groups(
            model, 0.1, layer_decay=0.5, lr=1.0, layer_id=lambda n: 3 if n == "embed.weight" else None
        )
