"""The model card of a train.py run: results as model-index metadata, the layer list, data, settings and plots.

:func:`write_run_card` writes ``README.md`` (a Hub model card whose YAML header carries the test metrics as
``model-index``), ``confusion_matrix.png`` and ``roc_curve.png`` into the run folder.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stda_hf import LABELS, __version__
from stda_hf.core.fileio import atomic_write, write_text
from stda_hf.models.vgg import MODEL_NAMES, Preprocessing
from stda_hf.training.data import is_hub_id

logger = logging.getLogger(__name__)

CARD_METRICS = (
    ("roc_auc", "roc_auc", "ROC AUC"),
    ("balanced_accuracy", "balanced_accuracy", "Balanced accuracy"),
    ("accuracy", "accuracy", "Accuracy"),
    ("sensitivity", "recall", "Sensitivity (malignant recall)"),
    ("specificity", "specificity", "Specificity (benign recall)"),
    ("precision", "precision", "Precision (malignant)"),
    ("f1", "f1", "F1 (malignant)"),
)
"""(key in our metrics, model-index metric type, name shown) for each metric a card reports."""
PAPER = (
    "Mikołajczyk, Grochowski, Kwasigroch: Improving generalization via style transfer-based data augmentation"
)
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curve.png"


@dataclass
class RunFacts:
    """What the card states about a run; every number comes from the run itself."""

    config: dict[str, Any]  # resolved TrainConfig as a dict
    layers: list[str]  # the model's weight layers, one line each
    parameters: int  # number of parameters
    weights: str  # initial weights, e.g. "random(seed=0)"
    split_sizes: dict[str, int]  # rows per split used
    best_epoch: int  # epoch of the final (best-on-validation) model
    epochs: int  # epochs completed
    stopped_early: bool  # early stopping ended training
    validation: dict[str, float]  # validation metrics of the best epoch
    test: dict[str, float] | None  # test metrics of the final model
    preprocessing: Preprocessing  # input size and normalisation
    dataset_license: str | None  # licence of the training data, when known
    dataset_id: str | None = None  # Hub id of the training data (also for a local copy whose card names it)
    dataset_license_name: str | None = None  # the dataset card's license_name when its licence is "other"
    dataset_license_link: str | None = None  # the dataset card's license_link when its licence is "other"
    base_model: str | None = None  # Hub id of the pretrained weights the model started from
    subgroups: dict[str, dict[str, dict[str, float]]] | None = None  # column -> value -> test metrics + "n"
    dataset_revision: str | None = None  # the dataset commit trained on (Hub datasets), else --revision


RESIZE_WORDS = {
    "crop": "resized with its aspect kept (shorter side) and centre-cropped to",
    "pad": "resized with its aspect kept (longer side) and padded with the ImageNet mean colour to",
    "squash": "resized (stretched, aspect not kept) to",
}
"""How each resize mode (:data:`stda_hf.data.images.RESIZE_MODES`) reads in the card's input sentence."""


_LOAD_DATASET_ID = re.compile(r"""load_dataset\(\s*["']([\w.-]+/[\w.-]+)["']""")


def dataset_card_facts(dataset: str, revision: str | None = None) -> dict[str, str | None]:
    """Hub id, licence, ``license_name`` and ``license_link`` of the training data, from its dataset card.

    ``dataset`` is a Hub id (its card is read from the Hub at ``revision``, through ``HF_ENDPOINT``) or a local
    folder written by ``stda package`` (its ``README.md``; the id is the one its ``load_dataset("org/name")``
    example names). A relative ``license_link`` (a file of the dataset repo) becomes the file's Hub URL, since
    the model repo does not hold that file. Missing facts are None; an unreadable card is logged, not raised.
    """
    hub_id = dataset if is_hub_id(dataset) else None
    facts: dict[str, str | None] = {"hub_id": hub_id}
    card = _load_dataset_card(dataset, hub_id, revision)
    if card is None:
        return facts
    data = card.data
    facts.update(
        license=data.license, license_name=data.get("license_name"), license_link=data.get("license_link")
    )
    named = _LOAD_DATASET_ID.search(card.text)
    facts["hub_id"] = hub_id or (named.group(1) if named else None)
    link = facts["license_link"]
    if link and facts["hub_id"] and not re.match(r"^[a-z]+://", link):
        facts["license_link"] = (
            f"https://huggingface.co/datasets/{facts['hub_id']}/blob/{revision or 'main'}/{link.lstrip('./')}"
        )
    return facts


