"""Training settings: :class:`TrainConfig` (every flag of ``train.py``) and the checks run before any work."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stda_hf.core.errors import StdaError
from stda_hf.data.images import DEFAULT_RESIZE, check_resize

logger = logging.getLogger(__name__)


SYNTHETIC_MODES = ("none", "mix", "pretrain", "only")


OPTIMIZERS = ("adamw", "sgd")


SCHEDULES = ("cosine", "step", "constant")


IMBALANCE = ("weights", "sampler", "none")


PRECISIONS = ("no", "fp16", "bf16")


MONITORS = (
    "roc_auc",
    "balanced_accuracy",
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "precision",
    "loss",
)


REQUIRED_COLUMNS = ("image", "label")


DEFAULT_DATASET = "stda/skin-lesions"


RUN_CONTROL = (
    "resume",
    "checkpointing_steps",
    "resume_from_checkpoint",
    "eval_batch_size",
    "overwrite",
    "stop_after_epoch",
    "epochs",
    "num_workers",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "explain_images",
    "explain_method",
    "with_tracking",
    "report_to",
)
"""Settings that may change when a run is resumed (none changes the weights); any other is refused."""


@dataclass
class TrainConfig:
    """Settings of one training run (``train.py`` flags, or a ``--config`` YAML with the same keys)."""

    dataset: str = DEFAULT_DATASET  # Hub dataset id, or a local folder written by `stda package`
    train_dir: str | None = (
        None  # instead of --dataset: an image folder of training images, one sub-folder per class
    )
    validation_dir: str | None = (
        None  # with --train-dir: an image folder of validation images (else --train-val-split)
    )
    train_val_split: float = (
        0.15  # share of train moved to validation when the dataset has none, by lesion (0: refuse)
    )
    max_train_samples: int | None = None  # use only this many training images (drawn with --seed; debugging)
    max_eval_samples: int | None = (
        None  # use only this many validation and test images each (drawn with --seed)
    )
    dataset_config: str | None = None  # dataset configuration name (default: the dataset's default)
    revision: str | None = None  # dataset revision on the Hub (branch, tag or commit)
    image_column: str = "image"  # the dataset's image column
    label_column: str = (
        "label"  # the dataset's label column (ClassLabel benign/malignant, 0/1, or --label-map)
    )
    label_map: str | None = (
        None  # label values to benign/malignant, e.g. "nv:benign,mel:malignant,bcc:malignant"
    )
    synthetic: str = "none"  # none | mix (synthetic images added to each epoch) | pretrain (synthetic first)
    #   | only (the synthetic split alone, no real training image: the original work's pretrain-only variant)
    synthetic_ratio: float = 1.0  # mix: synthetic images drawn per real training image, anew each epoch
    min_confidence: float = 0.0  # use only synthetic images whose pseudo-label confidence is at least this
    pretrain_epochs: int = 5  # pretrain: epochs on synthetic images before the real-image epochs
    image_size: int = 224  # images are resized to this square side (pixels)
    resize: str = DEFAULT_RESIZE  # how images become squares (all splits, before augmentation): crop (aspect kept, centre; default), pad (aspect kept, ImageNet-mean bands) or squash (stretched)
    check_images: bool = True  # decode every image once before training; skip and report bad ones
    model: str = "vgg8"  # vgg8 | vgg11 | vgg11_bn | vgg16 | vgg16_bn | transformers model id or folder
    weights: str = "auto"  # auto (vgg8 random, torchvision imagenet) | imagenet | random | weights file
    vgg8_widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG8: channels of the five convolutions
    vgg8_hidden: tuple[int, ...] = (512, 512)  # VGG8: units of the first two fully connected layers
    batch_norm: bool = True  # VGG8: batch normalisation after each convolution
    dropout: float = 0.5  # dropout of the fully connected layers (VGG8 and torchvision VGGs)
    augment: bool = True  # classic augmentation of training images (rotation .. color_jitter)
    rotation: float = 20.0  # augmentation: largest rotation, degrees
    zoom: float = 0.1  # augmentation: largest zoom in or out (0.1: scale 0.9 to 1.1)
    shear: float = 5.0  # augmentation: largest shear, degrees
    hflip: bool = True  # augmentation: random horizontal flips
    vflip: bool = True  # augmentation: random vertical flips (lesions have no up)
    color_jitter: float = 0.1  # augmentation: brightness, contrast, saturation jitter (hue a quarter)
    epochs: int = 30  # epochs on real training images (after the pretrain epochs, if any)
    max_train_steps: int | None = (
        None  # optimizer steps in all; overrides --epochs (the last epoch stops early)
    )
    batch_size: int = 32  # images per process and step
    eval_batch_size: int | None = None  # images per process and evaluation step (unset: twice --batch-size)
    grad_accum: int | None = None  # gradient accumulation steps (unset: accelerate's setting, else 1)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay
    schedule: str = "cosine"  # cosine | step | constant, per epoch; restarts at fine-tuning in pretrain mode
    warmup_epochs: int = 0  # linear warm-up epochs at the start of each phase
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    imbalance: str = "weights"  # weights (class-weighted loss) | sampler (balanced sampling) | none
    mixed_precision: str | None = (
        None  # no | fp16 (GPU only) | bf16 (unset: `accelerate launch`/config decides)
    )
    early_stopping: int = 10  # stop after this many epochs without validation improvement (0: never)
    monitor: str = "roc_auc"  # validation metric that picks the best checkpoint (loss: lower is better)
    seed: int = 0  # seed of weights, data order and augmentation
    num_workers: int = 2  # data-loading worker processes per training process
    output_dir: str = "runs/vgg8"  # run folder: checkpoints, metrics, log, final model, model card
    resume: bool = False  # continue the run in output_dir from its last checkpoint (fresh start if none)
    resume_from_checkpoint: str | None = (
        None  # latest (as --resume) or a checkpoints/epoch_NNNN folder of the run
    )
    overwrite: bool = False  # delete the run already in output_dir and start again
    keep_checkpoints: int = 2  # epoch checkpoints kept (the best one is kept apart)
    checkpointing_steps: str = (
        "epoch"  # epoch (a checkpoint after each) or N: also every N steps, resumable mid-epoch
    )
    stop_after_epoch: int = 0  # stop as if killed after this epoch's checkpoint (0: never; to test resume)
    push_to_hub: bool = False  # upload the final model, card and plots to the Hub
    hub_model_id: str | None = None  # Hub model repo for --push-to-hub, e.g. me/vgg8-stda
    hub_private: bool = False  # create the Hub repo as private
    explain_images: int = (
        8  # validation/test images explained at each evaluation (heatmaps/, logged numbers; 0: off)
    )
    with_tracking: bool = False  # also log to the trackers of --report-to (log.jsonl is always written)
    report_to: str = "all"  # with --with-tracking: all (every installed tracker) | tensorboard | wandb | ...
    explain_method: str = (
        "dtd"  # attribution method of those explanations (dtd, gradient, or a zennit composite)
    )

    def __post_init__(self) -> None:
        if self.resume_from_checkpoint is not None:
            self.resume = True
        if self.train_dir is not None and self.dataset == DEFAULT_DATASET:
            self.dataset = self.train_dir  # what the run folder and the card name as the training data


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, naming the bad value and the valid ones.

    Raises
    ------
    StdaError
        On the first bad setting.
    """
    for name, valid in (
        ("synthetic", SYNTHETIC_MODES),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("imbalance", IMBALANCE),
        ("mixed_precision", PRECISIONS),
        ("monitor", MONITORS),
    ):
        if getattr(cfg, name) not in valid and not (
            name == "mixed_precision" and cfg.mixed_precision is None
        ):
            raise StdaError(
                f"--{_flag(name)} {getattr(cfg, name)!r} is not valid; choose one of {list(valid)}"
            )
    _check_ranges(cfg)
    check_resize(cfg.resize)
    if cfg.train_dir is not None and cfg.dataset != cfg.train_dir:
        raise StdaError(
            f"--dataset {cfg.dataset} and --train-dir {cfg.train_dir}: give one source of training data"
        )
    if cfg.checkpointing_steps != "epoch" and not (
        cfg.checkpointing_steps.isdigit() and int(cfg.checkpointing_steps) > 0
    ):
        raise StdaError(
            f"--checkpointing-steps {cfg.checkpointing_steps!r}: give 'epoch' or a positive number of steps"
        )
    if cfg.max_train_steps is not None and cfg.synthetic == "pretrain":
        raise StdaError(
            "--max-train-steps counts the steps of one phase; use --epochs with --synthetic pretrain"
        )
    if cfg.validation_dir is not None and cfg.train_dir is None:
        raise StdaError("--validation-dir needs --train-dir (a --dataset brings its own validation split)")
    if cfg.explain_images:
        from stda_hf.attribution.engine import check_composite_name

        check_composite_name(cfg.explain_method)
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise StdaError("--push-to-hub needs --hub-model-id (e.g. your-name/vgg8-stda)")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise StdaError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if cfg.with_tracking:
        check_report_to(cfg.report_to)
    if cfg.label_map is not None:
        parse_label_map(cfg.label_map)


