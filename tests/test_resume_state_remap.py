"""The pure-torch resume core: remap_state_dict, group checks and naming, WarmupCosineLR.load_state_dict.

Real optimizers and real ``state_dict()``s (Adam ``step`` tensors, amsgrad ``max_exp_avg_sq``, a group added by
``add_param_group``); no Lightning.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_adamw import WarmupCosineLR, build_param_groups
from lightning_adamw.optimizer_groups import (
    check_group_hyperparameters,
    name_added_group,
    named_tensor_ids,
    untracked_tensors,
)
from lightning_adamw.optimizer_state import remap_state_dict


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(6, 6, bias=False) for _ in range(3))
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.c(self.b(self.a(x))))


def trained(groups_of, steps: int = 3, seed: int = 0, **adam) -> tuple[Three, torch.optim.Optimizer]:
    """A model and an AdamW after ``steps`` real steps; ``groups_of(model)`` gives the groups."""
    torch.manual_seed(seed)
    model = Three()
    optimizer = torch.optim.AdamW(groups_of(model), lr=0.05, **adam)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for name, p in zip(group["param_names"], group["params"], strict=True)
        if p in optimizer.state
    }


def state_of_module(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The state of each tensor of ``model``, by the module's own names (not the groups' labels)."""
    return {n: dict(optimizer.state[p]) for n, p in model.named_parameters() if p in optimizer.state}


def assert_labels_name_their_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["param_names"] == [names[id(p)] for p in group["params"]]


def configured(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups
    ]


def assert_same_state(
    got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]
) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert sorted(got[name]) == sorted(want[name]), name
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)


def test_moments_follow_their_tensor_when_a_tensor_changes_group() -> None:
    """c.weight moves decay -> no_decay: sizes change; every tensor keeps its own exp_avg, exp_avg_sq,
    max_exp_avg_sq and step, and the new groups' hyperparameters apply."""
    _, before = trained(lambda m: build_param_groups(m, 0.1), amsgrad=True)
    saved = before.state_dict()
    want = state_by_name(before)

    model = Three()
    after = torch.optim.AdamW(
        build_param_groups(model, 0.3, no_decay_patterns=["c.weight"]), lr=0.02, amsgrad=True
    )
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after))
    after.load_state_dict(remapped)

    assert_same_state(state_of_module(model, after), want)
    assert_labels_name_their_tensors(model, after)
    assert report.moved == [("c.weight", "decay", "no_decay")]
    assert report.fresh == [] and report.dropped == []
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in after.param_groups] == [
        ("decay", 0.02, 0.3),
        ("no_decay", 0.02, 0.0),
    ]
    assert [g["param_names"] for g in after.param_groups] == [
        ["a.weight", "b.weight", "out.weight"],
        ["c.weight", "out.bias"],
    ]
    message = report.message()
    assert message is not None
    assert "c.weight moved decay -> no_decay" in message and "0 tensors start fresh" in message
    assert "decay weight_decay 0.1 -> 0.3" in message and "decay lr 0.05 -> 0.02" in message
    # The loaded optimizer steps (state and groups are consistent).
    model(torch.randn(4, 6)).sum().backward()
    after.step()


def test_same_group_sizes_swapped_tensors_are_not_misassigned() -> None:
    """The silent variant: excluded tensors swap (a,b -> b,c), group sizes stay equal. Torch's positional load
    hands a, b and c other tensors' moments; the remap does not."""
    _, before = trained(lambda m: build_param_groups(m, 0.1, no_decay_patterns=["re:^[ab]\\.weight$"]))
    saved = before.state_dict()
    want = state_by_name(before)

    model = Three()
    groups = build_param_groups(model, 0.1, no_decay_patterns=["re:^[bc]\\.weight$"])
    positional = torch.optim.AdamW(groups, lr=0.05)
    positional.load_state_dict(saved)  # torch alone: same sizes, so it loads, by position
    wrong = state_of_module(model, positional)
    # decay [c, out.w] / no_decay [a, b, out.b] loaded into decay [a, out.w] / no_decay [b, c, out.b]:
    assert torch.equal(wrong["a.weight"]["exp_avg"], want["c.weight"]["exp_avg"])
    assert torch.equal(wrong["c.weight"]["exp_avg"], want["b.weight"]["exp_avg"])

    after = torch.optim.AdamW(
        build_param_groups(model, 0.1, no_decay_patterns=["re:^[bc]\\.weight$"]), lr=0.05
    )
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after))
    after.load_state_dict(remapped)
    assert_same_state(state_of_module(model, after), want)
    assert_labels_name_their_tensors(model, after)
    assert sorted(report.moved) == [("a.weight", "no_decay", "decay"), ("c.weight", "decay", "no_decay")]


