"""The ``lrkd`` command: LightningCLI over :class:`lrkd.module.DistillationModule`.

``lrkd fit|validate|test|predict --config CONFIG.yaml``; ``--print_config`` prints the whole
resolved config and ``lrkd fit --help`` every argument with its documentation.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from lrkd.module import DistillationModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "lrkd"},
    },
}


class LRKDCLI(LightningCLI):
    """LightningCLI with lrkd's defaults: TensorBoard logs and checkpoints under ``runs/``."""


def main(args: ArgsType = None) -> LRKDCLI:
    """Entry point of the ``lrkd`` console script.

    Args:
        args: command-line arguments (``None`` reads ``sys.argv``), e.g.
            ``["fit", "--config", "configs/quickstart.yaml"]``.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The frozen teacher is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    return LRKDCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """The ``lrkd`` console script (exit status 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
