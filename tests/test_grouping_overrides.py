"""Per-group hyperparameters: ``group_overrides``, ``param._optim`` groups, the lr scales and the LR schedulers.

The decay / no-decay classification stays the first axis: an override or a per-tensor declaration only splits a
class further. Learning rates and weight decays are asserted in real optimizer groups, through real AdamW steps,
through every kind of torch LR scheduler and through Lightning's ``LearningRateMonitor`` in a real fit.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import build_param_groups, classify_parameters, describe_param_groups
from lightning_adamw.param_groups import (
    apply_lr_scales,
    check_lr_scales,
    check_unique_group_names,
    group_hparams,
)
from lightning_adamw.schedules import WarmupCosineLR

LR = 1e-2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


def names_of(group: dict) -> list[str]:
    return group["param_names"] if "param_names" in group else [n for n, _ in group["params"]]


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


# ----------------------------------------------------------------------------------------------- overrides


def test_first_matching_override_wins_and_the_decay_split_stays_inside() -> None:
    overrides = [
        {"pattern": "backbone.2.*", "name": "late", "lr_scale": 0.5},
        {"pattern": "backbone.*", "name": "backbone", "lr_scale": 0.1, "weight_decay": 0.3},
    ]
    groups = by_name(build_param_groups(Net(), 0.05, group_overrides=overrides, lr=LR))
    assert list(groups) == [
        "decay",
        "no_decay",
        "decay/backbone",
        "no_decay/backbone",
        "decay/late",
        "no_decay/late",
    ]  # unmatched first, then the overrides in the order their first tensor appears, decay before no_decay
    assert names_of(groups["decay/late"]) == ["backbone.2.weight"]  # first match: not "backbone"
    assert names_of(groups["no_decay/backbone"]) == [
        "backbone.0.bias",
        "backbone.1.weight",
        "backbone.1.bias",
    ]
    assert names_of(groups["decay"]) == ["head.weight"]
    expected = {
        "decay": (LR, 0.05, 1.0),
        "no_decay": (LR, 0.0, 1.0),
        "decay/backbone": (LR * 0.1, 0.3, 0.1),  # absolute weight decay, decay part only
        "no_decay/backbone": (LR * 0.1, 0.0, 0.1),
        "decay/late": (LR * 0.5, 0.05, 0.5),
        "no_decay/late": (LR * 0.5, 0.0, 0.5),
    }
    assert {k: (g["lr"], g["weight_decay"], g["lr_scale"]) for k, g in groups.items()} == expected


def test_weight_decay_scale_multiplies_the_option_and_a_real_adamw_step_uses_it() -> None:
    torch.manual_seed(0)
    model = Net().double()
    overrides = {"pattern": "head.*", "name": "head", "lr_scale": 2.0, "weight_decay_scale": 4.0}  # one dict
    groups = build_param_groups(model, 0.05, group_overrides=overrides, lr=LR)
    assert (
        by_name(groups)["decay/head"]["weight_decay"] == 0.2
        and by_name(groups)["no_decay/head"]["weight_decay"] == 0
    )
    optimizer = torch.optim.AdamW(groups, lr=LR)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4, dtype=torch.float64)).square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            lr, wd = group["lr"], group["weight_decay"]
            assert lr == (2 * LR if name.startswith("head") else LR)
            g, w = grads[name], before[name]
            expected = w * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)  # first AdamW step
            p = dict(model.named_parameters())[name]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            [{"pattern": "head.*", "lr_mult": 0.1}],
            ValueError,
            r"`group_overrides\[0\]` .* unknown key 'lr_mult'",
        ),
        ([{"lr_scale": 0.1}], ValueError, r"`group_overrides\[0\]` needs a 'pattern'"),
        (
            [{"pattern": "head.*", "lr_scale": 0.0}],
            ValueError,
            r"`group_overrides\[0\].lr_scale` must be .* > 0",
        ),
        (
            [{"pattern": "head.*", "lr_scale": -1}],
            ValueError,
            r"`group_overrides\[0\].lr_scale` must be .* > 0",
        ),
        (
            [{"pattern": "head.*", "lr_scale": math.inf}],
            ValueError,
            r"`group_overrides\[0\].lr_scale` must be",
        ),
        (
            [{"pattern": "head.*", "lr_scale": "0.1"}],
            TypeError,
            r"`group_overrides\[0\].lr_scale` must be a number",
        ),
        (
            [{"pattern": "head.*", "weight_decay": -0.1}],
            ValueError,
            r"`group_overrides\[0\].weight_decay` must be",
        ),
        (
            [{"pattern": "head.*", "weight_decay": 0.1, "weight_decay_scale": 2}],
            ValueError,
            r"`group_overrides\[0\]` sets both 'weight_decay' .* and 'weight_decay_scale'",
        ),
        (
            [{"pattern": "head.*", "name": "x"}, {"pattern": "backbone.*", "name": "x"}],
            ValueError,
            r"`group_overrides\[0\]` and `group_overrides\[1\]` have the same name 'x'",
        ),
        (
            [{"pattern": "haed.*"}],
            ValueError,
            r"`group_overrides\[0\]` pattern 'haed.\*' matches no trainable",
        ),
        (
            [{"pattern": "backbone.*"}, {"pattern": "backbone.0.*"}],
            ValueError,
            r"`group_overrides\[1\]` pattern 'backbone.0.\*' matches only tensors that an earlier entry",
        ),
        (
            [{"pattern": "head.*", "name": "a/b"}],
            ValueError,
            r"`group_overrides\[0\].name` must be .* without '/'",
        ),
        ([{"pattern": "head.*", "name": "declared_0"}], ValueError, r"'declared_0' is reserved"),
        (
            [{"pattern": "re:("}],
            ValueError,
            r"`group_overrides\[0\].pattern` is an invalid regular expression",
        ),
        ("head.*", TypeError, r"`group_overrides` must be a list of dicts"),
        (["head.*"], TypeError, r"`group_overrides\[0\]` must be a dict"),
    ],
)
def test_bad_overrides_name_the_entry_and_the_key(
    overrides: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build_param_groups(Net(), 0.05, group_overrides=overrides, lr=LR)


def test_scales_without_lr_and_wd_scale_without_weight_decay_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'decay/head' has lr_scale 0.1, but a torch optimizer ignores"):
        build_param_groups(
            Net(), 0.05, group_overrides=[{"pattern": "head.*", "name": "head", "lr_scale": 0.1}]
        )
    wd_scaled = [{"pattern": "head.*", "name": "head", "weight_decay_scale": 2.0}]
    with pytest.raises(
        ValueError, match=r"'decay/head' has a `weight_decay_scale` of 2 .* `weight_decay` is None"
    ):
        build_param_groups(Net(), None, group_overrides=wd_scaled)
    # Deferred (what the mixin does for an optimizer configured elsewhere): applied to the optimizer's own decay.
    optimizer = torch.optim.AdamW(
        build_param_groups(Net(), None, group_overrides=wd_scaled, defer_lr_scale=True),
        lr=LR,
        weight_decay=0.03,
    )
    apply_lr_scales(optimizer)
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {"decay": 0.03, "no_decay": 0.0, "decay/head": 0.06, "no_decay/head": 0.0}


def test_overrides_multiply_with_layer_decay_and_names_stay_readable() -> None:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2))
            self.head = nn.Linear(4, 2)

    overrides = [{"pattern": "layers.*.0.*", "name": "proj", "lr_scale": 0.5}]
    groups = build_param_groups(Stack(), 0.1, layer_decay=0.8, group_overrides=overrides, lr=LR)
    got = {g["name"]: g["lr"] for g in groups}
    assert list(got) == [
        "decay/embed",
        "no_decay/layer_1",
        "decay/layer_1/proj",
        "no_decay/layer_1/proj",
        "no_decay/layer_2",
        "decay/layer_2/proj",
        "no_decay/layer_2/proj",
        "decay/head",
        "no_decay/head",
    ]
    assert got["decay/embed"] == LR * 0.8**3
    assert got["decay/layer_1/proj"] == LR * (0.8**2 * 0.5)
    assert got["no_decay/layer_1"] == LR * 0.8**2
    assert got["decay/head"] == LR
    check_unique_group_names(groups)


def test_same_groups_in_the_same_order_every_time() -> None:
    options = {
        "layer_decay": 0.7,
        "group_overrides": [{"pattern": "layers.1.*", "name": "late", "lr_scale": 0.5}],
        "lr": LR,
    }

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3))
            self.head = nn.Linear(4, 2)

    net = Stack()
    first = build_param_groups(net, 0.1, **options)
    second = build_param_groups(net, 0.1, **options)
    strip = [{k: (names_of(g) if k == "params" else v) for k, v in g.items()} for g in first]
    assert strip == [{k: (names_of(g) if k == "params" else v) for k, v in g.items()} for g in second]


# ----------------------------------------------------------------------------------------------- param._optim


class MambaLikeMixer(nn.Module):
    """Mamba-2 / S4 style: the model sets per-tensor optimizer settings on its SSM tensors."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * d)
        self.A_log = nn.Parameter(torch.zeros(d, 2))
        self.A_log._optim = {"weight_decay": 0.0, "lr": 1e-3}
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.dt_bias._optim = {"weight_decay": 0.0, "lr": 1e-3}
        self.D = nn.Parameter(torch.ones(d))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(2 * d, d)


class MambaLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MambaLikeMixer() for _ in range(2))
        self.head = nn.Linear(4, 2)


def test_optim_tensors_get_exactly_their_hyperparameters_in_shared_groups() -> None:
    model = MambaLike()
    model.layers[1].out_proj.weight._optim = {"weight_decay": 0.2, "betas": [0.9, 0.95]}
    groups = by_name(build_param_groups(model, 0.1, lr=LR))
    # Equal declarations share one group, numbered in order of first appearance.
    assert names_of(groups["no_decay/declared_0"]) == [
        "layers.0.A_log",
        "layers.0.dt_bias",
        "layers.1.A_log",
        "layers.1.dt_bias",
    ]
    assert groups["no_decay/declared_0"]["lr"] == 1e-3  # absolute, not LR * anything
    assert groups["no_decay/declared_0"]["weight_decay"] == 0.0
    assert groups["no_decay/declared_0"]["declared"] == ("lr",)
    out = groups["decay/declared_1"]
    assert names_of(out) == ["layers.1.out_proj.weight"]
    assert (out["weight_decay"], out["betas"], out["lr"]) == (0.2, (0.9, 0.95), LR)
    assert "layers.0.D" in names_of(groups["no_decay"])  # the plain flag: the ordinary no_decay group
    optimizer = torch.optim.AdamW(list(groups.values()), lr=LR, betas=(0.8, 0.9))
    by_group = {g["name"]: g for g in optimizer.param_groups}
    assert by_group["decay/declared_1"]["betas"] == (0.9, 0.95) and by_group["decay"]["betas"] == (0.8, 0.9)