def test_new_tensor_starts_fresh_and_removed_tensor_is_dropped() -> None:
    _, before = trained(lambda m: build_param_groups(m, 0.1))
    saved = before.state_dict()
    want = state_by_name(before)

    model = Three()
    model.a.weight.requires_grad_(False)  # gone from the groups
    model.extra = nn.Parameter(torch.zeros(3, 3))  # new
    after = torch.optim.AdamW(build_param_groups(model, 0.1), lr=0.05)
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after))
    after.load_state_dict(remapped)
    got = state_of_module(model, after)
    assert "extra" not in got and "a.weight" not in got
    del want["a.weight"]
    assert_same_state(got, want)
    assert report.fresh == ["extra"] and report.dropped == ["a.weight"]
    message = report.message()
    assert (
        message is not None and "1 tensor start fresh (extra)" in message and "dropped (a.weight)" in message
    )


def test_changed_shape_is_an_error_naming_the_tensor() -> None:
    _, before = trained(lambda m: build_param_groups(m, 0.1))
    model = Three()
    model.b = nn.Linear(6, 6, bias=False)
    model.b.weight = nn.Parameter(torch.zeros(5, 6))
    after = torch.optim.AdamW(build_param_groups(model, 0.1), lr=0.05)
    with pytest.raises(
        ValueError, match=r"`b.weight` \(exp_avg\) has shape \(6, 6\).*now has shape \(5, 6\)"
    ):
        remap_state_dict(before.state_dict(), after.param_groups, configured(after))


def test_without_names_different_sizes_is_an_error_naming_the_groups() -> None:
    _, before = trained(lambda m: list(m.parameters()))
    model = Three()
    after = torch.optim.AdamW(
        [
            {"params": [model.a.weight, model.b.weight]},
            {"params": [model.c.weight, model.out.weight, model.out.bias]},
        ]
    )
    with pytest.raises(ValueError, match=r"\[group0: 5 tensors\].*\[group0: 2 tensors, group1: 3 tensors\]"):
        remap_state_dict(before.state_dict(), after.param_groups, configured(after))


def test_without_names_same_sizes_loads_by_position_with_the_configured_hyperparameters() -> None:
    first, before = trained(lambda m: list(m.parameters()))
    saved = before.state_dict()
    model = Three()
    after = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.2)
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after))
    after.load_state_dict(remapped)
    assert not report.by_name
    for p_old, p_new in zip(first.parameters(), model.parameters(), strict=True):
        assert torch.equal(after.state[p_new]["exp_avg"], before.state[p_old]["exp_avg"])
    assert (after.param_groups[0]["lr"], after.param_groups[0]["weight_decay"]) == (0.01, 0.2)


