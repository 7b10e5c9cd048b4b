"""Training of benign/malignant classifiers under Accelerate: data pipeline, epochs, evaluation, checkpoints, resume.

``train.py`` is the command; this package is the machinery, importable on its own, one module per layer:
:mod:`.config` (settings and their checks), :mod:`.data`, :mod:`.step` (one epoch, one evaluation),
:mod:`.state` (run state, checkpoints, log) and :mod:`.run` (the run). Their public names are re-exported here.


* data: :func:`load_splits` loads a Hub dataset (id or local ``stda package`` folder), checks its columns and
  that validation/test hold real images only, skips undecodable images; :func:`build_transforms`,
  :class:`EpochSampler` (synthetic mixing, balanced sampling, order drawn from seed and epoch alone);
* steps: :func:`train_one_epoch` and :func:`evaluate` (metrics through the project's ``evaluate`` module on
  predictions gathered from every process);
* run: :func:`run_training` with ``save_state`` checkpoints each epoch and at the best validation score, exact
  resume, early stopping, a JSON-lines log (and the --report-to trackers with --with-tracking), the final
  model (a transformers model), plots and card.
"""

from __future__ import annotations

from stda_hf.training.command import quiet_loggers, train_from_args
from stda_hf.training.config import (
    IMBALANCE,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    REQUIRED_COLUMNS,
    RUN_CONTROL,
    SCHEDULES,
    SYNTHETIC_MODES,
    TrainConfig,
    check_config,
)
from stda_hf.training.data import (
    EpochSampler,
    ImageLabelSet,
    Phase,
    Splits,
    build_phases,
    build_transforms,
    class_weights,
    load_splits,
    make_loader,
)
from stda_hf.training.run import TrainResult, push_run, run_training
from stda_hf.training.state import (
    JsonlTracker,
    RunState,
    checkpoint_dir,
    latest_checkpoint,
    prune_checkpoints,
    read_run_state,
    recover_checkpoints,
    save_checkpoint,
)
from stda_hf.training.step import (
    SUBGROUP_COLUMNS,
    EvalContext,
    EvalHook,
    compute_metrics,
    evaluate,
    learning_rate,
    phase_of,
    predict,
    subgroup_metrics,
    total_epochs,
    train_one_epoch,
)

__all__ = [
    "IMBALANCE",
    "MONITORS",
    "OPTIMIZERS",
    "PRECISIONS",
    "REQUIRED_COLUMNS",
    "RUN_CONTROL",
    "SCHEDULES",
    "SUBGROUP_COLUMNS",
    "SYNTHETIC_MODES",
    "EpochSampler",
    "EvalContext",
    "EvalHook",
    "ImageLabelSet",
    "JsonlTracker",
    "Phase",
    "RunState",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "build_phases",
    "build_transforms",
    "check_config",
    "checkpoint_dir",
    "class_weights",
    "compute_metrics",
    "evaluate",
    "latest_checkpoint",
    "learning_rate",
    "load_splits",
    "make_loader",
    "phase_of",
    "predict",
    "prune_checkpoints",
    "push_run",
    "quiet_loggers",
    "read_run_state",
    "recover_checkpoints",
    "run_training",
    "save_checkpoint",
    "subgroup_metrics",
    "total_epochs",
    "train_from_args",
    "train_one_epoch",
]
