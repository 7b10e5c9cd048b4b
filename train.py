"""Train a benign/malignant skin-lesion classifier on a Hub dataset, on one CPU or many GPUs, unchanged.

    accelerate launch train.py --dataset stda/skin-lesions --model vgg8 --synthetic mix --synthetic-ratio 1
    accelerate launch --mixed_precision bf16 train.py --dataset stda/skin-lesions   # the launcher decides
    python train.py --config train.yaml                      # one process; flags override the YAML
    torchrun --nproc_per_node 2 train.py --dataset hub/skin-lesions ...   # two processes (gloo on CPU)
    python train.py --config train.yaml --resume             # continue a killed run exactly where it stopped

The flags of transformers' ``run_image_classification_no_trainer.py`` (``--dataset_name``, ``--output_dir``,
``--per_device_train_batch_size``, ``--checkpointing_steps``, ``--resume_from_checkpoint latest``, ...) mean the
same here. A thin wrapper of :mod:`stda_hf.training.command` (also ``stda train`` and ``python -m stda_hf.training`` for
an installed package); see there for the flags and the run folder. The final model loads by id with
``pipeline("image-classification", model="you/vgg8-stda", trust_remote_code=True)``.
"""

from __future__ import annotations

import sys

from stda_hf.training.command import get_args_parser, main, summary

__all__ = ["get_args_parser", "main", "summary"]

if __name__ == "__main__":
    sys.exit(main())