def test_group_added_later_keeps_its_checkpoint_hyperparameters() -> None:
    """A third group added with add_param_group (named by name_added_group): its state follows by name, and its
    lr / weight_decay come from the checkpoint (the code that added it manages them), while configured groups
    take the configuration."""

    def with_added(model: Three, lr: float, weight_decay: float) -> torch.optim.AdamW:
        model.a.weight.requires_grad_(False)
        optimizer = torch.optim.AdamW(
            build_param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay
        )
        model.a.weight.requires_grad_(True)
        group = name_added_group(
            {"params": [model.a.weight], "lr": lr / 10}, optimizer.param_groups, named_tensor_ids(model)
        )
        optimizer.add_param_group(group)
        return optimizer

    torch.manual_seed(0)
    model = Three()
    before = with_added(model, 0.05, 0.1)
    for _ in range(2):
        before.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        before.step()
    before.param_groups[-1]["lr"] = 0.0123  # e.g. BackboneFinetuning's ramp
    saved = before.state_dict()
    want = state_by_name(before)

    model2 = Three()
    after = with_added(model2, 0.02, 0.3)
    configured_groups = [*configured(after)[:2], None]  # the added group is not part of the configuration
    remapped, _ = remap_state_dict(saved, after.param_groups, configured_groups)
    after.load_state_dict(remapped)
    assert_same_state(state_of_module(model2, after), want)
    assert_labels_name_their_tensors(model2, after)
    assert [g["param_names"] for g in after.param_groups][-1] == ["a.weight"]
    assert [(g.get("name"), g["lr"], g["weight_decay"]) for g in after.param_groups] == [
        ("decay", 0.02, 0.3),
        ("no_decay", 0.02, 0.0),
        (None, 0.0123, 0.1),
    ]
    assert isinstance(after.state[model2.a.weight]["step"], torch.Tensor)


def test_lr_rules() -> None:
    """'schedule' keeps the schedule's progress on the new base; 'checkpoint' keeps the saved lr; 'configured'
    takes the configured lr."""
    _, before = trained(lambda m: build_param_groups(m, 0.1))
    for g in before.param_groups:
        g["initial_lr"], g["lr"] = 0.05, 0.025  # halfway through some schedule
    saved = before.state_dict()
    after = torch.optim.AdamW(build_param_groups(Three(), 0.1), lr=0.2)
    for g in after.param_groups:
        g["initial_lr"] = 0.2
    for rule, want in (("schedule", 0.1), ("checkpoint", 0.025), ("configured", 0.2)):
        remapped, report = remap_state_dict(saved, after.param_groups, configured(after), lr_rule=rule)
        assert [g["lr"] for g in remapped["param_groups"]] == [want, want], rule
        assert [g["initial_lr"] for g in remapped["param_groups"]] == [0.2, 0.2]
    assert report.message() is not None and "decay lr 0.025 -> 0.2" in report.message()
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after), lr_rule="checkpoint")
    assert "kept from the checkpoint: decay lr 0.025 (configured 0.2)" in report.message()


def test_amsgrad_turned_on_at_resume_starts_the_maximum_from_exp_avg_sq() -> None:
    model, before = trained(lambda m: build_param_groups(m, 0.1))
    saved = before.state_dict()
    want = state_by_name(before)
    after = torch.optim.AdamW(build_param_groups(model, 0.1), lr=0.05, amsgrad=True)
    remapped, report = remap_state_dict(saved, after.param_groups, configured(after))
    after.load_state_dict(remapped)
    got = state_of_module(model, after)
    assert torch.equal(got["a.weight"]["max_exp_avg_sq"], want["a.weight"]["exp_avg_sq"])
    assert "amsgrad turned on" in (report.message() or "")
    model(torch.randn(4, 6)).sum().backward()
    after.step()  # without the fill: KeyError 'max_exp_avg_sq'


def test_identical_resume_says_nothing() -> None:
    _, before = trained(lambda m: build_param_groups(m, 0.1))
    after = torch.optim.AdamW(build_param_groups(Three(), 0.1), lr=0.05)
    _, report = remap_state_dict(before.state_dict(), after.param_groups, configured(after))
    assert report.message() is None