def _load_dataset_card(dataset: str, hub_id: str | None, revision: str | None):
    """The dataset's card: ``README.md`` of the Hub repo at ``revision`` or of the local folder; None if none."""
    from huggingface_hub import DatasetCard, hf_hub_download

    try:
        if hub_id:
            path = hf_hub_download(hub_id, "README.md", repo_type="dataset", revision=revision)
        else:
            path = Path(dataset) / "README.md"
            if not path.is_file():
                return None
        return DatasetCard.load(path)
    except Exception as err:  # offline, no card, a malformed card: a finished run must still get its card
        logger.info("could not read the dataset card of %s (%s)", dataset, type(err).__name__)
        return None


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold (from (0, 0) to (1, 1))."""
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels == 1)[last_of_tie]
    fp = np.cumsum(labels == 0)[last_of_tie]
    tpr = np.r_[0.0, tp / max(tp[-1], 1)]
    fpr = np.r_[0.0, fp / max(fp[-1], 1)]
    return fpr, tpr


def save_plots(logits: torch.Tensor, labels: torch.Tensor, out_dir: Path, auc: float) -> list[str]:
    """Write the confusion-matrix and ROC-curve PNGs of test predictions; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    y = labels.numpy().astype(np.int64)
    scores = logits.softmax(dim=-1)[:, 1].numpy().astype(np.float64)
    pred = logits.argmax(dim=-1).numpy()
    matrix = np.array([[np.sum((y == t) & (pred == p)) for p in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    for (t, p), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"  # readable on dark and light cells
        ax.text(p, t, str(count), ha="center", va="center", color=colour, fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=LABELS, yticklabels=LABELS)
    ax.set(xlabel="predicted", ylabel="true", title="Test confusion matrix")
    _save_fig(fig, out_dir / CONFUSION_PNG)
    fpr, tpr = roc_points(y, scores)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)", title="Test ROC curve")
    ax.legend(loc="lower right")
    _save_fig(fig, out_dir / ROC_PNG)
    plt.close("all")
    return [CONFUSION_PNG, ROC_PNG]


def _save_fig(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")


def render_card(facts: RunFacts, plots: list[str]) -> str:
    """The model card text: YAML header (licence, tags, datasets, model-index) and the sections."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = facts.config
    licence = facts.dataset_license or "unknown"
    data = ModelCardData(
        license=licence,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[
            "image-classification",
            "skin-lesions",
            "dermoscopy",
            "style-transfer-augmentation",
            "vgg",
            "stda-hf",
        ],
        datasets=[facts.dataset_id] if facts.dataset_id else None,
        base_model=facts.base_model,
        metrics=[m[1] for m in CARD_METRICS],
        model_name=_model_name(cfg),
        eval_results=_eval_results(facts) or None,
    )
    if licence == "other":  # the Hub asks a name (and a link) for any licence outside its list
        data.license_name = facts.dataset_license_name or "training-data-licence"
        data.license_link = facts.dataset_license_link or (
            f"https://huggingface.co/datasets/{facts.dataset_id}" if facts.dataset_id else None
        )
    body = "\n".join(
        [
            f"# {_model_name(cfg)}",
            "",
            _summary(facts),
            "",
            *_results_section(facts, plots),
            *_subgroup_section(facts),
            *_model_section(facts),
            *_data_section(facts),
            *_training_section(facts),
            *_usage_section(facts),
            *_limits_section(),
        ]
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


BASE_MODELS = {
    "vgg11": "timm/vgg11.tv_in1k",
    "vgg11_bn": "timm/vgg11_bn.tv_in1k",
    "vgg16": "timm/vgg16.tv_in1k",
    "vgg16_bn": "timm/vgg16_bn.tv_in1k",
}
"""Hub ids of torchvision's ImageNet VGG weights (``IMAGENET1K_V1``; timm's copies of the same tensors)."""


def base_model(model: str, weights: str) -> str | None:
    """The card's ``base_model``: the Hub id of the pretrained weights a run started from (None when random)."""
    if weights == "random" or model == "vgg8":
        return None
    if model in BASE_MODELS:
        return BASE_MODELS[model] if weights in ("auto", "imagenet") else None
    return model if _is_hub_id(model) and weights == "auto" else None


def _is_hub_id(name: str) -> bool:
    return is_hub_id(name)


def _model_name(cfg: dict[str, Any]) -> str:
    arm = {
        "none": "real images only",
        "mix": "real + synthetic (mix)",
        "pretrain": "synthetic pretrain + real",
        "only": "synthetic images only",
    }
    model = cfg["model"].upper() if cfg["model"].startswith("vgg") else _public(cfg["model"])
    return f"{model} skin-lesion classifier ({arm[cfg['synthetic']]})"


def _public(name: str) -> str:
    """A Hub id as is; a local path reduced to its last part, so the card never shows the user's folders."""
    return name if _is_hub_id(name) else Path(name).name


def _eval_results(facts: RunFacts) -> list:
    from huggingface_hub import EvalResult

    if not facts.test:
        return []
    cfg = facts.config
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Benign vs malignant skin-lesion classification",
            dataset_type=_public(cfg["dataset"]),
            dataset_name=_public(cfg["dataset"]),
            dataset_config=cfg.get("dataset_config"),
            dataset_split="test",
            dataset_revision=facts.dataset_revision or cfg.get("revision"),
            metric_type=kind,
            metric_name=name,
            metric_value=round(float(facts.test[key]), 4),
        )
        for key, kind, name in CARD_METRICS
        if key in facts.test and math.isfinite(facts.test[key])
    ]


