"""Resuming: which checkpoint a resumed run continues from (``--resume``, ``--resume-from-checkpoint``), rewinding
the run to it, and the mid-epoch step checkpoints of ``--checkpointing-steps N``.

A step checkpoint ``checkpoints/step_EEEE_BBBBBB`` is taken in epoch ``EEEE`` after ``BBBBBB`` batches: the
Accelerate state, the run state of the epochs before, and each process's :class:`EpochProgress`. It is
superseded, and deleted, by the epoch's own checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_json
from stda_hf.training.config import TrainConfig
from stda_hf.training.state import RunState, checkpoint_dir, latest_checkpoint, save_checkpoint
from stda_hf.training.step import EpochProgress

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def checkpoint_to_resume(cfg: TrainConfig, run_dir: Path, accelerator) -> Path | None:
    """The checkpoint a ``--resume`` run loads: the newest one (``--resume``, ``--resume-from-checkpoint latest``)
    or the one ``--resume-from-checkpoint PATH`` names, the run rewound to it first.

    Raises
    ------
    StdaError
        PATH is not a complete epoch checkpoint of this run (``<output-dir>/checkpoints/epoch_NNNN``).
    """
    chosen = cfg.resume_from_checkpoint
    if chosen in (None, "latest"):
        return latest_resumable(run_dir, accelerator.num_processes)
    path = _checked(Path(chosen), run_dir)
    if accelerator.is_main_process:
        rewind(run_dir, path)
    accelerator.wait_for_everyone()
    return path


def _checked(path: Path, run_dir: Path) -> Path:
    folder = (run_dir / "checkpoints").resolve()
    if (
        not (path / STATE_FILE).is_file()
        or path.resolve().parent != folder
        or not path.name.startswith("epoch_")
    ):
        found = sorted(p.name for p in folder.glob("epoch_*")) if folder.is_dir() else []
        raise StdaError(
            f"--resume-from-checkpoint {path}: not an epoch checkpoint of the run in {run_dir} (found: {found}); "
            "give one of them, or 'latest'"
        )
    return path


def rewind(run_dir: Path, checkpoint: Path) -> None:
    """Make ``checkpoint`` the run's last state: later epoch checkpoints belong to the abandoned continuation
    and are deleted; so is the best checkpoint when it comes from one of them, and the best model is then
    chosen again from the epochs still to run (the resumed state forgets its best score)."""
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    epoch = int(state["epoch"])
    for later in sorted((run_dir / "checkpoints").glob("epoch_*")):
        if later.name > checkpoint.name:
            shutil.rmtree(later)
    drop_step_checkpoints(run_dir)
    best = checkpoint_dir(run_dir, "best")
    best_epoch = json.loads((best / STATE_FILE).read_text(encoding="utf-8"))["epoch"] if best.is_dir() else 0
    if best_epoch > epoch or (best.is_dir() and int(state.get("best_epoch") or 0) != best_epoch):
        shutil.rmtree(best, ignore_errors=True)
        write_json(
            checkpoint / STATE_FILE, {**state, "best_score": None, "best_epoch": 0, "best_metrics": {}}
        )
        logger.warning(
            "resuming from epoch %d: the best checkpoint (epoch %d) came later and is dropped; the best model "
            "is chosen again from the epochs to come",
            epoch,
            best_epoch,
        )
    logger.info("rewound %s to %s (epoch %d)", run_dir, checkpoint.name, epoch)


def latest_resumable(run_dir: Path, processes: int) -> Path | None:
    """The newest complete checkpoint: the last epoch checkpoint, or a later step checkpoint (one holding the
    progress of all ``processes``)."""
    last_epoch = latest_checkpoint(run_dir)
    done_epochs = int(last_epoch.name.removeprefix("epoch_")) if last_epoch is not None else 0
    steps = [
        p for p in sorted((run_dir / "checkpoints").glob("step_*"))
        if (p / STATE_FILE).is_file() and len(list(p.glob("progress_*.json"))) == processes
    ]  # fmt: skip
    if steps and _step_epoch(steps[-1]) > done_epochs:
        return steps[-1]
    return last_epoch


def _step_epoch(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def read_progress(checkpoint: Path, process_index: int) -> EpochProgress | None:
    """This process's progress in the epoch a step checkpoint interrupted; None for an epoch checkpoint."""
    file = checkpoint / f"progress_{process_index}.json"
    if not file.is_file():
        return None
    progress = EpochProgress(**json.loads(file.read_text(encoding="utf-8")))
    logger.info(
        "continuing epoch %d after batch %d (%s)", _step_epoch(checkpoint), progress.batches, checkpoint.name
    )
    return progress


def step_saver(
    accelerator, run_dir: Path, every: int, epoch: int, batches: int, accum: int, state: RunState
) -> Callable[[EpochProgress], None]:
    """The ``on_step`` of :func:`~stda_hf.training.step.train_one_epoch` for ``--checkpointing-steps N``: a
    step checkpoint after every N optimizer steps of the run (none at an epoch's end: its epoch checkpoint
    follows), the previous step checkpoint deleted."""
    per_epoch = math.ceil(batches / accum)

    def save(progress: EpochProgress) -> None:
        step = (epoch - 1) * per_epoch + math.ceil(progress.batches / accum)
        if step % every or progress.batches >= batches:
            return
        folder = run_dir / "checkpoints" / f"step_{epoch:04d}_{progress.batches:06d}"
        save_checkpoint(accelerator, folder, state)  # the state of the epochs before this one
        write_json(folder / f"progress_{accelerator.process_index}.json", dataclasses.asdict(progress))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            drop_step_checkpoints(run_dir, keep=folder.name)
        logger.info("step checkpoint %s", folder.name)

    return save


def drop_step_checkpoints(run_dir: Path, keep: str | None = None) -> None:
    """Delete the step checkpoints (but ``keep``): an epoch checkpoint, or a newer step one, supersedes them."""
    for folder in (run_dir / "checkpoints").glob("step_*"):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