def test_declared_lr_is_not_scaled_by_layer_decay_or_overrides() -> None:
    overrides = [{"pattern": "layers.0.*", "name": "first", "lr_scale": 0.5}]
    groups = by_name(build_param_groups(MambaLike(), 0.1, layer_decay=0.5, group_overrides=overrides, lr=LR))
    assert groups["no_decay/layer_1/first/declared_0"]["lr"] == 1e-3
    assert groups["no_decay/layer_2/declared_0"]["lr"] == 1e-3
    assert groups["decay/layer_1/first"]["lr"] == LR * 0.25 * 0.5
    assert groups["decay/layer_2"]["lr"] == LR * 0.5
    text = describe_param_groups(MambaLike(), 0.1, layer_decay=0.5)
    assert "declared by the model (param._optim, absolute values): declared_0: lr=0.001" in text
    assert next(line for line in text.splitlines() if line.startswith("no_decay/layer_2/declared_0")).split()[
        1
    ] == ("declared")


def test_a_user_pattern_wins_over_a_declared_weight_decay() -> None:
    model = nn.Linear(4, 4)
    model.weight._optim = {"weight_decay": 0.3}
    assert by_name(build_param_groups(model, 0.1))["decay/declared_0"]["weight_decay"] == 0.3
    groups = by_name(build_param_groups(model, 0.1, no_decay_patterns="weight"))
    assert names_of(groups["no_decay"]) == ["weight", "bias"]


