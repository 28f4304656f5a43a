"""The shipped configs parse against the current signatures, the PACED family is a base plus
small overlays (``extends``), and its members differ only where their names say (schedule x
weighting)."""

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


def _settings(path: Path) -> list[str]:
    """The lines of a config that set something (no comments, no blank lines)."""
    lines = path.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize(
    "path", sorted(p for p in (CONFIGS / "paced").glob("*.yaml") if p.stem != "base"),
    ids=lambda p: p.stem,
)  # fmt: skip
def test_paced_configs_are_small_overlays_of_the_base(path: Path) -> None:
    content = yaml.safe_load(path.read_text())
    assert content["extends"] in {"base.yaml", "reverse_kl_paced.yaml", "two_stage_paced.yaml"}
    # A few lines each (the self-distillation overlay carries a 13-line teacher template).
    assert len(_settings(path)) <= (45 if path.stem == "self_distill_paced" else 25)


def test_extends_reads_the_base_first_and_refuses_loops(tmp_path, capsys) -> None:
    from lrkd.cli import expand_extends

    base = tmp_path / "base.yaml"
    base.write_text((CONFIGS / "paced" / "base.yaml").read_text())
    over = tmp_path / "over.yaml"
    over.write_text("extends: base.yaml\nmodel:\n  loss:\n    divergence: tvd\n")
    args = expand_extends(["fit", "--config", str(over)])
    assert args[:3] == ["fit", "--config", str(base.resolve())]
    assert yaml.safe_load(args[4]) == {"model": {"loss": {"divergence": "tvd"}}}
    config = _resolved(over, capsys)
    assert config["model"]["loss"]["divergence"] == "tvd"
    assert config["model"]["loss"]["clone_weight"] == 0.2  # the rest of the block: the base's
    assert config["data"]["init_args"]["num_problems"] == 128  # from the base
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="circle"):
        expand_extends(["fit", "--config", str(loop)])
    missing = tmp_path / "missing.yaml"
    missing.write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml"):
        expand_extends(["fit", f"--config={missing}"])


def test_a_config_of_the_previous_layout_names_every_renamed_argument(capsys) -> None:
    """configs/paced/forward_kl_paced.yaml as shipped before the module's and the DataModule's
    arguments were grouped (tests/data/old_layout_forward_kl_paced.yaml): lrkd fit refuses it
    and says where each flat argument went, and so for old --model and --data flags."""
    old = Path(__file__).resolve().parents[1] / "data" / "old_layout_forward_kl_paced.yaml"
    flags = ["--data.val_num_rollouts", "1", "--model.jsd_beta=0.3", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(old), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # 7 model and 15 data arguments in the file, one of each on the command line.
    assert err[-1] == (
        "error: rename model.divergence -> model.loss.divergence and 23 more, as shown above "
        "(docs/configuration.md)"
    )
    expected = [
        "model.divergence -> model.loss.divergence",
        "model.ce_weight -> model.loss.ce_weight",
        "model.on_policy_fraction -> model.on_policy.fraction",
        "model.on_policy_max_new_tokens -> model.on_policy.max_new_tokens",
        "model.jsd_beta -> model.loss.jsd_beta (command line)",
        "data.weighting -> data.pacing.weighting",
        "data.num_rollouts -> data.rollouts.num_samples",
        "data.teacher_responses -> data.teacher_responses.source",
        "data.val_num_rollouts -> data.validation.num_samples (command line)",
    ]
    for line in expected:
        assert any(line in e for e in err), line


def test_block_flags_of_the_new_layout_are_not_taken_for_old_ones() -> None:
    from lrkd.cli import renamed_arguments

    new = [
        "fit",
        "--model.loss.ce_weight",
        "0.5",
        "--model.on_policy",
        "{fraction: 1.0}",
        "--data.teacher_responses",
        "{source: generate}",
        "--model.teacher_dtype",
        "float32",
    ]
    assert renamed_arguments(new) == []
    assert renamed_arguments(["fit", "--data.teacher_responses=generate"]) == [
        "data.teacher_responses -> data.teacher_responses.source (command line)"
    ]


def _normalised(config: dict) -> dict:
    """Drop the settings that the schedule and the weighting are meant to change."""
    config = copy.deepcopy(config)
    model, data = config["model"], config["data"]["init_args"]
    model["loss"].pop("divergence")
    model["on_policy"].pop("fraction")
    for key in ("weighting", "estimate_at_start", "estimate_every_n_steps"):
        data["pacing"].pop(key)
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
        assert data["pacing"]["weighting"] == weighting
        assert data["pacing"]["estimate_at_start"] == (weighting == "paced")
        two_stage = [
            c["init_args"] for c in config["trainer"]["callbacks"]
            if c["class_path"] == "lrkd.callbacks.two_stage.TwoStageKL"
        ]  # fmt: skip
        if schedule == "forward_kl":
            assert (model["loss"]["divergence"], model["on_policy"]["fraction"], two_stage) == (
                "forward_kl", 0.0, [],
            )  # fmt: skip
        elif schedule == "reverse_kl":
            assert (model["loss"]["divergence"], model["on_policy"]["fraction"], two_stage) == (
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


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (CONFIGS / "paced").glob("*.yaml") if p.stem != "self_distill_paced"),
    ids=lambda p: p.stem,
)
def test_paced_lrc_configs_warm_up_from_1e_5_to_at_most_1e_4(path: Path, capsys) -> None:
    """The 504-wide activation_pca clone's first AdamW steps at 3e-4 blew its CE from 2.0 to
    11.8 (docs/lowrank.md, "Learning rate"): every LRC config of the family warms up."""
    import torch

    model = _resolved(path, capsys)["model"]
    assert model["student"]["init_args"]["init"] == "activation_pca"
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(params, **model["optimizer"]["init_args"])
    scheduler_class = getattr(
        torch.optim.lr_scheduler, model["lr_scheduler"]["class_path"].split(".")[-1]
    )
    scheduler = scheduler_class(optimizer, **model["lr_scheduler"]["init_args"])
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-4)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(lrs))  # warms up, never jumps
