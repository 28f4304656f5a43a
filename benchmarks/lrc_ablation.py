"""Low-Rank Clone recipes at equal tokens on the built-in teacher: held-out KL and CE.

Each arm is an ``lrkd fit`` run of a shipped config (the same data, seed, width, batch and
number of steps; logging, checkpoints and export off), then the held-out token-mean
KL(teacher || student) at temperature 1 and the student's next-token CE on the first
``--val-batches`` validation batches of the built-in corpus. Arms:

- ``official``: ``configs/lrc/official_recipe.yaml`` (N(0, 0.02) init; CE + KL at T = 40 summed
  over positions per row + 0.2 x mean-squared clone terms, attention output in teacher space;
  AdamW 1e-4, 0.5% linear warm-up then linear decay).
- ``official_pca``: the same with ``init: activation_pca`` (the informed init).
- ``lrkd_defaults``: ``LowRankCloneBuilder`` and ``model.loss`` at their defaults (N(0, 0.02)
  init, forward KL at T = 1 over target tokens, no CE, no clone term), the official optimizer.
- ``quickstart``: ``configs/quickstart.yaml``'s model (activation_pca init, KL at T = 1 +
  0.5 CE + 0.2 x relative clone terms; AdamW 3e-4, cosine).

    python benchmarks/lrc_ablation.py --steps 150 --out docs/figures/lrc_ablation.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

from lrkd.cli import main as lrkd_main
from lrkd.losses import chunked_cross_entropy, kd_divergence
from lrkd.objective import next_token_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARMS = ("official", "official_pca", "lrkd_defaults", "quickstart")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=150, help="Optimizer steps per arm.")
    parser.add_argument("--hidden-size", type=int, default=189, help="Student width d_S.")
    parser.add_argument("--seq", type=int, default=128, help="Tokens per packed row.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--documents", type=int, default=3000, help="Built-in corpus size.")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results.")
    return parser.parse_args(argv)


def arm_config(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """The full config of one arm: a shipped config with the shared budget and outputs off."""
    official = yaml.safe_load((CONFIGS / "lrc" / "official_recipe.yaml").read_text())
    if arm == "quickstart":
        config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
        config["model"]["lr_scheduler"]["init_args"]["T_max"] = args.steps
    else:
        config = copy.deepcopy(official)
        config["model"]["lr_scheduler"]["init_args"]["total_steps"] = args.steps
    student = config["model"]["student"]["init_args"]
    if arm == "official_pca":
        student.update(init="activation_pca", probe_tokens=4096)
    if arm == "lrkd_defaults":
        config["model"]["student"]["init_args"] = {"hidden_size": args.hidden_size}
        config["model"].pop("loss")
    config["model"]["student"]["init_args"]["hidden_size"] = args.hidden_size
    config["seed_everything"] = 0
    config["data"] = {
        "class_path": "lrkd.data.text.TextDataModule",
        "init_args": {"seq_length": args.seq, "batch_size": args.batch_size,
                      "builtin_documents": args.documents, "val_fraction": 0.02},
    }  # fmt: skip
    config["trainer"] = {
        "accelerator": "cpu", "devices": 1, "max_steps": args.steps,
        "gradient_clip_val": 1.0, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
    }  # fmt: skip
    return config


@torch.no_grad()
def heldout(module: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-mean KL(teacher || student) at T = 1 and the student's CE over the targets."""
    module.eval()
    kl = ce = 0.0
    count = 0
    for batch in batches:
        out = module.student(batch["input_ids"], batch["attention_mask"], with_teacher=True)
        targets, mask = next_token_targets(batch)
        logits = out.logits.float()
        kl += float(kd_divergence(logits, out.teacher_logits.float(), "forward_kl", mask=mask,
                                  reduction="sum"))  # fmt: skip
        ce += float(chunked_cross_entropy(logits, targets, mask, reduction="sum"))
        count += int(mask.sum())
    module.train()
    return {"kl": kl / count, "ce": ce / count}


class HeldOut(Callback):
    """Held-out KL and CE (:func:`heldout`) on the first ``batches`` validation batches, at the
    start and the end of training, written to ``path`` as JSON.

    Args:
        path: the JSON file.
        batches: how many validation batches.
    """

    def __init__(self, path: str, batches: int) -> None:
        self.path, self.batches, self.results = Path(path), batches, {}
        self.began = 0.0

    def _measure(self, trainer: Any, module: Any, key: str) -> None:
        batches = []
        for batch in trainer.datamodule.val_dataloader():
            batches.append({k: v.to(module.device) for k, v in batch.items()
                            if isinstance(v, torch.Tensor)})  # fmt: skip
            if len(batches) == self.batches:
                break
        self.results[key] = heldout(module, batches)
        self.results["val_tokens"] = sum(int(next_token_targets(b)[1].sum()) for b in batches)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._measure(trainer, pl_module, "start")
        self.began = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.results["seconds"] = time.perf_counter() - self.began
        self._measure(trainer, pl_module, "end")
        self.path.write_text(json.dumps(self.results))


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm; held-out metrics at its start and end."""
    config = arm_config(arm, args)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "heldout.json"
        config["trainer"]["callbacks"] = [
            {"class_path": "lrc_ablation.HeldOut",
             "init_args": {"path": str(result), "batches": args.val_batches}},
        ]  # fmt: skip
        path = Path(tmp) / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(config))
        lrkd_main(["fit", "--config", str(path)])
        measured = json.loads(result.read_text())
    return {"arm": arm, "steps": args.steps, "tokens": args.steps * args.batch_size * args.seq,
            "seconds": measured["seconds"], "kl_start": measured["start"]["kl"],
            "ce_start": measured["start"]["ce"], "kl": measured["end"]["kl"],
            "ce": measured["end"]["ce"], "val_tokens": measured["val_tokens"]}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| arm | held-out KL, start | held-out KL, end | student CE, end | time |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['arm']} | {r['kl_start']:.3f} | {r['kl']:.3f} | {r['ce']:.3f} | "
                     f"{r['seconds'] / 60:.1f} min |")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for arm in args.arms:
        rows.append(run_arm(arm, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.steps} steps x {args.batch_size} x {args.seq} tokens, d_S = "
          f"{args.hidden_size}, {rows[0]['val_tokens']} held-out target tokens\n")  # fmt: skip
    print("\n".join(table(rows)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
