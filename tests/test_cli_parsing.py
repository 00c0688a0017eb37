"""``lightning-adamw`` parses what the command line says: a changed class starts from its own defaults, no
option is abbreviated, and ``lightning-adamw fit`` alone is the built-in job.

In-process parses (``AdamWCLI(..., run=False)`` without building anything) and short real fits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_adamw.cli import AdamWCLI, main
from lightning_adamw.cli.parser import check_mechanism
from lightning_adamw.demo import DigitsClassifier
from tests.helpers.cli_models import RegressionData, UserRegressor

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
USER_MODEL = "tests.helpers.cli_models.UserRegressor"
USER_DATA = "tests.helpers.cli_models.RegressionData"
# The user's classes' own defaults; the quickstart config has lr 0.003, weight_decay 0.05, cosine, 20, 64.
# DigitsDataModule's defaults: what DigitsClassifier uses by itself when no data module is given.
DIGITS_DATA_DEFAULTS = {
    "batch_size": 64,
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "seed": 0,
    "num_workers": 0,
}
USER_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant", "warmup_steps": 0, "hidden": 16}
FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


class _ParseOnly(AdamWCLI):
    def instantiate_classes(self) -> None:
        pass


def parse(*args: str) -> dict[str, Any]:
    return _ParseOnly(args=list(args), run=False).config.as_dict()


def init_args(config: dict[str, Any], key: str) -> dict[str, Any]:
    return config[key]["init_args"]


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-adamw:")]


# ---------------------------------------------------------------------------------------------- class change


def test_the_mechanism_is_there() -> None:
    check_mechanism()  # the jsonargparse function the rule wraps exists in the installed version


@pytest.mark.parametrize(
    "model_args",
    [
        ["--model", USER_MODEL],
        [f"--model={USER_MODEL}"],
        ["--model.class_path", USER_MODEL],
        [f"--model={{class_path: {USER_MODEL}}}"],
    ],
    ids=["space", "equals", "class_path", "inline-yaml"],
)
def test_model_after_a_config_starts_from_its_own_defaults(
    model_args: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        config = parse("--config", QUICKSTART, *model_args, "--data", USER_DATA)
    assert config["model"]["class_path"] == USER_MODEL
    assert init_args(config, "model") == USER_DEFAULTS
    assert init_args(config, "data") == {"batch_size": 16}
    lines = info_lines(caplog)
    (model_line,) = [line for line in lines if "UserRegressor (given on the command line)" in line]
    for shown in ("lr=0.003", "weight_decay=0.05", "lr_schedule='cosine'", "warmup_steps=20"):
        assert shown in model_line
    (data_line,) = [line for line in lines if "RegressionData" in line]
    assert "batch_size=64" in data_line and "not carried over" in data_line


def test_replacing_the_built_in_job_s_defaults_says_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a config, the built-in job's classes hold only their own defaults: nothing the user wrote is
    dropped, so no "not carried over" line; one a user set first (--model.hidden) is named, once."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        config = parse("--model", USER_MODEL, "--data", USER_DATA)
    assert init_args(config, "model") == USER_DEFAULTS
    assert not [line for line in info_lines(caplog) if "not carried over" in line]
    caplog.clear()
    # a config that replaces the built-in class: its defaults were not the user's either, and one line at most
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"model:\n  class_path: {USER_MODEL}\n  init_args:\n    hidden: 4\n")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        parse("--config", str(mine))
    assert not [line for line in info_lines(caplog) if "not carried over" in line]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        parse("--model.hidden", "7", "--model", USER_MODEL)
    (line,) = [line for line in info_lines(caplog) if "not carried over" in line]
    assert "hidden=7" in line and "lr=" not in line


def test_arguments_after_the_change_and_later_configs_apply(tmp_path: Path) -> None:
    later = tmp_path / "later.yaml"
    later.write_text("model:\n  init_args:\n    hidden: 8\n")  # no class_path: for the class now chosen
    config = parse(
        "--config", QUICKSTART, "--model", USER_MODEL, "--model.lr", "0.02", "--config", str(later)
    )
    assert init_args(config, "model") == {**USER_DEFAULTS, "lr": 0.02, "hidden": 8}


def test_class_change_inside_a_config_file_and_a_sub_config(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"model:\n  class_path: {USER_MODEL}\n  init_args:\n    hidden: 4\n")
    assert init_args(parse("--config", QUICKSTART, "--config", str(mine)), "model") == {
        **USER_DEFAULTS,
        "hidden": 4,
    }
    sub = tmp_path / "model.yaml"
    sub.write_text(f"class_path: {USER_MODEL}\ninit_args:\n  warmup_steps: 3\n")
    assert init_args(parse("--config", QUICKSTART, "--model", str(sub)), "model") == {
        **USER_DEFAULTS,
        "warmup_steps": 3,
    }


def test_the_same_class_again_keeps_the_config_values() -> None:
    config = parse(
        "--config", QUICKSTART, "--model", "lightning_adamw.demo.DigitsClassifier", "--model.hidden=7"
    )
    args = init_args(config, "model")
    assert (args["lr"], args["weight_decay"], args["warmup_steps"], args["hidden"]) == (0.003, 0.05, 20, 7)


def test_a_subclass_keeps_the_values_set_for_its_base_class(caplog: pytest.LogCaptureFixture) -> None:
    """The values *set* for the base class carry over (the subclass has the same parameters); the base class's
    defaults do not, so the subclass's own defaults win: quickstart's warmup_steps 20 is DigitsClassifier's
    default, so SlowDigitsClassifier keeps its own 5."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        config = parse(
            "--config",
            QUICKSTART,
            "--model.lr=0.01",
            "--model.hidden=32",
            "--model",
            "tests.helpers.cli_models.SlowDigitsClassifier",
        )
    args = init_args(config, "model")
    assert (args["lr"], args["hidden"], args["warmup_steps"], args["weight_decay"]) == (0.01, 32, 5, 0.05)
    (line,) = [line for line in info_lines(caplog) if "SlowDigitsClassifier" in line]
    assert "a base class of it" in line and "lr=0.01, hidden=32 were carried over" in line


