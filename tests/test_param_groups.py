"""The grouping rules of ``build_param_groups``: every rule, every wrapper, every bad input."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import DECAY, NO_DECAY, clean_param_name, group_sizes


def names(groups: list[dict], group: str) -> list[str]:
    for g in groups:
        if g["name"] == group:
            return [n for n, _ in g["params"]]
    return []


def reasons(module: nn.Module, **options) -> dict[str, tuple[str, str]]:
    return {d.name: (d.group, d.reason) for d in classify_parameters(module, **options)}


# ----------------------------------------------------------------------------------------------- models


class MyRMSNorm(nn.Module):
    """A norm defined outside torch, recognised by its class name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class Modulation(nn.Module):
    """A 2-D 'norm-like' tensor that only an explicit ``extra_norm_types`` can exclude."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.ones(4, dim))


class AdaLayerNorm(nn.Module):
    """A norm whose *child* Linear must still be decayed: the norm rule covers only directly-owned tensors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, 2 * dim)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, dim))
        self.attn = nn.MultiheadAttention(dim, 2)
        self.ln_f = MyRMSNorm(dim)
        self.layer_scale = nn.Parameter(torch.ones(dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.fc = nn.Linear(4, 2)
        self.gate = nn.Parameter(torch.ones(2, 2))
        self.temperature = nn.Parameter(torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------- rules


def test_every_torch_norm_bias_and_1d_goes_to_no_decay() -> None:
    r = reasons(Net())
    assert r["conv.weight"] == (DECAY, "weight")
    assert r["fc.weight"] == (DECAY, "weight")
    assert r["gate"] == (DECAY, "weight")
    for name, cls in [
        ("bn", "BatchNorm2d"),
        ("gn", "GroupNorm"),
        ("inorm", "InstanceNorm2d"),
        ("ln", "LayerNorm"),
    ]:
        assert r[f"{name}.weight"] == (NO_DECAY, f"norm:{cls}")
        assert r[f"{name}.bias"] == (NO_DECAY, f"norm:{cls}")
    assert r["rms.weight"] == (NO_DECAY, "norm:RMSNorm")
    assert r["conv.bias"] == (NO_DECAY, "bias")
    assert r["fc.bias"] == (NO_DECAY, "bias")
    assert r["temperature"] == (NO_DECAY, "1-D")


def test_sync_batchnorm_and_third_party_norm_names() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4), MyRMSNorm(4))
    r = reasons(model)
    assert r["1.weight"] == (NO_DECAY, "norm:SyncBatchNorm")
    assert r["2.scale"] == (NO_DECAY, "norm:MyRMSNorm")
    # Class-name rule matches common third-party names and not look-alikes.
    import re

    from lightning_adamw import DEFAULT_NORM_CLASS_PATTERN

    rule = re.compile(DEFAULT_NORM_CLASS_PATTERN)
    for cls in [
        "LlamaRMSNorm",
        "T5LayerNorm",
        "LayerNorm2d",
        "BatchNormAct2d",
        "GroupNormAct",
        "FusedRMSNorm",
        "ScaleNorm",
        "FrozenBatchNorm2d",
        "ConvNextLayerNorm",
        "Qwen2RMSNorm",
        "LayerNormFp32",
    ]:
        assert rule.search(cls), cls
    for cls in ["Normalize", "Normal", "Linear", "Denormalizer", "NormalizedLinear"]:
        assert not rule.search(cls), cls


def test_norm_rule_covers_only_parameters_the_norm_owns() -> None:
    r = reasons(nn.Sequential(AdaLayerNorm(4)))
    assert r["0.linear.weight"] == (DECAY, "weight")
    assert r["0.linear.bias"] == (NO_DECAY, "bias")


def test_class_name_rule_can_be_turned_off_or_replaced() -> None:
    model = nn.Sequential(nn.Linear(2, 2), MyRMSNorm(2))
    assert reasons(model, norm_class_pattern=None)["1.scale"] == (NO_DECAY, "1-D")
    assert reasons(model, norm_class_pattern="MyRMS")["1.scale"] == (NO_DECAY, "norm:MyRMSNorm")
    # A class matched by its name only claims vector-shaped tensors: the (4, 3) table is a matrix the class holds
    # (only `extra_norm_types` trusts a class with every tensor, see below).
    r = reasons(nn.Sequential(Modulation(3)), norm_class_pattern="Modulation")
    assert r["0.table"] == (DECAY, "matrix-in-norm:Modulation")


def test_extra_norm_types() -> None:
    r = reasons(nn.Sequential(Modulation(3), nn.Linear(3, 3)), extra_norm_types=[Modulation])
    assert r["0.table"] == (NO_DECAY, "norm:Modulation")
    assert r["1.weight"] == (DECAY, "weight")
    # A single class is accepted too.
    assert reasons(nn.Sequential(Modulation(3)), extra_norm_types=Modulation)["0.table"][0] == NO_DECAY


def test_in_proj_bias_and_star_bias_leaf_names() -> None:
    r = reasons(nn.MultiheadAttention(8, 2))
    assert r["in_proj_weight"] == (DECAY, "weight")
    assert r["in_proj_bias"] == (NO_DECAY, "bias")
    assert r["out_proj.weight"] == (DECAY, "weight")
    assert r["out_proj.bias"] == (NO_DECAY, "bias")


def test_tied_embedding_head_hook_and_exclude_embeddings() -> None:
    model = TinyGPT()
    decisions = classify_parameters(model)
    by_name = {d.name: d for d in decisions}
    # The tied tensor appears once, under its first name, with the other name as alias; it is an embedding.
    assert "lm_head.weight" not in by_name
    assert by_name["wte.weight"].aliases == ("lm_head.weight",)
    assert (by_name["wte.weight"].group, by_name["wte.weight"].reason) == (DECAY, "embedding")
    assert (by_name["pos_embed"].group, by_name["pos_embed"].reason) == (NO_DECAY, "no_weight_decay()")
    assert by_name["layer_scale"].group == NO_DECAY
    assert by_name["ln_f.scale"].reason == "norm:MyRMSNorm"

    excluded = reasons(model, exclude_embeddings=True)
    assert excluded["wte.weight"] == (NO_DECAY, "embedding")
    assert excluded["attn.in_proj_weight"] == (DECAY, "weight")

    groups = build_param_groups(model, 0.1)
    all_params = [p for g in groups for _, p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))


