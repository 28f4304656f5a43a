"""TensorBoard diagnostics: what the paced DataModule estimated, and the instruments from the
theory behind lrkd (docs/theory.md), as plots and scalars.

- :func:`log_pacing`: pass-rate histograms and bucket tables of the paced DataModule.
- :class:`RepresentationDiagnostics`: every N steps on a fixed probe batch, the per-layer
  linear CKA between teacher and student hidden states (representation dependence), the
  held-out token-level KL(teacher || student), and once the rank-bottleneck cost (the share of
  the teacher's hidden-state variance beyond the student's width).
- :class:`GradientSNRByPassRate`: the signal-to-noise ratio of per-problem gradients within
  each pass-rate bucket of the paced DataModule (the PACED observation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lrkd.data.pacing import bucket_labels, bucketize
from lrkd.data.tokens import pad_collate
from lrkd.diagnostics.rank import spectral_tail
from lrkd.diagnostics.representation import gaussian_mutual_information, layer_outputs, linear_cka
from lrkd.diagnostics.snr import GradientSNR, SNRAccumulator
from lrkd.distributed import is_sharded
from lrkd.losses import kd_divergence
from lrkd.models.protocols import CoRunStudent, GradFlushing
from lrkd.models.students import model_logits
from lrkd.objective import next_token_targets

log = logging.getLogger("lrkd")

__all__ = [
    "GradientSNRByPassRate",
    "RepresentationDiagnostics",
    "bar_image",
    "bucket_gradient_snr",
    "log_pacing",
    "pass_rate_bucket_snr",
]


def log_pacing(
    loggers: Sequence[Any],
    *,
    pass_rate: Tensor,
    weight: Tensor,
    bucket_index: Tensor,
    bucket_labels: Sequence[str],
    num_samples: int,
    cold_start: bool,
    round_index: int,
    step: int,
) -> dict[str, float]:
    """Log one pass-rate estimate to every logger.

    ``weight`` is each problem's relative weight (mean 1 over the problems drawn).
    TensorBoard gets histograms of the pass rates (one bin per possible value k/K), of the
    weights and of the bucket indices, and a text table of the buckets; every logger
    gets the scalars ``pacing/mean_pass_rate``, ``pacing/frontier_share`` (the share of
    problems with 0 < p < 1), ``pacing/solved_share`` (p = 1), ``pacing/unsolved_share``
    (p = 0), ``pacing/cold_start``, ``pacing/round`` and ``pacing/bucket_count/<bucket>``.

    Returns:
        The scalars that were logged.
    """
    p = pass_rate.double().cpu()
    w = weight.double().cpu()
    counts = [int((bucket_index == b).sum()) for b in range(len(bucket_labels))]
    scalars = {
        "pacing/mean_pass_rate": float(p.mean()),
        "pacing/frontier_share": float(((p > 0) & (p < 1)).double().mean()),
        "pacing/solved_share": float((p >= 1).double().mean()),
        "pacing/unsolved_share": float((p <= 0).double().mean()),
        "pacing/cold_start": float(cold_start),
        "pacing/round": float(round_index),
    }
    for label, count in zip(bucket_labels, counts, strict=True):
        scalars[f"pacing/bucket_count/{label}"] = float(count)
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
        writer = getattr(logger, "experiment", None)
        if not hasattr(writer, "add_histogram"):
            continue
        # One bin per attainable pass rate k/K, centred on it.
        edges = (np.arange(num_samples + 2) - 0.5) / num_samples
        writer.add_histogram("pacing/pass_rate", p.numpy(), step, bins=edges)
        writer.add_histogram("pacing/weight", w.numpy(), step)
        writer.add_histogram(
            "pacing/bucket", bucket_index.cpu().numpy(), step,
            bins=np.arange(len(bucket_labels) + 1) - 0.5,
        )  # fmt: skip
        rows = "\n".join(
            f"| {label} | {c} | {float(w[bucket_index == b].mean()) if c else 0.0:.4f} |"
            for b, (label, c) in enumerate(zip(bucket_labels, counts, strict=True))
        )
        table = f"| bucket | problems | mean weight |\n|---|---|---|\n{rows}"
        writer.add_text("pacing/buckets", table, step)
    return scalars


# --------------------------------------------------------------------------- shared helpers


def bar_image(values: Sequence[float], vmax: float | None = None, height: int = 64,
              bar_width: int = 8) -> np.ndarray:  # fmt: skip
    """A bar chart of ``values`` as an RGB image [3, H, W] (uint8) for TensorBoard's image tab:
    one bar per value, left to right, from 0 up to ``vmax`` (default: the largest value).

    Args:
        values: the bar heights (negative and non-finite values draw as empty bars).
        vmax: the value of a full-height bar.
        height: image height in pixels.
        bar_width: pixels per bar (one of them a gap).

    Returns:
        The image, channels first.
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(vmax) if vmax is not None else float(v.max(initial=0.0))
    filled = np.clip(v / top if top > 0 else np.zeros_like(v), 0.0, 1.0)
    image = np.full((3, height, max(1, len(v)) * bar_width), 255, dtype=np.uint8)
    for i, share in enumerate(filled):
        rows = int(share * height + 0.5)
        if rows:
            x = slice(i * bar_width, (i + 1) * bar_width - 1)
            image[:, height - rows :, x] = np.array([31, 119, 180], dtype=np.uint8)[:, None, None]
    return image