def _summary(facts: RunFacts) -> str:
    cfg = facts.config
    synthetic = {
        "none": "real training images only (the baseline)",
        "mix": _mix_summary(cfg, facts.split_sizes),
        "pretrain": f"{cfg['pretrain_epochs']} epochs on synthetic images, then fine-tuning on real ones",
        "only": "synthetic images only (no real training image; the original work's pretrain-only variant)",
    }[cfg["synthetic"]]
    return (
        f"A benign (0) vs malignant (1) classifier trained with [stda-hf](https://huggingface.co/datasets/stda/skin-lesions) "
        f"`train.py` on `{_public(cfg['dataset'])}` using {synthetic}. Synthetic images are benign lesions restyled with "
        f"malignant texture by neural style transfer and pseudo-labelled by a teacher trained on real images, as in "
        f"*{PAPER}*. Validation and test images are real images only."
    )


def _mix_summary(cfg: dict[str, Any], sizes: dict[str, int]) -> str:
    """What a mix run drew each epoch, from the split sizes it used (the ratio asked for may exceed the split)."""
    real, synthetic = sizes.get("train"), sizes.get("synthetic")
    if not real or synthetic is None:
        return f"real training images plus {cfg['synthetic_ratio']:g} synthetic image(s) per real one in each epoch"
    drawn = min(round(cfg["synthetic_ratio"] * real), synthetic)
    return (
        f"its {real} real training images plus {drawn} of its {synthetic} synthetic images drawn anew each epoch "
        f"({drawn / real:.2g} synthetic per real; `synthetic_ratio={cfg['synthetic_ratio']:g}`)"
    )


def _results_section(facts: RunFacts, plots: list[str]) -> list[str]:
    lines = ["## Results", "", _precision_note(facts.config), ""]
    if facts.test:
        lines += [
            f"Test split ({facts.split_sizes.get('test', 0)} real images), model of epoch {facts.best_epoch}:",
            "",
        ]
        lines += _metric_table(facts.test)
        lines += (
            ["", "![Confusion matrix](" + plots[0] + ")  ![ROC curve](" + plots[1] + ")"] if plots else []
        )
    else:
        lines.append("The dataset has no test split; no test metrics.")
    if facts.validation:
        lines += [
            "",
            f"Validation (best epoch {facts.best_epoch}, chosen by `{facts.config['monitor']}`):",
            "",
        ]
        lines += _metric_table(facts.validation)
    return [*lines, ""]


def _precision_note(cfg: dict[str, Any]) -> str:
    """How the metrics were measured: always float32, whatever precision training used."""
    trained = cfg.get("mixed_precision") or "no"
    during = "" if trained == "no" else f" (training used {trained} mixed precision)"
    return f"Metrics measured in float32, as the published model predicts{during}."


