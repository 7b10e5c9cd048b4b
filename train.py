"""Train a benign/malignant skin-lesion classifier on a Hub dataset, on one CPU or many GPUs, unchanged.

    accelerate launch train.py --dataset stda/skin-lesions --model vgg8 --synthetic mix --synthetic-ratio 1
    python train.py --config train.yaml                      # one process; flags override the YAML
    torchrun --nproc_per_node 2 train.py --dataset hub/skin-lesions ...   # two processes (gloo on CPU)
    python train.py --config train.yaml --resume             # continue a killed run exactly where it stopped

``--dataset`` is a Hub id or a folder written by ``stda package`` (any dataset with ``image`` and ``label``
columns and train/validation splits). ``--synthetic none|mix|pretrain`` chooses the experiment's arm.
The run folder (``--output-dir``) receives Accelerate checkpoints (each epoch and the best), metrics saved with
``evaluate.save``, ``log.jsonl``, the final model (``model.safetensors`` + ``config.json``, reloadable with
``stda_hf.models.vgg.load_model`` or ``VGG8.from_pretrained``), test plots and a model card.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stda_hf.config import add_config_flags, config_from_args
from stda_hf.errors import run_reporting_errors
from stda_hf.training import EvalHook, TrainConfig, TrainResult, run_training
from stda_hf.utils import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The train.py parser: ``--config`` plus one flag per :class:`~stda_hf.training.TrainConfig` field."""
    parser = argparse.ArgumentParser(
        prog="train.py",
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
    return parser


def main(argv: Sequence[str] | None = None, on_evaluate: EvalHook | None = None) -> int:
    """Parse ``argv``, train, print the outcome; returns the exit status (0 ok, 2 bad input, 130 interrupted).

    ``on_evaluate`` is called after each validation and the final test evaluation
    (see :class:`~stda_hf.training.EvalContext`); without one, ``--explain-images`` fixed images are explained
    there (:func:`stda_hf.explain_hook.explain_hook`, set up by :func:`~stda_hf.training.run_training`).
    """
    args = get_args_parser().parse_args(argv)
    _setup_logging(args.verbose)

    def train() -> None:
        result = run_training(config_from_args(TrainConfig, args), on_evaluate=on_evaluate)
        if result.is_main_process:
            print(summary(result))

    return run_reporting_errors(
        "train.py", train, args.debug, "run the same command with --resume to continue"
    )


def _setup_logging(verbose: bool) -> None:
    setup_logging(verbose)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-checkpoint INFO lines drown ours
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger("stda_hf").setLevel(logging.WARNING)  # one process speaks for the run


def summary(result: TrainResult) -> str:
    """What train.py prints at the end: status, best epoch and the headline metrics."""
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


if __name__ == "__main__":
    sys.exit(main())