def test_pos_embed_like_raw_parameters_count_as_embeddings() -> None:
    class ViTish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.proj = nn.Linear(8, 8)

    assert reasons(ViTish())["pos_embed"] == (DECAY, "embedding")
    r = reasons(ViTish(), exclude_embeddings=True)
    assert r["pos_embed"] == (NO_DECAY, "embedding")
    assert r["cls_token"] == (NO_DECAY, "embedding")
    assert r["proj.weight"] == (DECAY, "weight")


def test_hooks_on_submodules_and_keywords() -> None:
    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
            self.absolute_pos = nn.Parameter(torch.zeros(4, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self) -> set[str]:
            return {"absolute_pos"}

        def no_weight_decay_keywords(self) -> set[str]:
            return {"relative_position_bias_table"}

    model = nn.Sequential(nn.Linear(4, 4), Backbone())
    r = reasons(model)
    assert r["1.absolute_pos"] == (NO_DECAY, "no_weight_decay()")
    assert r["1.relative_position_bias_table"] == (NO_DECAY, "no_weight_decay_keywords()")
    assert r["1.proj.weight"] == (DECAY, "weight")
    assert reasons(model, use_model_hooks=False)["1.absolute_pos"] == (DECAY, "weight")


class KeywordBackbone(nn.Module):
    """timm / Swin style: the backbone declares names and keywords for its own tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"proj"}


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = KeywordBackbone()
        self.pos = nn.Parameter(torch.zeros(8, 8))
        self.head_proj = nn.Linear(8, 100)  # "proj" is in its name, but the keyword is the backbone's


def test_submodule_keywords_apply_only_to_its_own_tensors() -> None:
    """A sub-module's no_weight_decay_keywords() are matched against the names relative to it, like its
    no_weight_decay() names: the backbone's "proj" does not reach the head's `head_proj` matrix."""
    r = reasons(KeywordModel())
    assert r["backbone.proj.weight"] == (NO_DECAY, "no_weight_decay_keywords()")
    assert r["backbone.pos"] == (NO_DECAY, "no_weight_decay()")
    assert r["head_proj.weight"] == (DECAY, "weight")
    assert r["pos"] == (DECAY, "weight")
    # Nested one level deeper, and a keyword that would match the prefix ("backbone") matches nothing inside.
    outer = nn.ModuleDict({"net": KeywordModel(), "proj": nn.Linear(8, 8)})
    r = reasons(outer)
    assert r["net.backbone.proj.weight"] == (NO_DECAY, "no_weight_decay_keywords()")
    assert r["net.head_proj.weight"] == r["proj.weight"] == (DECAY, "weight")

    class Prefixed(KeywordBackbone):
        def no_weight_decay_keywords(self) -> set[str]:
            return {"backbone"}

    model = KeywordModel()
    model.backbone = Prefixed()
    assert reasons(model)["backbone.qkv.weight"] == (DECAY, "weight")


def test_root_keywords_apply_to_every_tensor() -> None:
    class Root(KeywordModel):
        def no_weight_decay_keywords(self) -> set[str]:
            return {"head_"}

    r = reasons(Root())
    assert r["head_proj.weight"] == (NO_DECAY, "no_weight_decay_keywords()")
    assert r["backbone.proj.weight"] == (NO_DECAY, "no_weight_decay_keywords()")  # the backbone's own keyword
    assert r["backbone.qkv.weight"] == (DECAY, "weight")


def test_submodule_keywords_through_torch_compile_keep_their_scope() -> None:
    """torch.compile's wrapper forwards attribute lookups: the wrapped backbone is named without `_orig_mod`."""
    model = KeywordModel()
    model.backbone = torch.compile(model.backbone)
    r = reasons(model)
    assert r["backbone.proj.weight"] == (NO_DECAY, "no_weight_decay_keywords()")
    assert r["head_proj.weight"] == (DECAY, "weight")


def test_patterns_glob_regex_and_forced_decay() -> None:
    model = Net()
    r = reasons(model, no_decay_patterns=["gate"], decay_patterns="re:^ln\\.weight$")
    assert r["gate"] == (NO_DECAY, "pattern:gate")
    assert r["ln.weight"] == (DECAY, "pattern:re:^ln\\.weight$")
    assert r["ln.bias"] == (NO_DECAY, "norm:LayerNorm")
    r = reasons(model, no_decay_patterns="b?.weight", decay_patterns=["conv.*", "fc.*"])
    assert r["bn.weight"] == (NO_DECAY, "pattern:b?.weight")
    assert r["conv.weight"] == (DECAY, "pattern:conv.*")
    assert r["fc.bias"] == (DECAY, "pattern:fc.*")


def test_frozen_parameters_are_in_no_group() -> None:
    model = Net()
    for p in model.conv.parameters():
        p.requires_grad_(False)
    groups = build_param_groups(model, 0.05)
    flat = names(groups, DECAY) + names(groups, NO_DECAY)
    assert "conv.weight" not in flat and "conv.bias" not in flat
    assert len(flat) == sum(1 for p in model.parameters() if p.requires_grad)


def test_group_format_weight_decay_and_optimizer_records_names() -> None:
    model = Net()
    groups = build_param_groups(model, 0.05)
    assert [g["name"] for g in groups] == [DECAY, NO_DECAY]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert opt.param_groups[0]["param_names"] == [
        "gate",
        "conv.weight",
        "fc.weight",
    ]  # named_parameters order
    assert opt.state_dict()["param_groups"][1]["param_names"][:2] == ["temperature", "conv.bias"]
    # weight_decay=None leaves the decay group to the optimizer's default.
    groups = build_param_groups(model, None)
    assert "weight_decay" not in groups[0]
    assert torch.optim.AdamW(groups, weight_decay=0.3).param_groups[0]["weight_decay"] == 0.3


def test_empty_group_is_left_out() -> None:
    groups = build_param_groups(nn.LayerNorm(4), 0.1)
    assert [g["name"] for g in groups] == [NO_DECAY]
    groups = build_param_groups(nn.Linear(4, 4, bias=False), 0.1)
    assert [g["name"] for g in groups] == [DECAY]


def test_order_is_deterministic_and_checkpoints_reload() -> None:
    torch.manual_seed(0)
    a = TinyGPT()
    b = copy.deepcopy(a)
    ga, gb = build_param_groups(a, 0.1), build_param_groups(b, 0.1)
    assert [[n for n, _ in g["params"]] for g in ga] == [[n for n, _ in g["params"]] for g in gb]
    opt_a = torch.optim.AdamW(ga, lr=1e-2)
    loss = a.lm_head(a.wte(torch.tensor([1, 2]))).sum() + a.pos_embed.sum()
    loss.backward()
    opt_a.step()
    opt_b = torch.optim.AdamW(gb, lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())  # raises if names/sizes differ
    assert opt_b.param_groups[0]["param_names"] == opt_a.param_groups[0]["param_names"]


# ----------------------------------------------------------------------------------------------- wrappers


def test_deprecated_string_only_clean_param_name_still_works_and_warns() -> None:
    with pytest.warns(DeprecationWarning, match="parameter_names"):
        assert clean_param_name("_orig_mod.fc.weight") == "fc.weight"
    with pytest.warns(DeprecationWarning):
        assert clean_param_name("module.fc.weight") == "fc.weight"
    with pytest.warns(DeprecationWarning):
        assert clean_param_name("a._checkpoint_wrapped_module.b") == "a.b"


def test_compiled_module_gives_original_names_and_hooks() -> None:
    model = TinyGPT()
    compiled = torch.compile(model)
    assert (
        build_param_groups(compiled, 0.1)[0]["params"][0][0]
        == build_param_groups(model, 0.1)[0]["params"][0][0]
    )
    assert reasons(compiled) == reasons(model)


def test_plain_attribute_called_module_keeps_its_name_and_real_data_parallel_is_unwrapped() -> None:
    class Holder(nn.Module):  # looks like DDP's layout, but is a user's module: names stay as printed
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = Net()
    held = reasons(Holder(model))
    assert held == {f"module.{n}": r for n, r in reasons(model).items()}
    assert reasons(Holder(model), no_decay_patterns="module.gate")["module.gate"] == (
        NO_DECAY,
        "pattern:module.gate",
    )
    assert reasons(nn.DataParallel(model)) == reasons(model)
    assert reasons(nn.DataParallel(model), no_decay_patterns="gate")["gate"] == (NO_DECAY, "pattern:gate")


def test_ddp_wrapped_module(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert reasons(ddp) == reasons(model)
    finally:
        dist.destroy_process_group()


def test_fsdp_flat_parameter_is_refused() -> None:
    class FlatParameter(nn.Parameter):
        pass

    model = nn.Module()
    model.flat_param = FlatParameter(torch.zeros(10))
    with pytest.raises(ValueError, match="use_orig_params=True"):
        build_param_groups(model, 0.1)


def test_meta_device_7b_shaped_transformer_is_fast_and_materializes_nothing() -> None:
    dim, layers, vocab, hidden = 4096, 32, 32000, 11008

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm = nn.RMSNorm(dim)
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
            self.mlp_norm = nn.RMSNorm(dim)
            self.gate = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(dim, hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)

    with torch.device("meta"):
        model = nn.ModuleDict(
            {
                "embed": nn.Embedding(vocab, dim),
                "layers": nn.ModuleList(Block() for _ in range(layers)),
                "norm": nn.RMSNorm(dim),
                "head": nn.Linear(dim, vocab, bias=False),
            }
        )
    n_params = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < n_params < 7.0e9
    start = time.perf_counter()
    groups = build_param_groups(model, 0.1)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # generous bound for a loaded CI box; benchmarks/ measures the real figure
    assert all(p.is_meta for g in groups for _, p in g["params"])
    sizes = group_sizes(classify_parameters(model))
    assert sizes[NO_DECAY]["tensors"] == 2 * layers + 1
    assert sizes[DECAY]["tensors"] == 7 * layers + 2


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight_decay": -0.1}, ValueError, "`weight_decay` must be a finite number >= 0"),
        ({"weight_decay": math.nan}, ValueError, "`weight_decay`"),
        ({"weight_decay": math.inf}, ValueError, "`weight_decay`"),
        ({"weight_decay": "0.1"}, TypeError, "`weight_decay` must be a float"),
        ({"weight_decay": True}, TypeError, "`weight_decay` must be a float"),
        (
            {"weight_decay": 0.1, "exclude_embeddings": "yes"},
            TypeError,
            "`exclude_embeddings` must be a bool",
        ),
        ({"weight_decay": 0.1, "no_decay_patterns": 3}, TypeError, "`no_decay_patterns` must be a string"),
        ({"weight_decay": 0.1, "decay_patterns": [""]}, TypeError, "`decay_patterns` must contain non-empty"),
        ({"weight_decay": 0.1, "no_decay_patterns": "re:(("}, ValueError, "invalid regular expression"),
        (
            {"weight_decay": 0.1, "extra_norm_types": [int]},
            TypeError,
            "`extra_norm_types` must contain nn.Module",
        ),
        ({"weight_decay": 0.1, "extra_norm_types": 5}, TypeError, "`extra_norm_types` must be a sequence"),
        ({"weight_decay": 0.1, "norm_class_pattern": 5}, TypeError, "`norm_class_pattern`"),
        (
            {"weight_decay": 0.1, "no_decay_patterns": "fc.wieght"},
            ValueError,
            "'fc.wieght' matches no trainable",
        ),
        (
            {"weight_decay": 0.1, "decay_patterns": ["nope*"]},
            ValueError,
            "`decay_patterns` pattern 'nope\\*'",
        ),
        (
            {"weight_decay": 0.1, "no_decay_patterns": "fc.*", "decay_patterns": "*.weight"},
            ValueError,
            "parameter `fc.weight` is matched by `decay_patterns` '\\*.weight' and by `no_decay_patterns` 'fc.\\*'",
        ),
    ],
)
def test_bad_input_errors_name_the_option(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_param_groups(Net(), **kwargs)


def test_bad_module_and_no_trainable_parameters() -> None:
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module"):
        build_param_groups("model", 0.1)  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(frozen, 0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(nn.ReLU(), 0.1)


def test_bad_hook_return_value() -> None:
    class Bad(nn.Linear):
        def no_weight_decay(self) -> int:
            return 3

    with pytest.raises(TypeError, match="no_weight_decay\\(\\)` must return a collection"):
        build_param_groups(Bad(2, 2), 0.1)


# ----------------------------------------------------------------------------------------------- describe


def test_describe_param_groups_table() -> None:
    table = describe_param_groups(TinyGPT(), 0.1)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "weight_decay", "tensors", "params", "share"]
    decay_row = next(line for line in lines if line.startswith("decay "))
    assert decay_row.split()[1:3] == ["0.1", "3"]
    assert any("no_weight_decay()" in line and "pos_embed" in line for line in lines)
    assert any("embedding" in line and "wte.weight" in line for line in lines)
    assert any("norm:MyRMSNorm" in line for line in lines)
    with pytest.raises(TypeError, match="needs `module` or `decisions`"):
        describe_param_groups()


def test_unexplained_fsdp_flat_shard_is_refused_not_grouped_as_1d() -> None:
    model = nn.Linear(4, 4)
    model.weight._fsdp_flattened = True  # what FSDP1 marks on the 1-D shard views it hands out
    with torch.no_grad():
        model.weight = nn.Parameter(model.weight.detach().flatten())
    model.weight._fsdp_flattened = True
    with pytest.raises(
        ValueError, match="flat FSDP shard whose original shape is unknown: pass the FSDP root"
    ):
        build_param_groups(model, 0.1)