def _metric_table(metrics: dict[str, float]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {name} | {metrics[key]:.4f} |" for key, _, name in CARD_METRICS if key in metrics]
    if all(k in metrics for k in ("tn", "fp", "fn", "tp")):
        tn, fp, fn, tp = (int(metrics[k]) for k in ("tn", "fp", "fn", "tp"))
        rows.append(f"| confusion matrix [[tn, fp], [fn, tp]] | [[{tn}, {fp}], [{fn}, {tp}]] |")
    return rows


def _model_section(facts: RunFacts) -> list[str]:
    cfg, pre = facts.config, facts.preprocessing
    lines = [
        "## Model",
        "",
        f"`{_public(cfg['model'])}`, {facts.parameters:,} parameters, initial weights {facts.weights}.",
    ]
    if cfg["model"] == "vgg8":
        lines += [
            "VGG8 has eight weight layers (five 3x3 convolutions, each followed by max pooling, then three fully "
            "connected layers); the original paper does not publish its layer list, this is the exact one:",
        ]
    lines += ["", "```", *facts.layers, "```", ""]
    follows = "whose `resize_mode` the image processor follows"
    if cfg["model"] not in MODEL_NAMES and pre.resize != "squash":
        follows = (
            f"`resize_mode`; the `transformers` image processor of this model type stretches images to "
            f"{pre.image_size}x{pre.image_size}, so give it images already {'cropped' if pre.resize == 'crop' else 'padded'} to a square"
        )
    lines.append(
        f"Input: RGB {RESIZE_WORDS[pre.resize]} {pre.image_size}x{pre.image_size} (`resize={pre.resize}`), scaled "
        f"to [0, 1], normalised with mean {list(pre.mean)} and std {list(pre.std)} (`preprocessor_config.json`, "
        f"{follows})."
    )
    return [*lines, ""]


def _data_section(facts: RunFacts) -> list[str]:
    sizes = ", ".join(f"{k} {v}" for k, v in facts.split_sizes.items())
    cfg = facts.config
    lines = [
        "## Training data",
        "",
        f"Dataset `{_public(cfg['dataset'])}`"
        + (f" (config `{cfg['dataset_config']}`)" if cfg.get("dataset_config") else "")
        + f"; images per split: {sizes}.",
    ]
    if cfg["synthetic"] != "none" and cfg["min_confidence"] > 0:
        lines.append(
            f"Synthetic images with pseudo-label confidence below {cfg['min_confidence']} were left out."
        )
    lines.append(
        f"Licence of the training data: {facts.dataset_license or 'unknown (see the dataset card)'}; the model "
        "card carries it because the model is derived from those images. The run folder's `train_ids.txt` "
        "(not uploaded) lists every image id the model was trained on."
    )
    return [*lines, ""]


def _training_section(facts: RunFacts) -> list[str]:
    cfg = facts.config
    ended = "early stopping" if facts.stopped_early else "the epoch budget"
    keys = (
        "epochs", "pretrain_epochs", "batch_size", "grad_accum", "optimizer", "lr", "weight_decay", "schedule",
        "warmup_epochs", "imbalance", "augment", "rotation", "zoom", "shear", "hflip", "vflip", "color_jitter",
        "mixed_precision", "early_stopping", "monitor", "seed",
    )  # fmt: skip
    applies = {
        "pretrain_epochs": cfg.get("synthetic") == "pretrain",
        "min_confidence": cfg.get("synthetic") != "none",
    }
    settings = ", ".join(f"`{k}={cfg[k]}`" for k in keys if k in cfg and applies.get(k, True))
    return [
        "## Training",
        "",
        f"{facts.epochs} epoch(s), ended by {ended}; the final model is the one with the best validation "
        f"`{cfg['monitor']}` (epoch {facts.best_epoch}). Settings: {settings}. The resolved settings are in "
        f"`config.yaml`; per-epoch metrics in `log.jsonl` and `metrics/`. Trained with stda-hf {__version__}.",
        "",
    ]


def _usage_section(facts: RunFacts) -> list[str]:
    model_id = facts.config.get("hub_model_id") or "path/to/this/folder"
    remote = "" if facts.config["model"] not in MODEL_NAMES else ", trust_remote_code=True"
    lines = [
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("image-classification", model="{model_id}"{remote})',
        'print(classifier("lesion.jpg"))  # [{"label": "malignant", "score": ...}, {"label": "benign", ...}]',
        "```",
        "",
    ]
    if remote:
        lines += [
            "The model's code (`modeling_stda_vgg.py`, `configuration_stda_vgg.py`, `image_processing_stda_vgg.py`) "
            "comes with it, so `trust_remote_code=True` needs no other package; with `stda-hf` installed, "
            "`import stda_hf.models` registers the classes and `trust_remote_code` may be left out. The image "
            "processor resizes, scales and normalises exactly as `train.py` evaluated the model.",
            "",
        ]
    return lines


def _subgroup_section(facts: RunFacts) -> list[str]:
    if not facts.subgroups:
        return []
    lines = [
        "## Results per subgroup",
        "",
        "Test metrics per value of each subgroup column of the dataset (small groups give unstable numbers; "
        "AUC is undefined, shown as nan, where a group holds one class only):",
        "",
    ]
    for column, groups in facts.subgroups.items():
        lines += [
            f"`{column}`:",
            "",
            "| value | images | ROC AUC | balanced accuracy | sensitivity | specificity |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for value, m in groups.items():
            cells = [
                f"{m.get(k, float('nan')):.4f}"
                for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")
            ]
            lines.append(f"| {value} | {int(m['n'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _limits_section() -> list[str]:
    return [
        "## Limitations",
        "",
        "A research model, not a medical device: it must not be used to diagnose anyone. Trained on the images "
        "named above, it inherits their biases (for ISIC data: mostly light skin, dermoscopy from a few centres, "
        "artifacts such as rulers and ink); on phantom data its numbers say nothing about real lesions.",
        "",
    ]


def write_run_card(
    run_dir: Path, facts: RunFacts, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> Path:
    """Write ``README.md`` (and the test plots when test predictions are given) into ``run_dir``."""
    plots: list[str] = []
    if logits is not None and labels is not None and facts.test:
        plots = save_plots(logits, labels, run_dir, facts.test.get("roc_auc", float("nan")))
    path = run_dir / "README.md"
    write_text(path, render_card(facts, plots))
    return path