def _log(trainer: Trainer, scalars: Mapping[str, float],
         images: Mapping[str, np.ndarray] | None = None) -> None:  # fmt: skip
    """Scalars to every logger, images to those with a TensorBoard writer, at the global step
    (loggers write from rank 0 only)."""
    step = trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=step)
        writer = getattr(logger, "experiment", None)
        if images and hasattr(writer, "add_image"):
            for tag, image in images.items():
                writer.add_image(tag, image, step)


def _due(trainer: Trainer, every_n_steps: int, last: int | None) -> bool:
    step = trainer.global_step
    return every_n_steps > 0 and step % every_n_steps == 0 and step != last


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module] | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


# --------------------------------------------------------------------------- representation


class RepresentationDiagnostics(Callback):
    """Representation dependence and rank-bottleneck cost, every ``every_n_steps`` training
    steps, on a fixed probe batch.

    Logged (TensorBoard scalars and images):

    - ``diagnostics/cka/layer_XX`` and ``diagnostics/cka_mean``: linear CKA (0..1) between the
      student's hidden states after layer j and the teacher's after the matching layer (layer
      j of a low-rank clone; layer round((j+1) L_T / L_S) - 1 otherwise), over the probe's
      real tokens; the image ``diagnostics/cka_by_layer`` shows them as bars.
    - ``diagnostics/mi/layer_XX`` and ``diagnostics/mi_mean`` (with ``mutual_information``): a
      Gaussian estimate of the mutual information between the two, in nats.
    - ``diagnostics/heldout_kl``: the token-level KL(teacher || student) on the probe's target
      positions (a lower bound of the distillation divergence of arXiv 2605.13143).
    - once, at the first evaluation: ``diagnostics/rank_bottleneck/tail_mean`` and
      ``.../layer_XX``: the share of the teacher's (centred) hidden-state variance beyond the
      student's width d_S, ``sum_{i > d_S} s_i^2 / sum_i s_i^2``, which no width-d_S student
      can represent; image ``diagnostics/rank_bottleneck_by_layer``.

    The probe is the first ``probe_batches`` batches of the DataModule's validation loader (its
    training loader when it has none), cut to ``max_probe_tokens`` real tokens, taken once.
    Students must expose their decoder layers as ``.model.layers`` (Hugging Face causal LMs)
    or be a :class:`~lrkd.models.lowrank.LowRankClone`; otherwise only the KL is logged.
    Runs on every rank (sharded models need every rank in the forward); rank 0 logs. The last
    values are kept in :attr:`last`.

    Args:
        every_n_steps: evaluate when the global step is a multiple of it (0: never during
            training).
        at_start: also evaluate before the first training step.
        probe_batches: validation batches in the probe.
        max_probe_tokens: at most this many real tokens enter CKA and the spectrum.
        mutual_information: also log the Gaussian mutual-information estimate (meaningful
            only with many more probe tokens than the two widths together).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        at_start: bool = True,
        probe_batches: int = 1,
        max_probe_tokens: int = 2048,
        mutual_information: bool = False,
    ) -> None:
        if every_n_steps < 0 or probe_batches < 1 or max_probe_tokens < 2:
            raise ValueError(
                "RepresentationDiagnostics: every_n_steps must be >= 0, probe_batches >= 1 and "
                "max_probe_tokens >= 2."
            )
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.probe_batches, self.max_probe_tokens = probe_batches, max_probe_tokens
        self.mutual_information = mutual_information
        self.last: dict[str, float] = {}
        self.seconds = 0.0  # time spent in evaluate(), reported at the end of training
        self._probe: dict[str, Tensor] | None = None
        self._tail_logged = False
        self.last_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate once before training (``at_start``)."""
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        """Evaluate when the step is due."""
        if _due(trainer, self.every_n_steps, self.last_step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report the time the diagnostics took."""
        log.info("lrkd: RepresentationDiagnostics took %.1f s in total", self.seconds)

    def probe(self, trainer: Trainer, device: torch.device) -> dict[str, Tensor]:
        """The fixed probe batch (taken from the DataModule at the first call)."""
        if self._probe is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader() if dm is not None else None
            if not loader:
                loader = dm.train_dataloader()
            batches = []
            for i, batch in enumerate(loader):
                if i >= self.probe_batches:
                    break
                batches.append(batch)
            if not batches:
                raise ValueError("RepresentationDiagnostics: the DataModule gave no batch.")

            rows = [{k: v[r] for k, v in b.items() if k != "weight"} for b in batches
                    for r in range(b["input_ids"].shape[0])]  # fmt: skip
            # Padded positions are masked out, so the padding id is immaterial.
            probe = pad_collate(rows, pad_token_id=0)
            # Keep whole rows until max_probe_tokens real tokens.
            real = probe["attention_mask"].sum(dim=1).cumsum(0)
            keep = max(1, int((real <= self.max_probe_tokens).sum()))
            self._probe = {k: v[:keep] for k, v in probe.items()}
        return {k: v.to(device) for k, v in self._probe.items()}

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Compute and log the diagnostics now; returns the scalars."""

        start = time.perf_counter()
        self.last_step = trainer.global_step
        batch = self.probe(trainer, pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            student_h, teacher_h, s_logits, t_logits = _hidden_states(pl_module, batch)
        finally:
            pl_module.train(was_training)
        _, target_mask = next_token_targets(batch)
        s_logits, t_logits = pl_module.objective.vocab_aligned(s_logits, t_logits)
        kl = kd_divergence(s_logits, t_logits, "forward_kl", mask=target_mask, reduction="mean")
        scalars = {"diagnostics/heldout_kl": float(kl)}
        images = {}
        real = batch["attention_mask"].to(torch.bool)
        if student_h is not None:
            ckas, mis = [], []
            for j, (s, t) in enumerate(zip(student_h, teacher_h, strict=True)):
                x, y = s[real].double(), t[real].double()
                ckas.append(float(linear_cka(x, y)))
                scalars[f"diagnostics/cka/layer_{j:02d}"] = ckas[-1]
                if self.mutual_information:
                    mis.append(float(gaussian_mutual_information(x, y)))
                    scalars[f"diagnostics/mi/layer_{j:02d}"] = mis[-1]
            scalars["diagnostics/cka_mean"] = float(np.mean(ckas))
            images["diagnostics/cka_by_layer"] = bar_image(ckas, vmax=1.0)
            if mis:
                scalars["diagnostics/mi_mean"] = float(np.mean(mis))
            if not self._tail_logged:
                tails = self._rank_bottleneck(pl_module, teacher_h, real)
                for j, tail in enumerate(tails):
                    scalars[f"diagnostics/rank_bottleneck/layer_{j:02d}"] = tail
                scalars["diagnostics/rank_bottleneck/tail_mean"] = float(np.mean(tails))
                images["diagnostics/rank_bottleneck_by_layer"] = bar_image(tails, vmax=1.0)
                self._tail_logged = True
        _log(trainer, scalars, images)
        self.last = scalars
        self.seconds += time.perf_counter() - start
        return scalars

    @staticmethod
    def _rank_bottleneck(pl_module: LightningModule, teacher_h: Sequence[Tensor],
                         real: Tensor) -> list[float]:  # fmt: skip

        width = _student_width(pl_module.student)
        return [float(spectral_tail(t[real].double(), [width])[0]) for t in teacher_h]


def _student_width(student: nn.Module) -> int:
    config = getattr(student, "config", None)
    return int(getattr(config, "hidden_size", 0) or getattr(student, "hidden_size", 0))


def _hidden_states(
    pl_module: LightningModule, batch: dict[str, Tensor]
) -> tuple[list[Tensor] | None, list[Tensor] | None, Tensor, Tensor]:
    """Student and (matching) teacher hidden states per student layer, and both models'
    logits, in one pass of each model (one co-run pass for a low-rank clone)."""

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    student, teacher = pl_module.student, pl_module.teacher
    # A CloneBlock returns (student hidden, teacher hidden, clone terms).
    if isinstance(student, CoRunStudent):
        with layer_outputs(student.paired_blocks(), lambda out: (out[0], out[1])) as pairs:
            out = student(ids, mask, with_teacher=True)
        return [p[0] for p in pairs], [p[1] for p in pairs], out.logits, out.teacher_logits
    s_layers, t_layers = _decoder_layers(student), _decoder_layers(teacher)
    if s_layers is None or t_layers is None:
        return None, None, model_logits(student, ids, mask), model_logits(teacher, ids, mask)
    with layer_outputs(t_layers) as t_hidden:
        t_logits = model_logits(teacher, ids, mask)
    with layer_outputs(s_layers) as s_hidden:
        s_logits = model_logits(student, ids, mask)
    n_s, n_t = len(s_hidden), len(t_hidden)
    matched = [t_hidden[round((j + 1) * n_t / n_s) - 1] for j in range(n_s)]
    return s_hidden, matched, s_logits, t_logits


# --------------------------------------------------------------------------- gradient SNR


def bucket_gradient_snr(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    examples: Mapping[str, Sequence[Any]],
) -> dict[str, GradientSNR]:
    """The SNR of per-example gradients within each group (e.g. a pass-rate bucket).

    Each example's gradient ``d loss_fn(example) / d params`` is taken on its own (one
    backward per example) and streamed into an accumulator, so gradients of many examples
    are never held together.

    Args:
        loss_fn: maps one example to a scalar loss.
        params: the parameters the gradient is taken with respect to.
        examples: the examples of each group, by group label; groups with fewer than two
            examples are left out of the result.

    Returns:
        :class:`lrkd.diagnostics.snr.GradientSNR` per group label.
    """

    params = list(params)
    results = {}
    for label, group in examples.items():
        if len(group) < 2:
            continue
        acc = SNRAccumulator()
        for example in group:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(example), params, allow_unused=True)
            flat = [
                (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                for g, p in zip(grads, params, strict=True)
            ]
            acc.add(torch.cat(flat))
        results[label] = acc.result()
    return results


class GradientSNRByPassRate(Callback):
    """The gradient signal-to-noise ratio within each pass-rate bucket of a paced
    :class:`~lrkd.data.datamodule.DistillDataModule`.

    PACED (arXiv 2603.11178) observes that problems the student always or never solves give
    little consistent gradient signal and that the signal peaks at intermediate pass rates,
    which is what the weight ``p^a (1-p)^b`` bets on. This callback measures it on the run:
    for up to ``problems_per_bucket`` training problems per bucket (drawn with a fixed seed),
    the gradient of the student's distillation loss on that problem's training example
    (unweighted: the pacing weight is left out) with respect to the trainable parameters;
    then per bucket ``||mean g|| / spread`` (see :class:`lrkd.diagnostics.snr.GradientSNR`).

    Logged: ``snr/<bucket>`` (the debiased SNR), ``snr_raw/<bucket>``,
    ``snr_mean_norm/<bucket>``, ``snr_count/<bucket>`` and the image ``snr/by_bucket`` (one
    bar per bucket, low pass rates on the left), so the bell shape over p, or its absence, is
    visible. Needs the DataModule's pass-rate estimate (buckets without one are skipped with a
    message). Costs one forward and backward per sampled problem; not supported under FSDP2
    (per-problem gradients would be shards). The last results are kept in :attr:`last`.

    Args:
        every_n_steps: measure when the global step is a multiple of it (0: never during
            training).
        at_start: also measure before the first training step.
        problems_per_bucket: problems sampled per bucket (at least 2 for a spread).
        seed: seed of the problem sampling (the same problems every time).
    """

    def __init__(self, every_n_steps: int = 0, at_start: bool = True,
                 problems_per_bucket: int = 8, seed: int = 0) -> None:  # fmt: skip
        if every_n_steps < 0 or problems_per_bucket < 2:
            raise ValueError(
                "GradientSNRByPassRate: every_n_steps must be >= 0 and problems_per_bucket >= 2."
            )
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.problems_per_bucket, self.seed = problems_per_bucket, seed
        self.last: dict[str, GradientSNR] = {}
        self.last_step: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse a sharded student and a DataModule without pass rates."""

        if is_sharded(pl_module.student):
            raise ValueError(
                "GradientSNRByPassRate does not run under FSDP2 (per-problem gradients would "
                "be shards); use one process or DDP."
            )
        if not hasattr(trainer.datamodule, "bucket_edges"):
            raise ValueError(
                "GradientSNRByPassRate needs a paced DataModule (lrkd.data.datamodule."
                "DistillDataModule) for the pass rates."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure once before training (``at_start``)."""
        if self.at_start:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        """Measure when the step is due."""
        if _due(trainer, self.every_n_steps, self.last_step):
            self.measure(trainer, pl_module)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, GradientSNR]:
        """Measure and log now; returns the result per bucket label."""

        self.last_step = trainer.global_step
        dm = trainer.datamodule
        if getattr(dm, "correct", None) is None:
            log.info("lrkd: GradientSNRByPassRate: no pass-rate estimate yet; skipped")
            return {}

        def loss(batch: dict[str, Tensor]) -> Tensor:
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            return pl_module.distillation_loss(batch)["loss"]

        params = [q for q in pl_module.student.parameters() if q.requires_grad]
        with _in_graph_weights(pl_module.student):
            results = pass_rate_bucket_snr(dm, loss, params, self.problems_per_bucket, self.seed)
        scalars: dict[str, float] = {}
        for label, r in results.items():
            scalars[f"snr/{label}"] = r.snr_debiased
            scalars[f"snr_raw/{label}"] = r.snr
            scalars[f"snr_mean_norm/{label}"] = r.mean_norm
            scalars[f"snr_count/{label}"] = float(r.count)
        labels = bucket_labels(dm.bucket_edges)
        bars = [results[label].snr_debiased if label in results else 0.0 for label in labels]
        _log(trainer, scalars, {"snr/by_bucket": bar_image(bars)})
        self.last = results
        return results


def pass_rate_bucket_snr(
    datamodule: Any,
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Sequence[Tensor],
    problems_per_bucket: int = 8,
    seed: int = 0,
    examples: Sequence[dict[str, Tensor]] | None = None,
) -> dict[str, GradientSNR]:
    """Per-problem gradient SNR in each pass-rate bucket of a paced DataModule's current
    estimate (:class:`GradientSNRByPassRate` without the Trainer, for scripts).

    Args:
        datamodule: a :class:`~lrkd.data.datamodule.DistillDataModule` with a pass-rate
            estimate (``correct``).
        loss_fn: the loss of a batch of one problem's example (collated, on the CPU).
        params: the parameters the gradients are taken with respect to.
        problems_per_bucket: problems sampled per bucket, the same ones for a given ``seed``.
        seed: seed of the sampling.
        examples: one example per training problem (default: the DataModule's training
            examples, i.e. its teacher responses).

    Returns:
        :class:`lrkd.diagnostics.snr.GradientSNR` per bucket label (buckets with fewer than two
        problems left out).
    """

    p = datamodule.correct.double() / datamodule.rollouts.num_samples
    buckets = bucketize(p, datamodule.bucket_edges)
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for b, label in enumerate(bucket_labels(datamodule.bucket_edges)):
        members = torch.nonzero(buckets == b).flatten()
        order = torch.randperm(len(members), generator=generator)
        chosen[label] = members[order[:problems_per_bucket]].tolist()
    dataset = datamodule.examples("train") if examples is None else examples
    pad = datamodule.tokenizer.pad_token_id
    pad = datamodule.tokenizer.eos_token_id if pad is None else pad

    def loss(index: int) -> Tensor:
        return loss_fn(pad_collate([dataset[index]], pad_token_id=pad))

    return bucket_gradient_snr(loss, params, chosen)


@contextmanager
def _in_graph_weights(student: nn.Module) -> Iterator[None]:
    """Inside, a weight-caching student (LowRankClone) generates its weights in the autograd
    graph, so gradients reach its projections directly (its cache is left as it was)."""
    cached = isinstance(student, GradFlushing) and student.cache_weights
    if cached:
        student.cache_weights = False
    try:
        yield
    finally:
        if cached:
            student.cache_weights = cached
