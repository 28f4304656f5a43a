"""The shipped configs parse against the current signatures, and the PACED family differs only
where its names say (schedule x weighting)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import yaml

from lrkd.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEDULES = ("forward_kl", "reverse_kl", "two_stage")
WEIGHTINGS = ("paced", "uniform")


def _resolved(path: Path, capsys, *more: Path) -> dict:
    """The whole config as LightningCLI resolves it (validated, nothing instantiated)."""
    configs = [arg for p in (path, *more) for arg in ("--config", str(p))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "strategies")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path: Path, capsys) -> None:
    config = _resolved(path, capsys)
    assert config["model"]["teacher"]
    assert config["trainer"]["max_steps"] > 0


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "strategies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_strategy_config_combines_with_a_run_config(path: Path, capsys) -> None:
    """``--config RUN.yaml --config strategies/X.yaml`` changes only trainer placement and
    precision settings and the model's memory switches, nothing about the run itself."""
    run = CONFIGS / ("plain_kd.yaml" if "fsdp1" in path.stem else "quickstart.yaml")
    alone, combined = _resolved(run, capsys), _resolved(run, capsys, path)
    own = yaml.safe_load(path.read_text())
    assert set(own) <= {"trainer", "model"}
    for section, values in own.items():
        for key in values:
            combined[section].pop(key)
            alone[section].pop(key)
    assert combined == alone
    strategy = own["trainer"]["strategy"]
    if isinstance(strategy, dict):
        import importlib

        module, name = strategy["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert cls(**strategy.get("init_args", {})) is not None  # the arguments are accepted


def _normalised(config: dict) -> dict:
    """Drop the settings that the schedule and the weighting are meant to change."""
    config = copy.deepcopy(config)
    model, data = config["model"], config["data"]["init_args"]
    for key in ("divergence", "on_policy_fraction"):
        model.pop(key)
    for key in ("weighting", "estimate_at_start", "estimate_every_n_steps"):
        data.pop(key)
    trainer = config["trainer"]
    trainer["logger"]["init_args"].pop("name")
    trainer["callbacks"] = [
        {**c, "init_args": {k: v for k, v in c["init_args"].items() if k != "dirpath"}}
        for c in trainer["callbacks"]
        if not c["class_path"].endswith("TwoStageKL")
    ]
    return config


def test_paced_family_differs_only_in_schedule_and_weighting(capsys) -> None:
    configs = {
        (s, w): _resolved(CONFIGS / "paced" / f"{s}_{w}.yaml", capsys)
        for s, w in itertools.product(SCHEDULES, WEIGHTINGS)
    }
    reference = _normalised(configs["forward_kl", "paced"])
    for key, config in configs.items():
        assert _normalised(config) == reference, key

    for (schedule, weighting), config in configs.items():
        model, data = config["model"], config["data"]["init_args"]
        name = f"{schedule}_{weighting}"
        assert config["trainer"]["logger"]["init_args"]["name"] == name
        assert data["weighting"] == weighting
        assert data["estimate_at_start"] == (weighting == "paced")
        two_stage = [
            c["init_args"] for c in config["trainer"]["callbacks"]
            if c["class_path"] == "lrkd.callbacks.two_stage.TwoStageKL"
        ]  # fmt: skip
        if schedule == "forward_kl":
            assert (model["divergence"], model["on_policy_fraction"], two_stage) == (
                "forward_kl", 0.0, [],
            )  # fmt: skip
        elif schedule == "reverse_kl":
            assert (model["divergence"], model["on_policy_fraction"], two_stage) == (
                "reverse_kl", 1.0, [],
            )  # fmt: skip
        else:
            (stages,) = two_stage
            assert (stages["first_divergence"], stages["second_divergence"]) == (
                "forward_kl", "reverse_kl",
            )  # fmt: skip
            assert (stages["first_on_policy_fraction"], stages["second_on_policy_fraction"]) == (
                0.0, 1.0,
            )  # fmt: skip
            assert stages["switch_fraction"] == 0.5
