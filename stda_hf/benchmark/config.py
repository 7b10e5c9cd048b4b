"""Benchmark settings and the run plan: what runs (arms x folds x seeds) and where its files go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stda_hf import SPLITS
from stda_hf.core.errors import StdaError
from stda_hf.core.utils import check_seed

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Settings


METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1")
"""Test metrics the benchmark compares, in report order (names of the project's binary metric module)."""


RUN_METRICS = (*METRICS, "accuracy", "precision", "loss", "n", "tn", "fp", "fn", "tp")
"""What the run table keeps of each run's test metrics."""


CURVE_METRICS = (*METRICS, "accuracy", "precision", "loss")
"""Validation metrics train.py logs every epoch: what ``curve_metric`` may name (or a relevance_* number)."""


EXPLANATION_METRICS = ("relevance_in_mask", "relevance_on_artifact")
"""Explanation numbers reported per arm (``stda explain``'s summary, the relevance-localisation measurement)."""


RELIANCE_METRICS = ("reliance", "reliance_benign", "reliance_malignant", "roc_auc_clean", "roc_auc_reversed")
"""Reliance on a shortcut by intervention (``benchmark/reliance.py``), measured per run when ``shortcut`` is set."""


AREA_METRICS = ("mask_area", "artifact_area")
"""Region sizes (share of the image) the explanation shares are read against: carried, summarised, not tested."""


DEFAULT_PRIMARY_METRIC = "roc_auc"


ARM_STAGE_KEYS = ("generate", "label", "content")
"""Keys of an arm's settings that change its synthetic set (per-arm `stda generate` / `stda label` settings, and
``content``: what is done to the content images first), not train.py settings: arms with the same ones share a
synthetic set per fold."""

ARM_DATA = ("shortcut", "clean")
"""An arm's real images (``data:``) in a shortcut benchmark: as planted (the default), or ``clean`` phantoms in
every split, with its own teacher and synthetic set: the no-shortcut control."""

CONTENT_KEYS = ("remove_artifact",)
"""``content:`` settings: ``remove_artifact: true`` re-renders the train images that carry the planted artifact
without it before style transfer (phantoms only): the positive control, synthetic images without the shortcut."""


EXPLAIN_DIR = "explain"


METRIC_TITLES = {
    "roc_auc": "ROC AUC",
    "mask_area": "lesion area",
    "artifact_area": "artifact area",
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


DEFAULT_EXPLAIN = {"method": "dtd", "target": "malignant", "split": "test", "limit": 32, "grid": 8}
"""Every arm explains the same images and the same fixed target (the malignant log-odds), so arms compare like
with like; each model's own prediction would differ between arms."""


STATUSES = ("done", "failed", "running")


SPLIT_ORDER = SPLITS


RUN_COLUMNS = ("arm", "repeat", "fold", "seed", "status", "seconds", "run_dir")


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
    fold_seeds: tuple[int, ...] = ()  # repeated cross-validation: one k-fold partition per fold seed
    repeats: int = 0  # shorthand for fold_seeds: fold_seed, fold_seed + 1, ... (this many); 0: one repetition
    val: float = 0.15  # validation share of all images in each fold, drawn from its non-test groups
    phash_distance: int = 6  # near-duplicate threshold of `stda split` (-1 disables)
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    # ^ arm name -> train.py settings of that arm (e.g. synthetic: mix); everything else comes from `train`
    baseline: str = "baseline"  # the arm every other arm is compared with
    primary: dict[str, str] = field(default_factory=dict)
    # ^ the one endpoint read against alpha as it stands: {arm: mix, metric: roc_auc}; every other comparison is
    #   secondary (Holm). Unset: `mix` (else the first compared arm) on ROC AUC
    alpha: float = ALPHA  # two-sided level of the tests and intervals
    prior_fold_sd: float = 0.0
    # ^ SD of the per-fold primary differences expected BEFORE the runs (a pilot or prior knowledge): the report's
    #   power line rests on it, never on the spread the runs happen to show; 0: no power figure is stated
    prior_source: str = (
        ""  # where prior_fold_sd comes from (e.g. "pilot: reports/phantoms-small"), quoted in the report
    )
    train: dict[str, Any] = field(default_factory=dict)  # train.py settings shared by every arm
    teacher: dict[str, Any] = field(default_factory=dict)  # train.py settings of each fold's teacher
    generate: dict[str, Any] = field(default_factory=dict)  # `stda generate` settings of each fold
    content: dict[str, Any] = field(default_factory=dict)
    # ^ what is done to the content images before style transfer: {remove_artifact: true} takes the planted
    #   shortcut artifact off them first (phantoms; the positive control). Per arm too, like generate/label
    label: dict[str, Any] = field(default_factory=dict)  # `stda label` settings (min_confidence, calibrate)
    train_command: tuple[str, ...] = ()  # command that trains one run (default: python train.py)
    gpus_per_run: int = 1  # GPUs of one run; runs are spread over the visible GPUs, one run per slot
    devices: str = "auto"  # auto (every visible GPU, else CPU), cpu, or GPU ids like 0,1,2
    cpu_threads: int = 0  # torch CPU threads of every stage and run (0: torch's default; 1 suits busy CPUs)
    cpu_slots: int = 1
    # ^ training runs at once when they run on the CPU, each with cpu_threads threads: cores / cpu_threads
    #   (e.g. 2 on a 2-core machine with cpu_threads 1); runs are independent, so results do not change
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
        if not (self.prior_fold_sd >= 0 and self.prior_fold_sd < float("inf")):
            raise StdaError(
                f"prior_fold_sd: {self.prior_fold_sd}; give the expected SD of fold differences (>= 0)"
            )
        if self.baseline not in self.arms:
            raise StdaError(f"baseline: arm {self.baseline!r} is not among the arms {list(self.arms)}")
        for arm, settings in self.arms.items():
            if not str(arm).replace("-", "_").isidentifier():
                raise StdaError(f"arm name {arm!r}: use letters, digits, '_' or '-' only")
            if not isinstance(settings, dict):
                raise StdaError(
                    f"arms.{arm}: {settings!r} is not a mapping of train.py settings; write e.g. "
                    f"`{arm}: {{synthetic: none}}` (or `{arm}: {{}}` for the shared `train` settings)"
                )
        for name, seeds in (
            ("seeds", self.seeds),
            ("fold_seed", (self.fold_seed,)),
            ("fold_seeds", self.fold_seeds),
        ):
            for seed in seeds:
                check_seed(name, seed)
        if self.curve_metric not in CURVE_METRICS and not self.curve_metric.startswith("relevance_"):
            raise StdaError(
                f"curve_metric {self.curve_metric!r}: choose one of {list(CURVE_METRICS)} or a relevance_* number"
            )
        if self.gpus_per_run < 1:
            raise StdaError(f"gpus_per_run: {self.gpus_per_run}; must be at least 1")
        if self.cpu_slots < 1:
            raise StdaError(f"cpu_slots: {self.cpu_slots}; must be at least 1 (runs at once on the CPU)")
        self._check_repeats()
        self._check_primary()
        self._check_controls()
        for arm, settings in self.arms.items():
            for key in ARM_STAGE_KEYS:
                if not isinstance(settings.get(key, {}), dict):
                    raise StdaError(
                        f"arms.{arm}.{key}: {settings[key]!r}; give a mapping of `stda {key}` settings"
                    )
        if not 0 < self.alpha < 1:
            raise StdaError(f"alpha: {self.alpha}; give a level between 0 and 1, e.g. 0.05")
        if self.real and (self.phantoms or self.shortcut):
            raise StdaError("give either `real` (your images) or `phantoms`/`shortcut` settings, not both")

    def _check_repeats(self) -> None:
        if self.fold_seeds and self.repeats:
            raise StdaError(f"give fold_seeds {list(self.fold_seeds)} or repeats {self.repeats}, not both")
        if self.repeats < 0:
            raise StdaError(f"repeats: {self.repeats}; the number of cross-validation repetitions, 1 or more")
        if len(set(self.fold_seeds)) != len(self.fold_seeds):
            raise StdaError(f"fold_seeds: {list(self.fold_seeds)} repeats a seed; each fold seed once")
        if self.fold_seeds and self.fold_seeds[0] != self.fold_seed and self.fold_seed != 0:
            raise StdaError(
                f"fold_seed {self.fold_seed} and fold_seeds {list(self.fold_seeds)}: give only fold_seeds "
                "(its first seed is the first repetition)"
            )

    def _check_controls(self) -> None:
        for arm, content in [
            ("content", self.content),
            *((a, s.get("content") or {}) for a, s in self.arms.items()),
        ]:
            unknown = sorted(set(content) - set(CONTENT_KEYS)) if isinstance(content, dict) else []
            if unknown:
                raise StdaError(f"{arm}: unknown content setting(s) {unknown}; valid: {list(CONTENT_KEYS)}")
            if isinstance(content, dict) and content.get("remove_artifact") and not self.shortcut:
                raise StdaError(f"{arm}: content.remove_artifact needs a planted `shortcut` (phantoms)")
        for arm, settings in self.arms.items():
            data = settings.get("data", "shortcut")
            if data not in ARM_DATA:
                raise StdaError(f"arms.{arm}.data: {data!r}; valid: {list(ARM_DATA)}")
            if data == "clean" and not self.shortcut:
                raise StdaError(
                    f"arms.{arm}.data: clean is the no-shortcut control of a `shortcut` benchmark"
                )

    def _check_primary(self) -> None:
        if not self.primary:
            return
        arm, metric = self.primary.get("arm"), self.primary.get("metric")
        if set(self.primary) != {"arm", "metric"}:
            raise StdaError(f"primary: {self.primary}; give exactly {{arm: <arm>, metric: <metric>}}")
        if arm not in self.arms or arm == self.baseline:
            others = [a for a in self.arms if a != self.baseline]
            raise StdaError(f"primary arm {arm!r}: choose one of the compared arms {others}")
        if metric in RELIANCE_METRICS and not self.shortcut:
            raise StdaError(f"primary metric {metric!r} measures a planted shortcut: set `shortcut` too")
        if metric not in (*METRICS, *RELIANCE_METRICS) and not str(metric).startswith("relevance_"):
            raise StdaError(
                f"primary metric {metric!r}: choose one of {[*METRICS, *RELIANCE_METRICS]} or a relevance_* number"
            )

    @property
    def cv_seeds(self) -> list[int]:
        """The fold seed of each cross-validation repetition, repetition 0 first."""
        if self.fold_seeds:
            return list(self.fold_seeds)
        return [self.fold_seed + i for i in range(max(self.repeats, 1))]

    @property
    def primary_endpoint(self) -> tuple[str, str]:
        """``(arm, metric)`` of the primary endpoint (``primary``, or `mix`/the first compared arm on ROC AUC)."""
        if self.primary:
            return self.primary["arm"], self.primary["metric"]
        others = [a for a in self.arms if a != self.baseline]
        return ("mix" if "mix" in others else (others or [""])[0]), DEFAULT_PRIMARY_METRIC

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
    """One training run of the benchmark: an arm on a fold (of a CV repetition) with a seed."""

    fold: int
    seed: int
    arm: str
    repeat: int = 0  # index into the benchmark's fold seeds (repeated cross-validation)

    @property
    def name(self) -> str:
        """Relative folder of the run: ``<arm>/fold<k>-seed<s>`` (``<arm>/rep<r>-fold<k>-seed<s>`` after the first)."""
        return f"{self.arm}/{_fold_name(self.repeat, self.fold)}-seed{self.seed}"


def _fold_name(repeat: int, fold: int) -> str:
    return f"fold{fold}" if repeat == 0 else f"rep{repeat}-fold{fold}"


def plan_runs(cfg: BenchmarkConfig) -> list[RunKey]:
    """Every run of the benchmark, fold by fold and seed by seed, all arms of a pair together.

    That order completes whole (fold, seed) pairs first, so a benchmark stopped half-way can already be
    compared pair by pair.
    """
    repeats = range(len(cfg.cv_seeds))
    return [
        RunKey(f, s, a, r) for r in repeats for f in range(cfg.folds) for s in cfg.seeds for a in cfg.arms
    ]


def arm_uses_synthetic(settings: dict[str, Any]) -> bool:
    """Whether an arm's train.py settings draw on the synthetic split."""
    return str(settings.get("synthetic", "none")) != "none"


def train_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """An arm's train.py settings: its settings without the per-arm stage settings (:data:`ARM_STAGE_KEYS`)."""
    return {k: v for k, v in settings.items() if k not in (*ARM_STAGE_KEYS, "data")}


def synthetic_recipe(cfg: BenchmarkConfig, arm: str) -> str:
    """The name of the synthetic set an arm trains on: ``""`` for the benchmark's own `generate`/`label`
    settings, else ``s-<hash>`` of the arm's merged settings (arms with equal settings share one set)."""
    from stda_hf.core.utils import stable_hash

    own = {k: cfg.arms[arm].get(k) for k in ARM_STAGE_KEYS if cfg.arms[arm].get(k)}
    if not own or not arm_uses_synthetic(cfg.arms[arm]):
        return ""
    merged = {k: {**getattr(cfg, k), **own.get(k, {})} for k in ARM_STAGE_KEYS}
    if not merged["content"]:  # recipes named before `content` existed keep their names (a benchmark resumes)
        del merged["content"]
    merged["generate"] = legacy_generate(merged["generate"])  # and so do whole-frame recipes
    return "s-" + stable_hash(merged)[:10]


def legacy_generate(settings: dict[str, Any]) -> dict[str, Any]:
    """Generate settings without the later settings that hold the value every run had before them
    (:data:`stda_hf.generate.LEGACY_VALUES`): recipes and protocols recorded then keep their names and a
    benchmark made then resumes."""
    from stda_hf.generate import LEGACY_VALUES

    return {k: v for k, v in settings.items() if LEGACY_VALUES.get(k, object()) != v}


def recipe_settings(cfg: BenchmarkConfig, recipe: str) -> dict[str, dict[str, Any]]:
    """``{generate: ..., label: ...}`` settings of a synthetic set named by :func:`synthetic_recipe`."""
    for arm, settings in cfg.arms.items():
        if synthetic_recipe(cfg, arm) == recipe:
            return {k: {**getattr(cfg, k), **settings.get(k, {})} for k in ARM_STAGE_KEYS}
    return {k: dict(getattr(cfg, k)) for k in ARM_STAGE_KEYS}


def arm_data(cfg: BenchmarkConfig, arm: str) -> str:
    """An arm's real images: ``shortcut`` (as the benchmark planted them) or ``clean`` (:data:`ARM_DATA`)."""
    return str(cfg.arms[arm].get("data", "shortcut"))


def dataset_key(cfg: BenchmarkConfig, arm: str) -> str:
    """The dataset an arm trains on in each fold: its synthetic recipe, behind ``clean:`` for a clean-data arm."""
    recipe = synthetic_recipe(cfg, arm)
    return f"clean:{recipe}" if arm_data(cfg, arm) == "clean" else recipe


def fold_dir(cfg: BenchmarkConfig, fold: int, repeat: int = 0) -> Path:
    return cfg.work_dir / "folds" / _fold_name(repeat, fold)


def needs_synthetic(cfg: BenchmarkConfig) -> bool:
    """Whether any arm trains on synthetic images (then each fold needs a teacher and a synthetic set)."""
    return any(arm_uses_synthetic(s) for s in cfg.arms.values())
