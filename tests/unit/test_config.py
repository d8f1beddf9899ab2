"""Settings: validation, TOML files, flags over files, one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from psops_mpi.cli import build_config, load_toml, parse_config
from psops_mpi.config import PSOConfig, TrainConfig
from psops_mpi.errors import UsageError


def test_defaults_are_valid_and_resolve_to_plain_values() -> None:
    cfg = TrainConfig()
    assert cfg.algo == "pso-ps" and cfg.dataset == "mnist1d"
    assert cfg.to_dict()["pso"]["w"] == PSOConfig().w


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"algo": "sgd"}, "unknown algo 'sgd'"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"sync_every": 0}, "--sync-every must be a positive integer"),
        ({"batch_size": -4}, "--batch-size must be a positive integer"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"lr": 0.0}, "--lr must be a positive number"),
        ({"lr": math.nan}, "--lr must be a positive number"),
        ({"w": -0.1}, "--w must be a finite number >= 0"),
        ({"c1": math.inf}, "--c1 must be a finite number >= 0"),
        ({"c2": math.nan}, "--c2 must be a finite number >= 0"),
        ({"vmax": 0.0}, "--vmax must be a positive number"),
        ({"fitness": "test"}, "unknown fitness 'test'"),
        ({"exchange": "ring"}, "unknown exchange"),
        ({"sync_every": "4"}, "--sync-every must be a positive integer"),
        ({"c3": -0.5}, "--c3 must be a finite number >= 0"),
        ({"c3": 1.5}, "--c3 must be between 0 and 1"),
        ({"rule": "centre", "c1": 0.2}, "--rule centre moves the swarm as one"),
        ({"overlap_steps": 2}, "--overlap-steps sets when a round left in flight lands"),
        ({"overlap": True, "overlap_steps": -1}, "--overlap-steps must be an integer >= 0"),
        ({"overlap": True, "sync_every": 8, "overlap_steps": 9},
         "--overlap-steps 9 is beyond the next round (--sync-every 8)"),
        ({"algo": "ssgd", "overlap": True}, "SSGD averages every step's gradient in fp32"),
        ({"algo": "ssgd", "exchange_dtype": "int8"}, "SSGD averages every step's gradient"),
        ({"exchange_dtype": "int4"}, "unknown exchange dtype 'int4'"),
        ({"pso_preset": "paper", "exchange_dtype": "int8"}, "the particle rule"),
        ({"exchange": "allgather", "exchange_dtype": "bf16"}, "use --exchange best or auto"),
        ({"local_after_steps": -1}, "--local-after-steps must be an integer >= 0"),
        ({"algo": "ssgd", "local_after_steps": 8}, "SSGD takes them all along"),
        ({"algo": "ssgd", "average_optimizer_state": True}, "one optimizer state already"),
        ({"algo": "slowmo", "average_optimizer_state": True, "reset_momentum": True},
         "choose one"),
    ],
)
def test_bad_values_raise_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        build_config(kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_toml_values_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('algo = "pa"\nsync-every = 32\nepochs = 3\n[pso]\nw = 0.9\n')
    assert load_toml(str(path))["sync_every"] == 32
    cfg = parse_config(["--config", str(path), "--epochs", "5", "--c2", "0.25"])
    assert (cfg.algo, cfg.sync_every, cfg.epochs) == ("pa", 32, 5)
    assert (cfg.pso.w, cfg.pso.c2) == (0.9, 0.25)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("algo = \n", "cannot read config file"),
        ("sync_evry = 3\n", "unknown setting(s) sync_evry"),
        ('epochs = "many"\n', "--epochs must be a positive integer"),
    ],
)
def test_bad_toml_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        parse_config(["--config", str(path)])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(UsageError, match="cannot read config file"):
        parse_config(["--config", str(tmp_path)])  # a directory


def test_flag_parse_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse_config(["--algo", "adam"])
    with pytest.raises(UsageError, match="invalid int value"):
        parse_config(["--epochs", "ten"])
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parse_config(["--no-such-flag"])


def test_the_default_pso_settings_are_the_default_preset() -> None:
    default = PSOConfig()
    assert default == PSOConfig.from_preset(default.pso_preset)


def test_a_preset_sets_every_pso_value_and_flags_override_it() -> None:
    paper = parse_config(["--pso-preset", "paper"]).pso
    assert (paper.rule, paper.w, paper.c1, paper.c2, paper.c3, paper.answer) == \
        ("particle", 0.5, 0.0, 1.0, 0.0, "gbest")  # psops_mpi 0.1's default, by hand
    centre = parse_config(["--pso-preset", "centre", "--w", "0.3"]).pso
    assert (centre.rule, centre.w, centre.pso_preset) == ("centre", 0.3, "centre")
    with pytest.raises(UsageError, match="invalid choice"):
        parse_config(["--pso-preset", "fancy"])
