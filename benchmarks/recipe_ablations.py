"""The table of the smollm2_half recipe's ablations (``configs/recipes/smollm2_half/
ablations.sh``): per ablation, the mean and spread over its seeds of the held-out scores.

    python benchmarks/recipe_ablations.py                  # reads runs/ablations/*/seed*/
    python benchmarks/recipe_ablations.py --out docs/figures/smollm2_half_ablations

Columns: stage 1's held-out bits per byte at its end (``LMEvalCallback``, 40 documents each of
``lrkd_corpus`` and ``lrkd_pydoc``), stage 2's last ``val/pass@1`` and the final ``lrkd eval``
scores (all 250 ``lrkd_arithmetic`` items, all documents of the text tasks). A stage an
ablation did not run (stage-1 ablations stop after stage 1; stage-2 ablations reuse the
recipe's stage-1 student) is a dash. ``--recipe DIR`` adds a run of ``run.sh`` made in DIR
(its ``runs/``) as seed 0 of ``recipe`` when ``runs/ablations/recipe/seed0`` is absent.
``--merge FILE`` adds the seeds of an earlier ``--out`` (runs made on another day, their
folders gone) that the runs found now do not have.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_report import scalars

ORDER = ("recipe", "no_clone_loss", "normal_init", "uniform", "two_stage")
CORPUS, PYDOC = "eval/lrkd_corpus/bits_per_byte", "eval/lrkd_pydoc/bits_per_byte"
COLUMNS = (  # (heading, where, key)
    ("stage-1 corpus bpb", "stage1", CORPUS),
    ("stage-1 pydoc bpb", "stage1", PYDOC),
    ("stage-2 val pass@1", "stage2", "val/pass@1"),
    ("arithmetic pass@1", "eval", "lrkd_arithmetic/acc"),
    ("corpus bpb", "eval", "lrkd_corpus/bits_per_byte"),
    ("pydoc bpb", "eval", "lrkd_pydoc/bits_per_byte"),
)


def seed_scores(runs: Path) -> dict[str, float]:
    """The scores of one seed's run of ``run.sh`` whose ``save_dir`` is ``runs``."""
    found: dict[str, float] = {}
    for where, stage, tags in (("stage1", "smollm2_half_clone", (CORPUS, PYDOC)),
                               ("stage2", "smollm2_half_paced", ("val/pass@1",))):  # fmt: skip
        if any((runs / stage).glob("version_*")):
            for tag, points in scalars(runs / stage, tags).items():
                found[f"{where}:{tag}"] = points[-1][1]
    scores = runs / "smollm2_half_eval" / "scores.json"
    if scores.is_file():
        for key, value in next(iter(json.loads(scores.read_text()).values())).items():
            found[f"eval:{key}"] = value
    return found


def collect(root: Path, recipe: Path | None) -> dict[str, dict[int, dict[str, float]]]:
    """``{ablation: {seed: scores}}`` from ``root/NAME/seedS/runs``."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for seed_dir in sorted(root.glob("*/seed*")):
        seed = int(seed_dir.name.removeprefix("seed"))
        table.setdefault(seed_dir.parent.name, {})[seed] = seed_scores(seed_dir / "runs")
    if recipe is not None and 0 not in table.get("recipe", {}) and (recipe / "runs").is_dir():
        table.setdefault("recipe", {})[0] = seed_scores(recipe / "runs")
    return table


def merge(table: dict[str, dict[int, dict[str, float]]], earlier: Path) -> None:
    """Add to ``table`` the seeds of ``earlier`` (a ``--out`` JSON) that it does not have."""
    for name, seeds in json.loads(earlier.read_text()).items():
        for seed, scores in seeds.items():
            table.setdefault(name, {}).setdefault(int(seed), scores)


def cell(values: list[float]) -> str:
    """``mean`` for one seed, ``mean ± sd (min-max)`` for more, a dash for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", default="runs/ablations", help="ablations.sh's folder")
    parser.add_argument("--recipe", default=".", help="where run.sh ran (seed 0 of recipe)")
    parser.add_argument("--merge", help="an earlier OUT.json whose other seeds to keep")
    parser.add_argument("--out", help="also write OUT.json")
    args = parser.parse_args()
    table = collect(Path(args.ablations), Path(args.recipe) if args.recipe else None)
    if args.merge:
        merge(table, Path(args.merge))
    if not table:
        raise SystemExit(f"{args.ablations}: no NAME/seedS folders; run ablations.sh first")
    names = [n for n in ORDER if n in table] + sorted(set(table) - set(ORDER))
    print("| ablation | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for name in names:
        seeds = table[name]
        cells = [cell([s[f"{w}:{k}"] for s in seeds.values() if f"{w}:{k}" in s and
                       math.isfinite(s[f"{w}:{k}"])]) for _, w, k in COLUMNS]  # fmt: skip
        print(f"| {name} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