@pytest.mark.parametrize(
    ("optim", "error", "message"),
    [
        (
            {"lr": -1.0},
            ValueError,
            r"parameter `weight` has `_optim\['lr'\]`=-1.0: it must be a finite number >= 0",
        ),
        ({"lr": "fast"}, TypeError, r"parameter `weight` has `_optim\['lr'\]`='fast': it must be a number"),
        (
            {"betas": (0.9, 1.0)},
            ValueError,
            r"`_optim\['betas'\]`=\(0.9, 1.0\): it must be two numbers in \[0, 1\)",
        ),
        ({"eps": 0.0}, ValueError, r"`_optim\['eps'\]`=0.0: it must be a finite number > 0"),
        ({"params": []}, ValueError, r"`_optim\['params'\]`: that key is set by the grouping itself"),
        ({"lr_scale": 2.0}, ValueError, r"`_optim\['lr_scale'\]`: that key is set by the grouping itself"),
        ({"foo": {"a": 1}}, TypeError, r"`_optim\['foo'\]`=\{'a': 1\}: per-tensor hyperparameters must be"),
    ],
)
def test_bad_optim_values_name_the_tensor(optim: dict, error: type[Exception], message: str) -> None:
    layer = nn.Linear(4, 4)
    layer.weight._optim = optim
    with pytest.raises(error, match=message):
        build_param_groups(layer, 0.1)


def test_optim_values_become_comparable_group_values() -> None:
    layer = nn.Linear(4, 4)
    layer.weight._optim = {"lr": torch.tensor(1e-3, dtype=torch.float64), "foo": [1, [2]]}
    layer.bias._optim = {"lr": 1e-3, "foo": (1, (2,))}  # equal once normalised: one group
    groups = by_name(build_param_groups(layer, 0.1))
    assert names_of(groups["decay/declared_0"]) == ["weight"] and names_of(groups["no_decay/declared_0"]) == [
        "bias"
    ]
    assert groups["decay/declared_0"]["foo"] == (1, (2,)) and groups["decay/declared_0"]["lr"] == 1e-3


def test_contradicting_flags_are_an_error() -> None:
    layer = nn.Linear(4, 4)
    layer.weight._no_weight_decay = True
    layer.weight._optim = {"weight_decay": 0.1}
    with pytest.raises(
        ValueError, match=r"`weight` has `_no_weight_decay = True` and `_optim\['weight_decay'\]`=0.1"
    ):
        classify_parameters(layer)


# ----------------------------------------------------------------------------------------------- schedulers


def scaled_optimizer() -> torch.optim.Optimizer:
    overrides = [{"pattern": "backbone.*", "name": "backbone", "lr_scale": 0.1}]
    groups = build_param_groups(Net(), 0.05, group_overrides=overrides, defer_lr_scale=True)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    apply_lr_scales(optimizer)
    return optimizer


EXPECTED_BASE = {"decay": LR, "no_decay": LR, "decay/backbone": LR * 0.1, "no_decay/backbone": LR * 0.1}


@pytest.mark.parametrize(
    "make",
    [
        lambda o: LambdaLR(o, lambda step: 1.0 / (step + 1)),
        lambda o: CosineAnnealingLR(o, T_max=10),
        lambda o: WarmupCosineLR(o, warmup_steps=3, total_steps=10),
        lambda o: OneCycleLR(o, max_lr=[g["lr"] for g in o.param_groups], total_steps=10),
    ],
    ids=["LambdaLR", "CosineAnnealingLR", "WarmupCosineLR", "OneCycleLR-per-group"],
)
def test_every_scheduler_schedules_each_group_from_its_own_lr(make) -> None:
    optimizer = scaled_optimizer()
    scheduler = make(optimizer)
    check_lr_scales(optimizer)
    names = [g["name"] for g in optimizer.param_groups]
    if isinstance(scheduler, OneCycleLR):  # OneCycleLR starts at max_lr / div_factor (25)
        assert [g["max_lr"] for g in optimizer.param_groups] == [EXPECTED_BASE[n] for n in names]
    else:
        assert scheduler.base_lrs == [EXPECTED_BASE[n] for n in names]
        assert [g["initial_lr"] for g in optimizer.param_groups] == [EXPECTED_BASE[n] for n in names]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        # Every group follows the same shape: the ratio to the unscaled group is the scale, at every step.
        assert math.isclose(lrs["decay/backbone"], 0.1 * lrs["decay"], rel_tol=1e-12)


