"""Benchmark settings and the run plan: what runs (arms x folds x seeds) and where its files go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import SPLITS
from ..errors import StdaError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Settings


METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1")
"""Test metrics the benchmark compares, in report order (names of the project's binary metric module)."""


RUN_METRICS = (*METRICS, "accuracy", "precision", "loss", "n", "tn", "fp", "fn", "tp")
"""What the run table keeps of each run's test metrics."""


EXPLANATION_METRICS = ("relevance_in_mask", "relevance_on_artifact")
"""Explanation numbers reported per arm (``stda explain``'s summary, the relevance-localisation measurement)."""


EXPLAIN_DIR = "explain"


METRIC_TITLES = {
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
    "relevance_in_mask": "relevance in lesion",
    "relevance_on_artifact": "relevance on artifacts",
}


DEFAULT_ARMS = {
    "baseline": {"synthetic": "none"},
    "mix": {"synthetic": "mix"},
    "pretrain": {"synthetic": "pretrain"},
}


DEFAULT_EXPLAIN = {"method": "dtd", "split": "test", "limit": 32, "grid": 8}


STATUSES = ("done", "failed", "running")


SPLIT_ORDER = SPLITS


RUN_COLUMNS = ("arm", "fold", "seed", "status", "seconds", "run_dir")


ALPHA = 0.05


@dataclass
class BenchmarkConfig:
    """Settings of the ST-DA benchmark (``benchmarks/stda_benchmark.py``)."""

    name: str = "benchmark"  # names the work folder and the report
    real: str = ""  # real-image folder to benchmark on; empty: phantoms made with the `phantoms` settings
    phantoms: dict[str, Any] = field(default_factory=dict)  # PhantomConfig settings when `real` is empty
    shortcut: dict[str, Any] = field(default_factory=dict)
    # ^ phantoms only: {artifact, benign, malignant, splits}: plant an artifact at these per-class rates, only in
    #   the images of `splits` (the others are the same phantoms without it)
    out: str = ""  # work folder: fold views, synthetic sets, datasets, runs (default: runs/benchmark/<name>)
    report: str = ""  # report folder: report.md, runs.csv, plots (default: reports/<name>)
    folds: int = 3  # k of the k-fold cross-validation, grouped by lesion, patient and near-duplicates
    seeds: tuple[int, ...] = (0, 1)  # training seeds; every arm runs every fold x seed (add more later)
    fold_seed: int = 0  # shuffles the groups into folds; fixed for the life of a benchmark
    val: float = 0.15  # validation share of all images in each fold, drawn from its non-test groups
    phash_distance: int = 6  # near-duplicate threshold of `stda split` (-1 disables)
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    # ^ arm name -> train.py settings of that arm (e.g. synthetic: mix); everything else comes from `train`
    baseline: str = "baseline"  # the arm every other arm is compared with
    train: dict[str, Any] = field(default_factory=dict)  # train.py settings shared by every arm
    teacher: dict[str, Any] = field(default_factory=dict)  # train.py settings of each fold's teacher
    generate: dict[str, Any] = field(default_factory=dict)  # `stda generate` settings of each fold
    label: dict[str, Any] = field(default_factory=dict)  # `stda label` settings (min_confidence, calibrate)
    train_command: tuple[str, ...] = ()  # command that trains one run (default: python train.py)
    gpus_per_run: int = 1  # GPUs of one run; runs are spread over the visible GPUs, one run per slot
    devices: str = "auto"  # auto (every visible GPU, else CPU), cpu, or GPU ids like 0,1,2
    cpu_threads: int = 0  # torch CPU threads of every stage and run (0: torch's default; 1 suits busy CPUs)
    retry_failed: bool = False  # re-run the runs the table records as failed
    run_timeout: float = 0.0  # seconds before a training run is stopped and recorded as failed (0: never)
    curve_metric: str = "roc_auc"  # validation metric of the learning curves
    explain: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_EXPLAIN))
    # ^ `stda explain` settings for every finished run (the same images of its fold for every arm); {} disables

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise StdaError(f"folds: {self.folds}; cross-validation needs at least 2")
        if not self.seeds:
            raise StdaError("seeds: give at least one training seed, e.g. [0, 1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise StdaError(f"seeds: {list(self.seeds)} repeats a seed; each seed once")
        if self.baseline not in self.arms:
            raise StdaError(f"baseline: arm {self.baseline!r} is not among the arms {list(self.arms)}")
        for arm in self.arms:
            if not arm.replace("-", "_").isidentifier():
                raise StdaError(f"arm name {arm!r}: use letters, digits, '_' or '-' only")
        if self.gpus_per_run < 1:
            raise StdaError(f"gpus_per_run: {self.gpus_per_run}; must be at least 1")
        if self.real and (self.phantoms or self.shortcut):
            raise StdaError("give either `real` (your images) or `phantoms`/`shortcut` settings, not both")

    @property
    def work_dir(self) -> Path:
        return Path(self.out or Path("runs") / "benchmark" / self.name)

    @property
    def report_dir(self) -> Path:
        return Path(self.report or Path("reports") / self.name)


# ----------------------------------------------------------------------------------------------------------------
# Folds x seeds x arms


@dataclass(frozen=True, order=True)
class RunKey:
    """One training run of the benchmark: an arm on a fold with a seed."""

    fold: int
    seed: int
    arm: str

    @property
    def name(self) -> str:
        """Relative folder of the run: ``<arm>/fold<k>-seed<s>``."""
        return f"{self.arm}/fold{self.fold}-seed{self.seed}"


def plan_runs(cfg: BenchmarkConfig) -> list[RunKey]:
    """Every run of the benchmark, fold by fold and seed by seed, all arms of a pair together.

    That order completes whole (fold, seed) pairs first, so a benchmark stopped half-way can already be
    compared pair by pair.
    """
    return [RunKey(f, s, a) for f in range(cfg.folds) for s in cfg.seeds for a in cfg.arms]


def arm_uses_synthetic(settings: dict[str, Any]) -> bool:
    """Whether an arm's train.py settings draw on the synthetic split."""
    return str(settings.get("synthetic", "none")) != "none"


def fold_dir(cfg: BenchmarkConfig, fold: int) -> Path:
    return cfg.work_dir / "folds" / f"fold{fold}"


def needs_synthetic(cfg: BenchmarkConfig) -> bool:
    """Whether any arm trains on synthetic images (then each fold needs a teacher and a synthetic set)."""
    return any(arm_uses_synthetic(s) for s in cfg.arms.values())
