"""The training command: ``stda train``, ``python -m stda_hf.training`` and the repository's ``train.py``.

    accelerate launch train.py --dataset stda/skin-lesions --model vgg8 --synthetic mix --synthetic-ratio 1
    accelerate launch --mixed_precision bf16 -m stda_hf.training --dataset stda/skin-lesions   # installed wheel
    stda train --config train.yaml                           # one process; flags override the YAML
    torchrun --nproc_per_node 2 train.py --dataset hub/skin-lesions ...   # two processes (gloo on CPU)
    python train.py --config train.yaml --resume             # continue a killed run exactly where it stopped

``--dataset`` is a Hub id or a folder written by ``stda package`` (any dataset with an image and a label column
and train/validation splits; ``--image-column``, ``--label-column`` and ``--label-map`` adapt other datasets).
``--train-dir`` (and ``--validation-dir``) take plain image folders instead, one sub-folder per class; without
a validation split, ``--train-val-split`` moves a share of the training lesions to validation.
``--synthetic none|mix|pretrain`` chooses the experiment's arm. ``--mixed-precision`` and ``--grad-accum``,
when not given, are what ``accelerate launch`` / ``accelerate config`` set. The run folder (``--output-dir``)
receives Accelerate checkpoints (each epoch and the best), metrics saved with ``evaluate.save``, ``log.jsonl``,
the final model in ``model/`` (a ``transformers`` model: ``pipeline("image-classification", model=...,
trust_remote_code=True)``), test plots and a model card. ``--checkpointing-steps N`` adds a checkpoint every N
steps, ``--resume-from-checkpoint latest|PATH`` continues from the newest or a chosen one, ``--max-train-steps``
caps the optimizer steps.

The flags of transformers' ``run_image_classification_no_trainer.py`` work as they do there, in its underscore
spelling too (the hyphen spelling is the documented one)::

    accelerate launch train.py --dataset_name stda/skin-lesions --output_dir runs/vgg8 --num_train_epochs 30 \
        --per_device_train_batch_size 32 --learning_rate 1e-3 --checkpointing_steps 500 --with_tracking
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from stda_hf.core.config import OneLineParser, add_config_flags, config_from_args
from stda_hf.core.errors import run_reporting_errors
from stda_hf.core.utils import setup_logging
from stda_hf.training.config import TrainConfig
from stda_hf.training.run import TrainResult, run_training
from stda_hf.training.step import EvalHook

logger = logging.getLogger(__name__)

QUIET_LOGGERS = ("accelerate", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3")
"""Loggers held at WARNING unless ``--verbose``: Accelerate's per-checkpoint lines, one line per HTTP request
(``huggingface_hub`` requests through ``httpx``, or ``httpx2`` in its newer releases)."""


def get_args_parser(add_help: bool = True, prog: str = "train.py") -> argparse.ArgumentParser:
    """The training parser: ``--config`` plus one flag per :class:`~stda_hf.training.TrainConfig` field.

    Not ``transformers.HfArgumentParser``: it gives every flag its dataclass default, so a flag left out
    would override the same key of ``--config`` YAML; :func:`~stda_hf.core.config.add_config_flags` leaves unset
    flags at None (the YAML, then the dataclass, decides) and takes each flag's help from the field's comment.
    """
    parser = OneLineParser(
        prog=prog,
        description="Train VGG8 (or a torchvision VGG, or a transformers model) on real and synthetic "
        "skin-lesion images; validation and test on real images only.",
        add_help=add_help,
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file with settings (flags override it)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_config_flags(parser, TrainConfig)
    parser.epilog = (
        "The flags of transformers' run_image_classification_no_trainer.py work too, with the same meaning: "
        "every flag in underscore spelling (--output_dir, --push_to_hub, ...) and "
        + ", ".join(f"{theirs} ({ours})" for theirs, ours in EXAMPLE_FLAGS.items())
        + "."
    )
    return parser


EXAMPLE_FLAGS = {
    "--dataset_name": "--dataset",
    "--model_name_or_path": "--model",
    "--num_train_epochs": "--epochs",
    "--per_device_train_batch_size": "--batch-size",
    "--per_device_eval_batch_size": "--eval-batch-size",
    "--learning_rate": "--lr",
    "--gradient_accumulation_steps": "--grad-accum",
    "--image_column_name": "--image-column",
    "--label_column_name": "--label-column",
}
"""Flags of transformers' ``run_image_classification_no_trainer.py`` whose name differs from ours (same meaning)."""


