"""``--resume-from-checkpoint``: which checkpoint a resumed run continues from, and rewinding the run to it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_json
from stda_hf.training.config import TrainConfig
from stda_hf.training.state import checkpoint_dir, latest_checkpoint

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
        return latest_checkpoint(run_dir)
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