def test_one_cycle_with_a_single_max_lr_is_caught() -> None:
    optimizer = scaled_optimizer()
    OneCycleLR(optimizer, max_lr=LR, total_steps=10)  # sets the same lr on every group
    with pytest.raises(
        ValueError, match=r"scales \(layer_decay, group_overrides\) are lost.*max_lr=\[g\['lr'\]"
    ):
        check_lr_scales(optimizer)


def test_scheduler_before_apply_is_refused() -> None:
    overrides = [{"pattern": "backbone.*", "lr_scale": 0.1}]
    optimizer = torch.optim.AdamW(
        build_param_groups(Net(), 0.05, group_overrides=overrides, defer_lr_scale=True)
    )
    LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(
        RuntimeError, match=r"group 'decay' already has an `initial_lr`: an LR scheduler was created"
    ):
        apply_lr_scales(optimizer)


def test_resumed_state_is_not_scaled_twice() -> None:
    optimizer = scaled_optimizer()
    scheduler = WarmupCosineLR(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    assert all(g["lr_scale_applied"] for g in saved_opt["param_groups"])
    resumed = scaled_optimizer()
    resumed_scheduler = WarmupCosineLR(resumed, warmup_steps=2, total_steps=10)
    resumed.load_state_dict(saved_opt)
    resumed_scheduler.load_state_dict(saved_sched)
    assert apply_lr_scales(resumed) == 0
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed_scheduler.base_lrs == scheduler.base_lrs


# ----------------------------------------------------------------------------------------------- Lightning


class OwnGroupsModule(L.LightningModule):
    """Writes its own configure_optimizers with the pure function: the core works without the mixin."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> dict:
        overrides = [{"pattern": "net.backbone.*", "name": "backbone", "lr_scale": 0.1}]
        groups = build_param_groups(self, 0.05, group_overrides=overrides, lr=LR)
        optimizer = torch.optim.AdamW(groups, lr=LR)
        scheduler = WarmupCosineLR(optimizer, warmup_steps=2, total_steps=6)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_learning_rate_monitor_logs_every_group_by_its_name(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(24, 4), torch.randint(0, 2, (24,))), batch_size=4)
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(OwnGroupsModule(), data)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    columns = [c for c in rows[0] if c.startswith("lr-AdamW")]
    assert sorted(columns) == sorted(f"lr-AdamW/{n}" for n in EXPECTED_BASE)
    lr_rows = [r for r in rows if r["lr-AdamW/decay"]]
    for step, row in enumerate(lr_rows[:6]):
        factor = (step + 1) / 3 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))
        for name, base in EXPECTED_BASE.items():
            # CSV keeps repr-precision floats: the logged lr is exactly base * factor up to one rounding.
            assert math.isclose(float(row[f"lr-AdamW/{name}"]), base * factor, rel_tol=1e-12), (step, name)


def test_group_hparams_for_loggers() -> None:
    optimizer = scaled_optimizer()
    hparams = group_hparams(optimizer)
    assert hparams["param_groups/decay/backbone/tensors"] == 2
    assert hparams["param_groups/decay/backbone/params"] == 4 * 8 + 8 * 8
    assert hparams["param_groups/decay/backbone/lr_scale"] == 0.1
    assert hparams["param_groups/no_decay/weight_decay"] == 0.0
    assert not any(k.endswith("/depth") for k in hparams)


def test_describe_takes_the_same_options_as_build_param_groups() -> None:
    options = {"group_overrides": [{"pattern": "backbone.*", "name": "backbone", "lr_scale": 0.1}], "lr": LR}
    text = describe_param_groups(Net(), 0.05, defer_lr_scale=True, **options)
    row = next(line.split() for line in text.splitlines() if line.startswith("decay/backbone "))
    assert row[1:5] == ["0.1", "0.05", "2", "96"]  # lr_scale, weight_decay, tensors, params
    assert "group_overrides (first matching entry wins): backbone: 6 tensors" in text
