"""Reliance on a planted shortcut, measured by intervention: what the model does when the artifact is put on.

A relevance share says where an explanation method puts relevance; it does not say the model *uses* what it looks
at. Here each held-out phantom is rendered twice, the same photograph without the planted artifact and with it
(:func:`stda_hf.data.phantoms.rerender`, nothing else changed), and the model's malignant log-odds are compared:

- ``reliance``: the mean change of the malignant log-odds that the artifact causes, ``with - without``, in units of
  the SD of the model's log-odds on the images without it (so models of different confidence compare). A model
  that ignores the artifact scores 0; one that learned "patch = benign" scores below 0.
- ``reliance_benign`` and ``reliance_malignant``: the same per true class.
- ``roc_auc_clean``: ROC AUC with no image carrying the artifact; ``roc_auc_reversed``: with the artifact on the
  malignant images only (the planted correlation reversed). A shortcut shows as a gap between the two.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import phantom_plan, rerender
from stda_hf.data.real import RealImage
from stda_hf.models.vgg import Preprocessing, eval_transform, logits_of

logger = logging.getLogger(__name__)


def intervention_pairs(root: Path, images: list[RealImage], artifact: str):
    """Yield ``(label, image without the artifact, image with it)`` for each labelled image of phantom folder
    ``root``; every other artifact of the image stays as it was drawn."""
    plan = phantom_plan(root)
    for im in images:
        if im.label is None:
            continue
        drawn = tuple(a for a in im.extra.get("artifacts", "").split(";") if a and a != artifact)
        without = rerender(root, im.isic_id, drawn, plan).image
        with_it = rerender(root, im.isic_id, (*drawn, artifact), plan).image
        yield im.label, without, with_it


@torch.no_grad()
def malignant_log_odds(
    model: nn.Module, pre: Preprocessing, images: list, batch_size: int = 64
) -> np.ndarray:
    """``logit(malignant) - logit(benign)`` of a two-class model for PIL images, through its evaluation transform."""
    transform = eval_transform(pre)
    param = next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(0))
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[start : start + batch_size]])
        logits = logits_of(model(x.to(param.device, param.dtype))).float()
        out.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney probability that a positive outscores a negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def reliance_numbers(without: np.ndarray, with_it: np.ndarray, malignant: np.ndarray) -> dict[str, float]:
    """The reliance measures (module docstring) from paired log-odds and the true classes."""
    sd = float(np.std(without, ddof=1)) if len(without) > 1 else float("nan")
    shift = (with_it - without) / sd if sd > 0 else np.full(len(without), np.nan)

    def mean(values: np.ndarray) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    return {
        "reliance": mean(shift),
        "reliance_benign": mean(shift[~malignant]),
        "reliance_malignant": mean(shift[malignant]),
        "roc_auc_clean": roc_auc(without, malignant),
        "roc_auc_reversed": roc_auc(np.where(malignant, with_it, without), malignant),
    }


def measure_reliance(
    model: nn.Module, pre: Preprocessing, root: Path, images: list[RealImage], artifact: str
) -> dict[str, float]:
    """Reliance of ``model`` on ``artifact`` over ``images`` of the phantom folder ``root``.

    Raises
    ------
    StdaError
        No labelled image, or a folder that is not a phantom folder (the artifact cannot be removed or pasted).
    """
    pairs = list(intervention_pairs(root, images, artifact))
    if not pairs:
        raise StdaError(f"{root}: no labelled image to measure reliance on")
    labels, without, with_it = zip(*pairs, strict=True)
    malignant = np.array([label == "malignant" for label in labels])
    numbers = reliance_numbers(
        malignant_log_odds(model, pre, list(without)),
        malignant_log_odds(model, pre, list(with_it)),
        malignant,
    )
    logger.debug("reliance on %s over %d images: %s", artifact, len(pairs), numbers)
    return numbers