def test_a_changed_optimizer_class_starts_from_its_own_defaults(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        config = parse("--config", str(ROOT / "configs" / "gpu.yaml"), "--optimizer", "SGD")
    sgd = init_args(config, "optimizer")
    # torch's SGD defaults, not gpu.yaml's AdamW lr 0.003, weight_decay 0.05, fused true
    assert (sgd["lr"], sgd["weight_decay"], sgd["fused"]) == (1e-3, 0.0, None)
    (line,) = [line for line in info_lines(caplog) if "SGD" in line]
    assert "lr=0.003" in line and "weight_decay=0.05" in line and "fused=True" in line


def test_print_config_shows_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model", USER_MODEL, "--data", USER_DATA, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"] == USER_DEFAULTS
    assert printed["data"]["init_args"] == {"batch_size": 16}


def test_the_rule_is_scoped_to_adamw_cli() -> None:
    """Stock LightningCLI in the same process keeps jsonargparse's own behaviour (the carry-over)."""

    class StockParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    parse("--config", QUICKSTART, "--model", USER_MODEL)  # installs the wrapper
    stock = StockParseOnly(
        args=["--config", QUICKSTART, "--model", USER_MODEL], run=False, subclass_mode_model=True
    ).config
    assert stock.model.init_args.lr == 0.003  # jsonargparse's carry-over, untouched outside AdamWCLI


def test_user_model_and_data_after_the_quickstart_train_with_their_own_settings(tmp_path: Path) -> None:
    cli = AdamWCLI(
        args=[
            "fit",
            "--config",
            QUICKSTART,
            "--model",
            USER_MODEL,
            "--data",
            USER_DATA,
            f"--trainer.default_root_dir={tmp_path}",
            *FAST,
        ]
    )
    assert isinstance(cli.model, UserRegressor) and isinstance(cli.datamodule, RegressionData)
    opt = cli.trainer.optimizers[0]
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("decay", 1e-3, 0.0),
        ("no_decay", 1e-3, 0.0),
    ]
    assert cli.trainer.lr_scheduler_configs == []  # lr_schedule "constant": no scheduler
    assert len(next(iter(cli.trainer.train_dataloader))[0]) == 16


# ---------------------------------------------------------------------------------------------- default job


