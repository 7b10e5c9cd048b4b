"""Training of benign/malignant classifiers under Accelerate: data pipeline, epochs, evaluation, checkpoints, resume.

``train.py`` is the command; this package is the machinery, importable on its own, one module per layer:
:mod:`.config` (settings and their checks), :mod:`.data`, :mod:`.step` (one epoch, one evaluation),
:mod:`.state` (run state, checkpoints, log) and :mod:`.run` (the run). The public face, re-exported here, is what
``train.py``, the CLI and the orchestrators use; the rest is imported from its module.


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
from stda_hf.training.config import TrainConfig, check_config
from stda_hf.training.run import TrainResult, push_run, run_training

__all__ = [
    "TrainConfig",
    "TrainResult",
    "check_config",
    "push_run",
    "quiet_loggers",
    "run_training",
    "train_from_args",
]
