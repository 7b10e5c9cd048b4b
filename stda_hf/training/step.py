"""One epoch and one evaluation: the learning-rate schedule, ``train_one_epoch``, ``predict`` and ``evaluate``."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from stda_hf.core.errors import StdaError
from stda_hf.core.utils import progress
from stda_hf.models.vgg import (
    Preprocessing,
    logits_of,
)
from stda_hf.training.config import TrainConfig

logger = logging.getLogger(__name__)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): warm-up, then cosine/step/constant, restarting per phase."""
    start, length = _phase_span(cfg, epoch)
    e = epoch - start
    if e < cfg.warmup_epochs:
        return cfg.lr * (e + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        t = (e - cfg.warmup_epochs) / max(1, length - cfg.warmup_epochs)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((e - cfg.warmup_epochs) // cfg.step_size)
    return cfg.lr


def _phase_span(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """(first epoch, number of epochs) of the phase ``epoch`` belongs to."""
    pre = cfg.pretrain_epochs if cfg.synthetic == "pretrain" else 0
    return (1, pre) if epoch <= pre else (pre + 1, cfg.epochs)


def phase_of(cfg: TrainConfig, epoch: int) -> str:
    """``pretrain`` or ``train``: the phase of ``epoch`` (1-based)."""
    return "pretrain" if cfg.synthetic == "pretrain" and epoch <= cfg.pretrain_epochs else "train"


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs of the whole run (pretrain epochs included)."""
    return cfg.epochs + (cfg.pretrain_epochs if cfg.synthetic == "pretrain" else 0)


def with_step_budget(cfg: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """``cfg`` with the epochs ``--max-train-steps`` needs at ``batches_per_epoch`` (unchanged without it)."""
    if cfg.max_train_steps is None:
        return cfg
    per_epoch = math.ceil(batches_per_epoch / (cfg.grad_accum or 1))
    return dataclasses.replace(cfg, epochs=math.ceil(cfg.max_train_steps / per_epoch))


def batch_limit(cfg: TrainConfig, epoch: int, batches_per_epoch: int) -> int | None:
    """Batches ``epoch`` may take under ``--max-train-steps`` (None: the whole loader)."""
    if cfg.max_train_steps is None:
        return None
    accum = cfg.grad_accum or 1
    done = (epoch - 1) * math.ceil(batches_per_epoch / accum)
    left = max(0, cfg.max_train_steps - done) * accum
    return left if left < batches_per_epoch else None


@dataclass
class EpochProgress:
    """How far this process got in an epoch: what a step checkpoint keeps to continue the epoch exactly."""

    batches: int = 0  # batches done
    loss_sum: float = 0.0  # summed loss of those batches (x batch size)
    images: int = 0  # images of those batches
    data_seconds: float = 0.0  # seconds waiting for data
    compute_seconds: float = 0.0  # seconds computing


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    accelerator,
    lr: float,
    epoch: int,
    max_batches: int | None = None,
    start: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (its first ``max_batches`` batches, when given); returns mean loss, images,
    images/s and seconds waiting for data vs computing.

    ``start`` continues an epoch a step checkpoint interrupted: its batches are skipped (the epoch's order is
    drawn from the seed and the epoch), its sums kept; the random draws of augmentation and dropout that
    follow are not those of an uninterrupted run (the loader fetches one batch ahead of training, both
    drawing from one generator), so only epoch checkpoints resume bit for bit.
    ``on_step`` is called after every optimizer step with the progress so far. The loss is summed over every
    process; a non-finite mean loss stops the run (on every process alike).
    """
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    done = start or EpochProgress()
    loss_sum = torch.tensor(done.loss_sum, dtype=torch.float64, device=accelerator.device)
    n, batches, data_s, compute_s = done.images, done.batches, done.data_seconds, done.compute_seconds
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    source = accelerator.skip_first_batches(loader, batches) if batches else loader
    bar = progress(
        total=total, initial=batches, desc=f"epoch {epoch}", unit="step", disable=_quiet(accelerator)
    )
    tick = time.perf_counter()
    for images, labels in itertools.islice(source, total - batches):
        got_batch = time.perf_counter()
        data_s += got_batch - tick
        with accelerator.accumulate(model):
            loss = loss_fn(logits_of(model(images)).float(), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * len(labels)
        n += len(labels)
        batches += 1
        tick = time.perf_counter()
        compute_s += tick - got_batch
        bar.update(1)
        if on_step is not None and accelerator.sync_gradients:
            on_step(EpochProgress(batches, float(loss_sum), n, data_s, compute_s))
    bar.close()
    totals = torch.stack([loss_sum, torch.tensor(float(n), dtype=torch.float64, device=accelerator.device)])
    total_loss, total_n = accelerator.reduce(totals, reduction="sum").tolist()
    return _epoch_stats(total_loss, total_n, data_s, compute_s, epoch)


def _epoch_stats(loss_sum: float, n: float, data_s: float, compute_s: float, epoch: int) -> dict[str, float]:
    loss = loss_sum / max(n, 1.0)
    if not math.isfinite(loss):
        raise StdaError(
            f"training loss became {loss} in epoch {epoch}; that epoch was not saved. Lower --lr, use "
            "--mixed-precision no or bf16, or check the images; then start a new run (or --resume with the "
            "same settings to retry from the last checkpoint)"
        )
    seconds = data_s + compute_s
    return {
        "loss": loss,
        "images": n,
        "images_per_second": n / seconds if seconds else 0.0,
        "data_seconds": data_s,
        "compute_seconds": compute_s,
    }


def _quiet(accelerator) -> bool | None:
    """Progress bars on the main process only (None lets ``progress`` decide there)."""
    return None if accelerator.is_main_process else True


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and labels ``(N,)`` of every example, gathered from all processes (no duplicates).

    Always in float32, whatever ``--mixed-precision`` training uses: the metrics describe the saved model as
    ``transformers`` and ``pipeline`` run it (mixed precision is a training speed-up, not part of the model).
    """
    model.eval()
    all_logits, all_labels = [], []
    with full_precision(model, accelerator):
        for images, labels in progress(loader, desc="evaluating", unit="step", disable=_quiet(accelerator)):
            logits = logits_of(model(images)).float()
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


@contextlib.contextmanager
def full_precision(model: nn.Module, accelerator) -> Iterator[None]:
    """Take Accelerate's mixed-precision wrapper (autocast around ``forward``) off ``model`` for the block.

    ``model`` stays the prepared (possibly DDP-wrapped) model, so distributed evaluation is unchanged; only
    its module's ``forward`` runs as defined, in float32. Without mixed precision this changes nothing.
    """
    inner = accelerator.unwrap_model(model)
    original = inner.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = inner.forward
    inner.forward = original
    try:
        yield
    finally:
        inner.forward = wrapped


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, metric) -> dict[str, float]:
    """The metric module's results (confusion matrix as ``tn``/``fp``/``fn``/``tp``) plus the mean loss."""
    probs = logits.softmax(dim=-1)[:, 1]
    result = metric.compute(
        predictions=logits.argmax(dim=-1).tolist(),
        references=labels.tolist(),
        prediction_scores=probs.tolist(),
    )
    flat = {k: float(v) for k, v in result.items() if k != "confusion_matrix"}
    flat["loss"] = float(F.cross_entropy(logits, labels.long()))
    return flat


SUBGROUP_COLUMNS = ("skin_type", "fitzpatrick_skin_type", "age_approx", "sex", "anatom_site_general")
"""Columns whose values split the test metrics into subgroups, when a dataset has them (ages in decades)."""


def subgroup_metrics(
    dataset, logits: torch.Tensor, labels: torch.Tensor, metric
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics per value of each :data:`SUBGROUP_COLUMNS` column of ``dataset`` (rows in prediction order),
    each with its image count ``n``; rows without a value are left out; a column without values is absent."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for column in (c for c in SUBGROUP_COLUMNS if c in dataset.column_names):
        groups: dict[str, list[int]] = {}
        for i, value in enumerate(dataset[column]):
            if value is not None and str(value).strip() not in ("", "nan", "unknown"):
                groups.setdefault(_group_name(column, value), []).append(i)
        if groups:
            found[column] = {
                name: {"n": float(len(rows)), **compute_metrics(logits[rows], labels[rows], metric)}
                for name, rows in sorted(groups.items())
            }
    return found


def _group_name(column: str, value: Any) -> str:
    if column == "age_approx":
        decade = int(float(value)) // 10 * 10
        return f"{decade}-{decade + 9}"
    return str(value)


def evaluate(model: nn.Module, loader: DataLoader, accelerator, metric) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``'s split, computed on the predictions gathered from every process."""
    logits, labels = predict(model, loader, accelerator)
    return compute_metrics(logits, labels, metric)


@dataclass
class EvalContext:
    """What an ``on_evaluate`` hook receives after each validation (and after the final test evaluation).

    The hook runs on every process (write files on ``accelerator.is_main_process`` only) and may return a dict
    of numbers, which are logged with the ``<split>/`` prefix. It must leave the model as it found it.
    """

    model: nn.Module  # the unwrapped model, in eval mode
    accelerator: Any  # the run's accelerate.Accelerator
    epoch: int  # epoch just finished (the best epoch for split "test")
    split: str  # "validation" or "test"
    dataset: Any  # this split's real images with every column (image, label, mask, artifact_mask, ids, ...)
    preprocessing: Preprocessing  # size, mean, std of the model's input
    transform: Callable  # PIL image -> normalised tensor, exactly as evaluation feeds the model
    metrics: dict[str, float]  # this evaluation's metrics
    run_dir: Path  # the run folder (heatmaps go in run_dir / "heatmaps")


EvalHook = Callable[[EvalContext], "dict[str, float] | None"]