def test_no_config_is_the_built_in_job() -> None:
    config = parse()
    assert config["model"]["class_path"] == "lightning_adamw.demo.DigitsClassifier"
    assert init_args(config, "model")["lr"] == 0.003 and init_args(config, "model")["warmup_steps"] == 20
    assert config["data"] is None  # DigitsClassifier brings DigitsDataModule() itself
    assert (config["trainer"]["max_epochs"], config["trainer"]["log_every_n_steps"]) == (8, 10)


def test_quickstart_config_is_the_built_in_job_written_out() -> None:
    built_in, written = parse(), parse("--config", QUICKSTART)
    assert built_in["model"] == written["model"]
    assert written["data"] == {
        "class_path": "lightning_adamw.demo.DigitsDataModule",
        "init_args": DIGITS_DATA_DEFAULTS,
    }
    for key in ("max_epochs", "log_every_n_steps"):
        assert built_in["trainer"][key] == written["trainer"][key]
    assert built_in["seed_everything"] == written["seed_everything"] == 0


def test_no_config_and_another_model_starts_from_its_defaults() -> None:
    config = parse("--model", USER_MODEL)
    assert init_args(config, "model") == USER_DEFAULTS
    assert config["data"] is None


def test_built_in_job_trains_on_digits_without_data(tmp_path: Path) -> None:
    cli = AdamWCLI(args=["fit", f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert isinstance(cli.model, DigitsClassifier) and cli.datamodule is None
    images, labels = next(iter(cli.trainer.train_dataloader))
    assert tuple(images.shape) == (64, 1, 8, 8) and int(labels.max()) <= 9
    assert cli.trainer.global_step == 2
    opt = cli.trainer.optimizers[0]
    assert [(g["name"], g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("decay", 0.003, 0.05),
        ("no_decay", 0.003, 0.0),
    ]


def test_a_cli_for_one_model_gets_no_built_in_defaults() -> None:
    config = _ParseOnly(UserRegressor, args=[], run=False, subclass_mode_model=False).config.as_dict()
    assert config["model"] == USER_DEFAULTS
    assert config["trainer"]["max_epochs"] is None  # Lightning's own default


# ---------------------------------------------------------------------------------------------- abbreviations


@pytest.mark.parametrize(
    ("given", "bad", "meant"),
    [
        (["fit", "--trainer.max_epoch", "2"], "--trainer.max_epoch", "--trainer.max_epochs"),
        (["fit", "--trainer.max_epoch=2"], "--trainer.max_epoch", "--trainer.max_epochs"),
        (["fit", "--seed", "1"], "--seed", "--seed_everything"),
        (["--trainer.max_epoch", "2"], "--trainer.max_epoch", "--trainer.max_epochs"),  # no subcommand
    ],
)
def test_abbreviated_options_are_errors(
    given: list[str], bad: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _ParseOnly(args=given, run=given[0] == "fit")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"unrecognized option '{bad}': abbreviated options are not accepted; did you mean '{meant}'?" in err
    )


def test_abbreviations_are_errors_in_class_groups_and_with_allow_abbrev_false(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A fixed model class: its arguments are options of the top-level parser (--model.warmup_steps).
    with pytest.raises(SystemExit):
        _ParseOnly(UserRegressor, args=["--model.warmup", "3"], run=False, subclass_mode_model=False)
    assert "did you mean '--model.warmup_steps'" in capsys.readouterr().err
    # argparse's allow_abbrev=False names no candidates; lightning-adamw still does, per subcommand too.
    with pytest.raises(SystemExit):
        _ParseOnly(args=["fit", "--trainer.max_epoch", "2"], parser_kwargs={"fit": {"allow_abbrev": False}})
    assert "'--trainer.max_epochs'" in capsys.readouterr().err
    # A subclass-mode model: jsonargparse refuses the unknown nested key itself.
    with pytest.raises(SystemExit):
        _ParseOnly(args=["fit", "--model", USER_MODEL, "--model.warmup", "3"])
    assert "warmup" in capsys.readouterr().err


def test_full_option_names_and_appends_still_work() -> None:
    config = parse(
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=LearningRateMonitor",
        "--trainer.callbacks.logging_interval=step",
        "-c",
        QUICKSTART,
    )
    assert config["trainer"]["max_epochs"] == 8  # the config given after it wins
    (callback,) = config["trainer"]["callbacks"]
    assert callback["init_args"]["logging_interval"] == "step"
