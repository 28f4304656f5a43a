"""The ``lrkd`` command: LightningCLI over :class:`lrkd.module.DistillationModule`.

``lrkd fit|validate|test|predict --config CONFIG.yaml``; ``--print_config`` prints the whole
resolved config and ``lrkd fit --help`` every argument with its documentation.
``lrkd export --ckpt_path CKPT --out DIR`` writes a checkpoint's student as a plain Hugging Face
model directory (a low-rank clone is materialised first).
``lrkd rank --teacher NAME --num_tokens N`` prints the rank advisor's table: the student width
r* = c * sqrt(N) suggests and the teacher's spectral tail at each width.
``lrkd prepare`` tokenises and packs records ahead of time; ``lrkd cache-teacher`` runs the
teacher once over prepared data and stores its top-k log-probabilities, so that ``lrkd fit`` with
``model.teacher_cache`` trains without loading it.
``lrkd eval --model DIR|CKPT|NAME --tasks [..] --compare TEACHER`` scores models with
lm-evaluation-harness (the ``eval`` extra).
``lrkd env`` prints the versions and hardware a bug report needs; ``lrkd --version`` lrkd's.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from lrkd import __version__
from lrkd.callbacks.pacing import PassRatePacing
from lrkd.callbacks.preemption import Preempted, PreemptionCheckpoint
from lrkd.checkpointing import AtomicCheckpointIO
from lrkd.data.datamodule import DistillDataModule
from lrkd.data.paced_settings import RENAMED as DATA_RENAMED
from lrkd.data.teacher_cache import TEACHER_DIR, read_teacher_cache
from lrkd.diagnostics.rank import DEFAULT_C, RankReport, rank_report
from lrkd.distributed import close_process_group
from lrkd.env import report as env_report
from lrkd.errors import (
    MissingDependency,
    setting_error,
    short_message,
    wrapped_missing_dependency,
)
from lrkd.export import export, read_checkpoint
from lrkd.hardware import auto_precision
from lrkd.models.teachers import load_teacher
from lrkd.module import RENAMED as MODEL_RENAMED
from lrkd.module import DistillationModule
from lrkd.preflight import check_hardware, check_trainer, resume_differences

log = logging.getLogger("lrkd")

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "lrkd"},
    },
}


def default_precision() -> str:
    """``trainer.precision`` when a config gives none: ``bf16-mixed`` where bf16 is fast (a
    CUDA GPU that supports it, or a CPU whose measured bf16 matmul is clearly faster than fp32:
    :mod:`lrkd.hardware`), else ``32-true`` (Lightning's own default)."""
    return auto_precision()


class ShortErrorParser(LightningArgumentParser):
    """The parser of ``lrkd fit`` & co.: a bad argument ends in one short line naming the field
    (:func:`lrkd.errors.short_message`), not the alternatives jsonargparse tried."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the usage and ``error: <field>: <reason>``, and exit with status 2."""
        super().error(short_message(message), ex)


class LRKDCLI(LightningCLI):
    """LightningCLI with lrkd's defaults: TensorBoard logs and checkpoints under ``runs/``, and
    bf16 mixed precision where the hardware runs bf16 fast (:func:`default_precision`).

    Values shared by model and data are wired here, once, when the config is parsed: the data's
    tokenizer is the teacher's when the config gives a teacher by name and no ``data.tokenizer``;
    a :class:`~lrkd.data.datamodule.DistillDataModule` gets its
    :class:`~lrkd.callbacks.pacing.PassRatePacing` callback.

    Bad settings fail before any work, each with one line that names the field
    (:mod:`lrkd.preflight`); resuming with ``--ckpt_path`` follows the rules of
    :func:`lrkd.preflight.resume_differences` (docs/failures.md).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, check that a ``--ckpt_path`` file is a readable checkpoint, and keep the
        config's model section: LightningCLI then replaces it by the checkpoint's."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        self._resumed: dict[str, Any] | None = None
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(Path(ckpt_path), "--ckpt_path")
            self._resumed = {"path": ckpt_path, "model": config["model"].clone()}

    def before_instantiate_classes(self) -> None:
        """Apply the resume rules, and fill in ``data.tokenizer`` from ``model.teacher`` (or
        ``data.prepared`` and ``data.tokenizer`` from ``model.teacher_cache``)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self._resumed is not None:
            self._apply_resume_rules(config)
        data, model = config.get("data"), config.get("model")
        teacher = model.get("teacher") if model is not None else None
        init_args = data.get("init_args") if data is not None else None
        cache = model.get("teacher_cache") if model is not None else None
        if cache is not None:
            wire_teacher_cache(cache, data)
            return
        wants = init_args is not None and "tokenizer" in init_args
        if isinstance(teacher, str) and wants and init_args.tokenizer is None:
            init_args.tokenizer = teacher

    def _apply_resume_rules(self, config: Any) -> None:
        """Refuse a config whose teacher, student, optimizer or scheduler differs from the
        checkpoint's; for the other model settings, the config wins and the change is logged."""
        assert self._resumed is not None
        given = self._resumed["model"]
        refused, changed = resume_differences(given.as_dict(), config["model"].as_dict())
        if refused:
            fields = ", ".join(line.split(":")[0] for line in refused)
            print("lrkd: a resumed run cannot change these settings of its checkpoint:\n  "
                  + "\n  ".join(refused), file=sys.stderr)  # fmt: skip
            print(f"error: --ckpt_path {self._resumed['path']}: the config differs from the "
                  f"checkpoint in {fields}; use the checkpoint's values or start a new run "
                  "(docs/failures.md)", file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
        for line in changed:
            log.warning("lrkd: resuming with a changed setting: %s (the config's is used)", line)
        config["model"] = given

    def instantiate_classes(self) -> None:
        """Instantiate; a setting that lrkd's code refuses ends the command with its message as
        the last line (``LRKD_TRACEBACK=1`` shows the traceback)."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError, RuntimeError) as err:
            cause = setting_error(err) or wrapped_missing_dependency(err)
            if cause is None or os.environ.get("LRKD_TRACEBACK"):
                raise
            message = " ".join(str(cause).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer (after :func:`lrkd.preflight.check_hardware`), with what lrkd adds where
        the config gives none: PassRatePacing for a DistillDataModule, PreemptionCheckpoint
        (last, so that every other callback sees the step a SIGTERM stops at) and
        AtomicCheckpointIO (checkpoint temporaries beside the checkpoint, not in $TMPDIR)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer", {})
        check_hardware(trainer.get("accelerator"), trainer.get("strategy"))
        if "callbacks" not in kwargs:
            callbacks = _as_list(trainer.get("callbacks"))
            if isinstance(self.datamodule, DistillDataModule) and not any(
                isinstance(c, PassRatePacing) for c in callbacks
            ):
                callbacks.append(PassRatePacing())
            if not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
                callbacks.append(PreemptionCheckpoint())
            kwargs["callbacks"] = callbacks
        if "plugins" not in kwargs:
            plugins = _as_list(trainer.get("plugins"))
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Refuse a run that would train nothing or could not save its work
        (:func:`lrkd.preflight.check_trainer`)."""
        try:
            check_trainer(self.trainer)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from err


def _function_main(function: Any, prog: str, description: str, argv: list[str]) -> Any:
    """Run a subcommand that is one function: its arguments parsed from ``argv`` by its
    signature and docstring (``--help``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_function_arguments(function)
    return function(**parser.parse_args(argv).as_dict())


def wire_teacher_cache(cache: str, data: Any) -> None:
    """Point the data at ``model.teacher_cache``: ``data.prepared`` (when the config gives no
    data source, or the prepared data the cache was made from) and ``data.tokenizer`` (the
    cache's copy of the teacher's tokenizer).

    Raises:
        SystemExit: no teacher cache there, a DataModule that cannot read one, or other data
            than the cache's.
    """
    try:
        info = read_teacher_cache(cache)
    except (OSError, ValueError) as err:
        _exit(str(err))
    init_args = data.get("init_args") if data is not None else None
    if init_args is None or "prepared" not in init_args:
        name = data.get("class_path") if data is not None else None
        _exit(f"model.teacher_cache needs prepared data read by lrkd.data.text.TextDataModule "
              f"(data.class_path), not {name}")  # fmt: skip
    if init_args.get("train_files") is not None or init_args.get("streaming"):
        _exit("model.teacher_cache: the data comes from the cache; leave data.train_files "
              "(and data.streaming) out")  # fmt: skip
    given = init_args.prepared
    source = (info.prepared or {}).get("path")
    if given is not None and not _same_dir(given, cache):
        if not (source and _same_dir(given, source)):
            _exit(f"data.prepared={given!r} is neither model.teacher_cache={cache!r} nor the "
                  "data it was made from: the batches must carry the cache's teacher log-probs; "
                  "leave data.prepared out (lrkd fit sets it)")  # fmt: skip
        log.info("lrkd: data.prepared %s -> %s (the teacher cache made from it)", given, cache)
    init_args.prepared = cache
    if "tokenizer" in init_args and init_args.tokenizer is None:
        init_args.tokenizer = str(Path(cache).expanduser() / TEACHER_DIR)


def _same_dir(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rank(
    teacher: str,
    num_tokens: float,
    c: float = DEFAULT_C,
    widths: list[int] | None = None,
    probe_tokens: int = 4096,
) -> RankReport:
    """Print the rank advisor's table for a teacher and a training token budget.

    The suggested student width (Low-Rank Clone hidden size) is r* = c * sqrt(num_tokens),
    rounded to a multiple of the teacher's attention heads; for each width the table gives the
    share of the teacher's hidden-state variance (on a probe of the built-in corpus) that a
    student of that width cannot represent. See docs/theory.md.

    Args:
        teacher: built-in name, local directory or hub id of the teacher.
        num_tokens: the number of training tokens n (e.g. 1e8).
        c: the constant in r* = c * sqrt(n); the theory gives only the order sqrt(n), and the
            default 0.01 is a calibration convention, not derived.
        widths: the widths to tabulate (e.g. [72, 144]); default: multiples of the heads at
            about 1/8, 1/4, 3/8, 1/2, 3/4 and 1 of the teacher width. The suggested width is
            always added.
        probe_tokens: about how many probe tokens to measure the spectra on.

    Returns:
        The report (its table is printed).
    """

    model = load_teacher(teacher, dtype=torch.float32, field="--teacher")
    report = rank_report(model, num_tokens, c=c, widths=widths, probe_tokens=probe_tokens)
    print(report.table())
    return report


def expand_extends(argv: list[str]) -> list[str]:
    """``--config FILE`` whose YAML begins with ``extends: OTHER.yaml`` (a path relative to
    FILE) becomes ``--config OTHER.yaml --config <FILE without that key>``, recursively, so an
    overlay config sets only what differs from its base and the later values win (see
    configs/paced/)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += _expanded_config(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            out += _expanded_config(arg.split("=", 1)[1])
        else:
            out.append(arg)
        i += 1
    return out


def _expanded_config(value: str, seen: tuple[Path, ...] = ()) -> list[str]:
    import yaml

    path = Path(value)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        return ["--config", value]
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict) or "extends" not in content:
        return ["--config", value]
    base = (path.parent / str(content.pop("extends"))).resolve()
    if base in seen or base == path.resolve():
        raise ValueError(f"--config {value}: `extends` goes round in a circle through {base}.")
    if not base.is_file():
        raise FileNotFoundError(f"--config {value}: extends {base}, which does not exist.")
    rest = ["--config", yaml.safe_dump(content)] if content else []
    return _expanded_config(str(base), (*seen, path.resolve())) + rest


#: Per config section, the arguments of an earlier flat layout -> their place in a block now.
RENAMED: dict[str, dict[str, str]] = {
    "model": MODEL_RENAMED,
    "data": {**DATA_RENAMED, "teacher_responses": "teacher_responses.source"},
}


def _renamed_in(section: str, key: str, value: Any) -> bool:
    # ``data.teacher_responses`` is now a block; only its old string form was renamed.
    if section == "data" and key == "teacher_responses":
        return isinstance(value, str)
    return key in RENAMED[section]


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def renamed_arguments(argv: list[str]) -> list[str]:
    """The DistillationModule and DistillDataModule arguments of an earlier layout that ``argv``
    still uses (in its ``--config`` files, YAML strings or ``--model.*``/``--data.*`` flags),
    each as ``old -> new``."""
    import yaml

    found: list[str] = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        if value is not None:
            path = Path(value)
            try:
                content = yaml.safe_load(path.read_text() if path.is_file() else value)
            except (OSError, yaml.YAMLError):
                continue
            where = str(path) if path.is_file() else "--config"
            for section in RENAMED:
                block = content.get(section) if isinstance(content, dict) else None
                args = block.get("init_args", block) if isinstance(block, dict) else None
                for key, val in (args or {}).items():
                    if _renamed_in(section, key, val):
                        found.append(f"{section}.{key} -> {section}.{RENAMED[section][key]} "
                                     f"({where})")  # fmt: skip
        flag, _, given = arg.partition("=")
        given = given or (argv[i + 1] if i + 1 < len(argv) else "")
        for section in RENAMED:
            for prefix in (f"--{section}.init_args.", f"--{section}."):
                key = flag[len(prefix) :] if flag.startswith(prefix) else None
                if key is not None and _renamed_in(section, key, _yaml_value(given)):
                    found.append(f"{section}.{key} -> {section}.{RENAMED[section][key]} "
                                 "(command line)")  # fmt: skip
                    break
    return found


SUBCOMMANDS: dict[str, str] = {
    "fit": "train a student (LightningCLI; --config FILE, --print_config, --help)",
    "validate": "run the validation loop on a checkpoint (--ckpt_path)",
    "test": "run the test loop on a checkpoint (--ckpt_path)",
    "predict": "the student's greedy next-token predictions (--ckpt_path)",
    "prepare": "tokenise and pack records into a memory-mapped dataset (--train_files, --out)",
    "cache-teacher": "store the teacher's top-k log-probs over prepared data (--prepared, --out)",
    "export": "write a checkpoint's student as a plain Hugging Face model (--ckpt_path, --out)",
    "rank": "suggest a student width for a token budget (--teacher, --num_tokens)",
    "eval": "score models with lm-evaluation-harness, side by side (--model, --tasks, --compare)",
    "env": "versions, CPU/GPU capabilities and lrkd's supported ranges, for bug reports",
}


#: The subcommands that are one function (:func:`_functions`).
FUNCTIONS = ("export", "prepare", "cache-teacher", "rank", "eval")


def _functions() -> dict[str, tuple[Any, str]]:
    """The subcommands that are one function: name -> (the function, its description); the
    data commands' modules are imported only when one of them runs."""
    from lrkd.data.cache_teacher import cache_teacher_command
    from lrkd.data.prepare import prepare_command
    from lrkd.evaluation.command import eval_command

    return {
        "export": (export, "Write the student of a `lrkd fit` checkpoint as a plain Hugging Face "
                   "model."),
        "prepare": (prepare_command, "Tokenise, pack and save records as a memory-mapped "
                    "dataset for lrkd fit."),
        "cache-teacher": (cache_teacher_command, "Run the teacher once over prepared data and "
                          "store its top-k log-probs, for lrkd fit with model.teacher_cache."),
        "rank": (rank, "Suggest a student width for a token budget, with the teacher's spectral "
                 "tail at each width."),
        "eval": (eval_command, "Score a model (exported student, checkpoint or teacher) with "
                 "lm-evaluation-harness, optionally beside another."),
    }  # fmt: skip


def usage() -> str:
    """The top-level ``lrkd --help`` text: every subcommand, one line each."""
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items())
    return (
        f"usage: lrkd [-h] [--version] {{{','.join(SUBCOMMANDS)}}} ...\n\n"
        f"lrkd {__version__}: distil a large language model into a small one with PyTorch "
        "Lightning\n(Low-Rank Clone students, pass-rate-paced data, forward-then-reverse KL).\n\n"
        f"subcommands:\n{rows}\n\n"
        "`lrkd SUBCOMMAND --help` documents every argument of a subcommand.\n"
        "Example: lrkd fit --config configs/quickstart.yaml"
    )


def main(args: ArgsType = None) -> LRKDCLI | Path | RankReport | dict[str, Any] | None:
    """Entry point of the ``lrkd`` console script.

    Args:
        args: command-line arguments (``None`` reads ``sys.argv``), e.g.
            ``["fit", "--config", "configs/quickstart.yaml"]`` or
            ``["export", "--ckpt_path", "last.ckpt", "--out", "student/"]`` or
            ``["rank", "--teacher", "smollm2-135m-instruct", "--num_tokens", "1e8"]``.

    Returns:
        The LightningCLI, for ``export`` the written directory, for ``rank`` the report, for
        ``eval`` the scores per model,
        ``None`` for ``env``, ``--version`` and ``--help``.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The frozen teacher is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # The command line is handed over after `extends` expansion, as `args`, on purpose.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if isinstance(argv, list) and argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if isinstance(argv, list) and argv[0] in ("-V", "--version"):
        print(f"lrkd {__version__}")
        return None
    if isinstance(argv, list) and argv[0] == "env":
        print(env_report())
        return None
    if isinstance(argv, list) and argv[0] in FUNCTIONS:
        function, description = _functions()[argv[0]]
        return _function_main(function, f"lrkd {argv[0]}", description, argv[1:])
    if isinstance(argv, list):
        argv = expand_extends(argv)
        renamed = renamed_arguments(argv)
        if renamed:
            print(
                "lrkd: these arguments moved into setting blocks (model: lrkd.objective.Loss, "
                "lrkd.generation.on_policy.OnPolicy; data: lrkd.data.paced_settings):\n  "
                + "\n  ".join(renamed),
                file=sys.stderr,
            )
            first = renamed[0].split(" (")[0]
            more = f" and {len(renamed) - 1} more, as shown above" if len(renamed) > 1 else ""
            print(f"error: rename {first}{more} (docs/configuration.md)", file=sys.stderr)
            raise SystemExit(2)
    return LRKDCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_data=True,
        parser_class=ShortErrorParser,
        trainer_defaults={**TRAINER_DEFAULTS, "precision": default_precision()},
        save_config_kwargs={"overwrite": True},
        args=argv if isinstance(argv, list) else args,
    )


def _as_list(value: Any) -> list[Any]:
    """A Trainer argument that takes one item or a list, as a new list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def console_main() -> None:
    """The ``lrkd`` console script (exit status 0 on success, 2 for a bad setting, 143 after
    a SIGTERM stop that saved a checkpoint). A bad argument that lrkd's own code refuses (in
    ``prepare``, ``cache-teacher``, ``export``, or at the first step of ``fit``) ends with its
    message as the one last line; ``LRKD_TRACEBACK=1`` shows the traceback."""
    try:
        main()
    except Preempted:
        close_process_group()  # every rank stopped at the same step, after the same save
        raise
    except (ValueError, OSError, MissingDependency) as err:
        cause = setting_error(err)
        if cause is None or os.environ.get("LRKD_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(cause).split())}", file=sys.stderr)
        raise SystemExit(2) from err
    close_process_group()


if __name__ == "__main__":
    console_main()