# ----------------------------------------------------------------------------------------------- group checks


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -1e-3),
        ("weight_decay", math.inf),
        ("weight_decay", -0.1),
        ("eps", math.inf),
        ("lr", torch.tensor(math.inf)),
    ],
)
def test_non_finite_or_negative_hyperparameter_is_refused_naming_key_and_group(
    key: str, value: object
) -> None:
    groups = build_param_groups(Three(), 0.1)
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    optimizer.param_groups[1][key] = value
    with pytest.raises(
        ValueError, match=rf"AdamW parameter group `no_decay` has `{key}`=.*--optimizer\.{key}"
    ):
        check_group_hyperparameters(optimizer.param_groups, "AdamW")


def test_betas_outside_unit_interval_and_adafactor_eps_tuple() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"`group0` has `betas`=\(0\.9, inf\): betas\[1\]"):
        check_group_hyperparameters([{"params": [p], "lr": 0.1, "betas": (0.9, math.inf)}])
    # Adafactor: eps is (None, 1e-3): None is allowed.
    check_group_hyperparameters(torch.optim.Adafactor([p]).param_groups)
    with pytest.raises(ValueError, match=r"`eps`=\(None, inf\)"):
        check_group_hyperparameters([{"params": [p], "lr": 0.1, "eps": (None, math.inf)}])


def test_name_added_group_fills_module_names_and_synthetic_ones() -> None:
    model = Three()
    optimizer = torch.optim.AdamW(build_param_groups(model, 0.1), lr=0.01)
    foreign = nn.Parameter(torch.zeros(2))
    group = name_added_group(
        {"params": [model.a.weight, foreign], "lr": 0.1}, optimizer.param_groups, named_tensor_ids(model)
    )
    assert group["param_names"] == ["a.weight", "added2.param1"] and group["lr"] == 0.1
    # Nothing to do: already named, or an optimizer without names.
    named = {"params": [("x", foreign)]}
    assert name_added_group(named, optimizer.param_groups, {}) is named
    plain = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    bare = {"params": [foreign]}
    assert name_added_group(bare, plain.param_groups, {}) is bare


def test_untracked_tensors_across_optimizers() -> None:
    model = Three()
    first = torch.optim.SGD([model.a.weight], lr=0.1)
    second = torch.optim.SGD([model.out.weight, model.out.bias], lr=0.1)
    names = [
        n for n, _ in untracked_tensors(model.named_parameters(), [*first.param_groups, *second.param_groups])
    ]
    assert names == ["b.weight", "c.weight"]


# ----------------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_resume_keeps_progress_and_takes_the_new_length_and_base() -> None:
    p = nn.Parameter(torch.zeros(2))
    old_opt = torch.optim.AdamW([p], lr=1.0)
    old = WarmupCosineLR(old_opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    for _ in range(10):
        old_opt.step()
        old.step()
    saved = old.state_dict()
    assert math.isclose(old_opt.param_groups[0]["lr"], 0.1)

    new_opt = torch.optim.AdamW([p], lr=2.0)
    new = WarmupCosineLR(new_opt, warmup_steps=2, total_steps=30, min_lr_ratio=0.1)
    new.load_state_dict(saved)
    assert (new.last_epoch, new.total_steps, new.base_lrs) == (10, 30, [2.0])
    want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (10 - 2) / (30 - 2))))
    assert math.isclose(new_opt.param_groups[0]["lr"], want, rel_tol=1e-12)
    assert new.resume_note is not None
    assert "total_steps 10 -> 30 (the resumed trainer is longer)" in new.resume_note
    assert "base lr 1 -> 2" in new.resume_note and "from step 10" in new.resume_note
    new_opt.step()
    new.step()
    want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (11 - 2) / (30 - 2))))
    assert math.isclose(new_opt.param_groups[0]["lr"], want, rel_tol=1e-12)

    # No total_steps of its own: the checkpoint's; same configuration: nothing to say.
    same_opt = torch.optim.AdamW([p], lr=1.0)
    same = WarmupCosineLR(same_opt, warmup_steps=2, total_steps=None, min_lr_ratio=0.1)
    same.load_state_dict(saved)
    assert same.total_steps == 10 and same.resume_note is None
    assert math.isclose(same_opt.param_groups[0]["lr"], 0.1)
