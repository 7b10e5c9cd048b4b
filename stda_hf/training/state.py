"""Run state that survives a kill: the early-stopping record, the JSON-lines tracker, checkpoints and their pruning."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from stda_hf import __version__
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import append_jsonl, read_jsonl, write_json, write_text
from stda_hf.core.statefile import Fields, read_json
from stda_hf.training.config import TrainConfig
from stda_hf.training.step import phase_of

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Progress of a run, saved as ``trainer_state.json`` in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_score: float | None = None  # best validation value of the monitored metric
    best_epoch: int = 0  # epoch of best_score (0: none yet)
    bad_epochs: int = 0  # epochs since the last improvement
    stopped_early: bool = False  # early stopping ended the run
    best_metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the best epoch

    def update(self, metrics: dict[str, float], cfg: TrainConfig, epoch: int) -> bool:
        """Record ``epoch``'s validation metrics; True when it is the new best (real-image phase only)."""
        self.epoch = epoch
        if phase_of(cfg, epoch) != "train":
            return False
        score = metrics[cfg.monitor]
        if _improves(score, self.best_score, lower=cfg.monitor == "loss"):
            self.best_score, self.best_epoch, self.bad_epochs, self.best_metrics = (
                score,
                epoch,
                0,
                dict(metrics),
            )
            return True
        self.bad_epochs += 1
        self.stopped_early = 0 < cfg.early_stopping <= self.bad_epochs
        return False


def _improves(score: float, best: float | None, lower: bool) -> bool:
    if not math.isfinite(score):
        return False
    return best is None or (score < best if lower else score > best)


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON line per ``log`` call to ``log.jsonl`` (main process only)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        """Nothing to open: every record is appended and fsync'ed on its own."""

    def store_init_configuration(self, values: dict) -> None:
        """The resolved settings are in ``config.yaml``; nothing to add here."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        append_jsonl(self.path, {"epoch": step, **values})

    def finish(self) -> None:
        """Nothing to close."""

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (logged by a run killed before its checkpoint)."""
        kept = [r for r in read_jsonl(self.path) if (r.get("epoch") or 0) <= epoch]
        write_text(self.path, "".join(_json_line(r) for r in kept))


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def checkpoint_dir(run_dir: Path, epoch: int | str) -> Path:
    """``checkpoints/epoch_NNNN`` (or ``checkpoints/best``) inside the run folder."""
    name = epoch if isinstance(epoch, str) else f"epoch_{epoch:04d}"
    return run_dir / "checkpoints" / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete epoch checkpoint (one with ``trainer_state.json``), or None."""
    folder = run_dir / "checkpoints"
    done = (
        sorted(p for p in folder.glob("epoch_*") if (p / "trainer_state.json").is_file())
        if folder.is_dir()
        else []
    )
    return done[-1] if done else None


RUN_STATE_FIELDS = Fields(
    required={"epoch": int},
    optional={
        "best_score": (float, type(None)),
        "best_epoch": int,
        "bad_epochs": int,
        "stopped_early": bool,
        "best_metrics": dict,
    },
)
"""The schema of ``trainer_state.json``."""


def read_run_state(checkpoint: Path) -> RunState:
    """The :class:`RunState` saved in ``checkpoint``.

    Raises
    ------
    StdaError
        ``trainer_state.json`` corrupt or not a run state: naming it and what to do.
    """
    recover = f"delete the checkpoint folder {checkpoint} to resume from the one before, or start again with --overwrite"
    data = read_json(checkpoint / "trainer_state.json", RUN_STATE_FIELDS, recover=recover)
    return RunState(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(RunState)}})


# ----------------------------------------------------------------------------------------------------------------
# The run folder's marker: --overwrite deletes only what train made

RUN_MARKER = ".stda-train.json"
"""Written by train into a run folder it creates; --overwrite deletes only a folder that holds it."""

LOCK_PREFIX = ".train.rank"
"""Lock files (``.train.rank<k>.lock``) that keep a second train out of a run folder in use."""


def mark_run_dir(run_dir: Path) -> None:
    """Write the marker that says train made ``run_dir`` (kept when it is there already)."""
    if not is_train_run_dir(run_dir):
        write_json(run_dir / RUN_MARKER, {"made_by": "stda-hf train", "version": __version__})


def is_train_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a real folder (not a link) holding train's marker as a regular file (not a link)."""
    marker = run_dir / RUN_MARKER
    if run_dir.is_symlink() or not run_dir.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return read_json(marker, default={}).get("made_by") == "stda-hf train"
    except (StdaError, AttributeError):
        return False


def check_deletable(run_dir: Path) -> None:
    """Refuse to delete ``run_dir`` unless train made it: never through a link, never a folder without the marker.

    Raises
    ------
    StdaError
        ``run_dir`` is a symbolic link, or holds no marker; naming it and what to do.
    """
    if run_dir.is_symlink():
        raise StdaError(
            f"--output-dir {run_dir} is a symbolic link (to {run_dir.resolve()}); --overwrite never deletes through "
            "a link: give the folder itself, or another --output-dir"
        )
    if not is_train_run_dir(run_dir):
        raise StdaError(
            f"--overwrite: {run_dir} was not made by train (it holds no {RUN_MARKER}; runs made before "
            "train wrote one have none), so nothing in it is deleted; delete it yourself if it is a run to redo, or choose "
            "another --output-dir"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in the run folder ``run_dir`` but the lock files (checked by :func:`check_deletable`)."""
    check_deletable(run_dir)
    for child in run_dir.iterdir():
        if child.name.startswith(LOCK_PREFIX) and child.name.endswith(".lock"):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def save_checkpoint(accelerator, folder: Path, state: RunState) -> None:
    """``save_state`` into a temporary folder, then move it over ``folder``: a kill never leaves half a checkpoint."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", dataclasses.asdict(state))
        _replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".old-{dst.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoints(run_dir: Path) -> None:
    """Finish or undo checkpoint moves a kill interrupted: restore ``.old-*`` folders, drop ``.tmp-*`` ones."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for old in folder.glob(".old-*"):
        target = old.with_name(old.name[len(".old-") :])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` epoch checkpoints (the best one lives apart)."""
    done = sorted((run_dir / "checkpoints").glob("epoch_*"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