def hyphen_spelling(argv: Sequence[str]) -> list[str]:
    """``argv`` with the example script's flag names in ours: :data:`EXAMPLE_FLAGS`, then ``--a_b`` as ``--a-b``.

    Only option names change (``--output_dir=x`` too); values, and everything after ``--``, are kept.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            name = EXAMPLE_FLAGS.get(name, name)
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def main(
    argv: Sequence[str] | None = None, on_evaluate: EvalHook | None = None, prog: str = "train.py"
) -> int:
    """Parse ``argv``, train, print the outcome; returns the exit status (0 ok, 2 bad input, 130 interrupted).

    ``on_evaluate`` is called after each validation and the final test evaluation
    (see :class:`~stda_hf.training.EvalContext`); without one, ``--explain-images`` fixed images are explained
    there (:func:`stda_hf.attribution.hook.explain_hook`, set up by :func:`~stda_hf.training.run_training`).
    """
    args = get_args_parser(prog=prog).parse_args(hyphen_spelling(sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbose)
    quiet_loggers(args.verbose)
    return run_reporting_errors(
        prog,
        lambda: train_from_args(args, on_evaluate),
        args.debug,
        "run the same command with --resume to continue",
    )


def train_from_args(args: argparse.Namespace, on_evaluate: EvalHook | None = None) -> None:
    """Train with the settings of parsed ``args`` and print :func:`summary` on the main process."""
    lone = lone_cpu_process(os.environ)
    if lone:
        logger.warning("%s", lone)
    result = run_training(config_from_args(TrainConfig, args), on_evaluate=on_evaluate)
    if result.is_main_process:
        print(summary(result))


def lone_cpu_process(env: Mapping[str, str]) -> str | None:
    """What to tell a user whose ``accelerate launch --cpu --num_processes N`` started one process, else None.

    Accelerate's launcher runs ``--cpu`` with any ``--num_processes`` through its single-process launcher: it
    exports ``MASTER_ADDR``/``MASTER_PORT`` for the N processes asked for, but starts one, without
    ``WORLD_SIZE``. Training would silently use one process.
    """
    launched_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    if not launched_cpu or "MASTER_PORT" not in env or int(env.get("WORLD_SIZE", "1")) > 1:
        return None
    return (
        "accelerate launch --cpu started ONE process although several were asked for (--num_processes): "
        "accelerate runs --cpu through its single-process launcher. For several CPU processes use "
        "`torchrun --nproc_per_node N train.py ...`; this run trains in one process"
    )


def quiet_loggers(verbose: bool) -> None:
    """Hold :data:`QUIET_LOGGERS` at WARNING (unless ``verbose``); processes other than rank 0 log warnings only."""
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger("stda_hf").setLevel(logging.WARNING)  # one process speaks for the run


def summary(result: TrainResult) -> str:
    """What the command prints at the end: status, best epoch and the headline metrics."""
    lines = [f"{result.status} after {result.epochs} epoch(s); run folder {result.run_dir}"]
    if result.validation:
        lines.append(f"best validation (epoch {result.best_epoch}): {_headline(result.validation)}")
    if result.test:
        lines.append(f"test: {_headline(result.test)}")
    if result.status == "stopped":
        lines.append("continue with the same command and --resume")
    return "\n".join(lines)


def _headline(metrics: dict[str, float]) -> str:
    keys = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1")
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