def parse_label_map(text: str) -> dict[str, str]:
    """``{value: benign|malignant}`` from ``"value:class,value:class"`` (values as the label column holds them,
    ClassLabel names or numbers written out).

    Raises
    ------
    StdaError
        A pair without ``:``, a class other than benign/malignant, a value mapped twice.
    """
    from stda_hf import LABELS

    mapping: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        value, sep, target = (x.strip() for x in pair.rpartition(":"))
        if not sep or not value or target not in LABELS:
            raise StdaError(
                f"--label-map {text!r}: {pair!r} is not value:class with class one of {list(LABELS)} "
                "(e.g. 'nv:benign,mel:malignant')"
            )
        if value in mapping:
            raise StdaError(f"--label-map {text!r}: {value!r} is mapped twice")
        mapping[value] = target
    if not mapping:
        raise StdaError(
            f"--label-map {text!r} maps nothing; give value:class pairs, e.g. 'nv:benign,mel:malignant'"
        )
    return mapping


def check_report_to(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names (comma-separated, or ``all``), each one Accelerate knows.

    Raises
    ------
    StdaError
        An unknown tracker name, or a known one whose package is not installed.
    """
    from accelerate.utils import LoggerType

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    known = [t.value for t in LoggerType]
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise StdaError(
            f"--report-to {report_to!r}: unknown tracker(s) {bad}; choose from {known} (comma-separated)"
        )
    if names == ["all"]:
        return names
    from accelerate.tracking import get_available_trackers

    installed = {str(t) for t in get_available_trackers()}  # asks nothing of an Accelerator (none exists yet)
    missing = [n for n in names if n not in installed]
    if missing:
        extra = " (pip install 'stda-hf[tracking]')" if "tensorboard" in missing else ""
        raise StdaError(f"--report-to: tracker(s) {missing} are not installed{extra}")
    return names


def _check_ranges(cfg: TrainConfig) -> None:
    positive = (
        "epochs", "batch_size", "eval_batch_size", "grad_accum", "image_size", "keep_checkpoints", "step_size",
        "max_train_samples", "max_eval_samples", "max_train_steps",
    )  # fmt: skip
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise StdaError(f"--{_flag(name)} must be at least 1; got {getattr(cfg, name)}")
    for name in (
        "pretrain_epochs", "warmup_epochs", "early_stopping", "num_workers", "stop_after_epoch", "explain_images"
    ):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise StdaError(f"--{_flag(name)} must not be negative; got {getattr(cfg, name)}")
    checks = (
        ("lr", cfg.lr > 0, "a positive number"),
        ("synthetic_ratio", cfg.synthetic_ratio >= 0, "0 or more"),
        ("min_confidence", 0.0 <= cfg.min_confidence <= 1.0, "between 0 and 1"),
        ("gamma", 0.0 < cfg.gamma <= 1.0, "in (0, 1]"),
        ("zoom", 0.0 <= cfg.zoom < 1.0, "in [0, 1)"),
        ("color_jitter", cfg.color_jitter >= 0, "0 or more"),
        ("train_val_split", 0.0 <= cfg.train_val_split < 1.0, "in [0, 1)"),
    )
    for name, ok, what in checks:
        if not ok:
            raise StdaError(f"--{_flag(name)} must be {what}; got {getattr(cfg, name)}")
    if cfg.synthetic == "pretrain" and cfg.pretrain_epochs < 1:
        raise StdaError("--synthetic pretrain needs --pretrain-epochs of at least 1")


def _flag(name: str) -> str:
    return name.replace("_", "-")
