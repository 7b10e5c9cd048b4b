"""The ST-DA benchmark: baseline vs style-transfer augmentation over grouped folds x seeds, with statistics.

One configuration (:class:`BenchmarkConfig`) fixes the protocol: ``k`` folds of the real images, grouped as
``stda split`` groups them, times ``N`` training seeds, times the arms (baseline on real images only, ST-DA
``mix``, ST-DA ``pretrain``, optionally synthetic-only). Every arm trains the same model with the same settings
on the same folds and seeds. Each fold gets its own view of the real folder (links to the images plus that
fold's ``splits.csv``) and its own teacher, synthetic set, pseudo-labels and packaged dataset, so synthetic
images derive only from that fold's training images.

Runs are recorded in a table (``runs.csv``: arm, fold, seed, status, metrics, error), rewritten atomically after
each run: an interrupted benchmark resumes where it stopped, more seeds or arms can be added later, and a
failing run is recorded as failed without stopping the others. The statistics (mean and SD per arm, the
seed-to-seed spread as the repeatability figure, paired Wilcoxon signed-rank tests against the baseline with
the matched-pairs rank-biserial effect size and Holm's correction) and the Markdown report with its plots are
pure functions of that table and the runs' folders.

    python benchmarks/stda_benchmark.py --config benchmarks/configs/phantoms-small.yaml
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StdaError
from .fileio import write_text

logger = logging.getLogger(__name__)

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
SPLIT_ORDER = ("train", "validation", "test")
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


# ----------------------------------------------------------------------------------------------------------------
# The run table


@dataclass
class RunTable:
    """``runs.csv``: one row per attempted run (arm, fold, seed, status, seconds, run_dir, metrics..., error)."""

    path: Path
    rows: dict[RunKey, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RunTable:
        """Read a table; a missing file is an empty table.

        Raises
        ------
        StdaError
            When a row lacks the key columns or has an unknown status.
        """
        table = cls(Path(path))
        if not table.path.is_file():
            return table
        with open(table.path, newline="", encoding="utf-8") as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                key, parsed = _parse_row(row, f"{table.path} line {line_no}")
                table.rows[key] = parsed
        return table

    def save(self) -> None:
        """Rewrite the table atomically (an interrupted save leaves the previous table)."""
        write_text(self.path, self.to_csv())

    def to_csv(self) -> str:
        """The table as CSV text, rows in plan order, metric columns after the key columns."""
        extra = sorted({k for r in self.rows.values() for k in r} - set(RUN_COLUMNS) - {"error"})
        metrics = [m for m in (*METRICS, *EXPLANATION_METRICS) if m in extra]  # the rest: alphabetical
        columns = [*RUN_COLUMNS, *metrics, *(c for c in extra if c not in metrics), "error"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for key in sorted(self.rows):
            writer.writerow({c: _cell(self.rows[key].get(c)) for c in columns})
        return buf.getvalue()

    def status(self, key: RunKey) -> str | None:
        """``done``, ``failed``, ``running`` (interrupted), or None when never started."""
        row = self.rows.get(key)
        return row["status"] if row else None

    def todo(self, keys: list[RunKey], retry_failed: bool = False) -> list[RunKey]:
        """The runs of ``keys`` still to do: never started, interrupted, and failed ones if ``retry_failed``."""
        redo = {None, "running"} | ({"failed"} if retry_failed else set())
        return [k for k in keys if self.status(k) in redo]

    def record(self, key: RunKey, status: str, **values: Any) -> None:
        """Set a run's row (replacing an earlier attempt) and save the table."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; valid: {STATUSES}")
        self.rows[key] = {"arm": key.arm, "fold": key.fold, "seed": key.seed, "status": status, **values}
        self.save()

    def done(self) -> list[dict[str, Any]]:
        """Rows of finished runs, in plan order."""
        return [self.rows[k] for k in sorted(self.rows) if self.rows[k]["status"] == "done"]


def _parse_row(row: dict[str, str], where: str) -> tuple[RunKey, dict[str, Any]]:
    try:
        key = RunKey(int(row["fold"]), int(row["seed"]), row["arm"])
    except (KeyError, TypeError, ValueError):
        raise StdaError(
            f"{where}: needs integer fold and seed and an arm; delete the row to redo it"
        ) from None
    if row.get("status") not in STATUSES:
        raise StdaError(f"{where}: unknown status {row.get('status')!r}; valid: {list(STATUSES)}")
    parsed: dict[str, Any] = {"arm": key.arm, "fold": key.fold, "seed": key.seed}
    for col, text in row.items():
        if col in parsed or col is None:
            continue
        parsed[col] = text if col in ("status", "run_dir", "error") else _number(text)
    return key, parsed


def _number(text: str | None) -> float | str | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return " ".join(str(value).split())  # one line per row, whatever the error said


# ----------------------------------------------------------------------------------------------------------------
# Statistics (pure functions of the run table)


@dataclass
class ArmSummary:
    """One metric of one arm over its finished runs."""

    arm: str
    metric: str
    n: int  # finished runs with a finite value
    mean: float
    sd: float  # over all runs (folds and seeds): data and run-to-run variation together
    seed_sd: float  # pooled within-fold SD across seeds: run-to-run spread on the same data (repeatability)
    seed_dof: int  # degrees of freedom of seed_sd (runs minus folds, over folds with two seeds or more)
    minimum: float
    maximum: float


@dataclass
class PairedTest:
    """Wilcoxon signed-rank test of one arm against the baseline on one metric, paired by (fold, seed)."""

    arm: str
    metric: str
    n: int  # complete pairs
    n_nonzero: int  # pairs whose difference is not zero (the test ranks only these)
    mean_diff: float  # arm - baseline
    median_diff: float
    statistic: float  # Wilcoxon W (the smaller rank sum); nan when not computable
    p_value: float  # two-sided; nan when not computable
    rank_biserial: float  # matched-pairs rank-biserial correlation in [-1, 1]; nan without nonzero pairs
    min_p: float  # smallest two-sided p attainable with n_nonzero pairs
    p_holm: float = float("nan")  # Holm-adjusted over every test of the report
    note: str = ""  # why a figure is missing or cannot be significant


def values_by_pair(rows: list[dict[str, Any]], arm: str, metric: str) -> dict[tuple[int, int], float]:
    """``{(fold, seed): value}`` of one arm's finished runs that have a finite ``metric``."""
    out = {}
    for r in rows:
        v = r.get(metric)
        if r["arm"] == arm and r["status"] == "done" and isinstance(v, (int, float)) and math.isfinite(v):
            out[(int(r["fold"]), int(r["seed"]))] = float(v)
    return out


def seed_spread(values: dict[tuple[int, int], float]) -> tuple[float, int]:
    """Pooled within-fold standard deviation across seeds and its degrees of freedom (nan, 0 without repeats).

    The square root of the degrees-of-freedom-weighted mean of each fold's variance across seeds: how much a
    result moves when only the seed changes, with the data held fixed.
    """
    by_fold: dict[int, list[float]] = {}
    for (fold, _seed), v in values.items():
        by_fold.setdefault(fold, []).append(v)
    groups = [np.asarray(v) for v in by_fold.values() if len(v) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if dof == 0:
        return float("nan"), 0
    return float(math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof)), dof


def equal_spread_band(dof_a: int, dof_b: int, level: float = 0.95) -> tuple[float, float]:
    """The range of SD ratios ``a / b`` that two equally spread arms give with probability ``level``.

    Under normal errors the ratio of the pooled variances follows an F distribution with ``(dof_a, dof_b)``
    degrees of freedom; the band is the square root of its central ``level`` interval.
    """
    from scipy.stats import f

    if dof_a < 1 or dof_b < 1:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return float(math.sqrt(f.ppf(tail, dof_a, dof_b))), float(math.sqrt(f.ppf(1 - tail, dof_a, dof_b)))


def summarize_arm(rows: list[dict[str, Any]], arm: str, metric: str) -> ArmSummary:
    """Mean, SD, seed-to-seed spread and range of one arm's ``metric``."""
    values = values_by_pair(rows, arm, metric)
    x = np.asarray(list(values.values()), dtype=float)
    seed_sd, seed_dof = seed_spread(values)
    nan = float("nan")
    return ArmSummary(
        arm=arm,
        metric=metric,
        n=len(x),
        mean=float(x.mean()) if len(x) else nan,
        sd=float(x.std(ddof=1)) if len(x) >= 2 else nan,
        seed_sd=seed_sd,
        seed_dof=seed_dof,
        minimum=float(x.min()) if len(x) else nan,
        maximum=float(x.max()) if len(x) else nan,
    )


def rank_biserial(diffs: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros dropped), in [-1, 1].

    ``(R+ - R-) / (R+ + R-)`` with ranks of ``|d|`` (ties averaged): 1 when every nonzero difference is
    positive, -1 when every one is negative, 0 when they balance; nan when there is no nonzero difference.
    """
    from scipy.stats import rankdata

    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return float("nan")
    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_test(arm_values: dict, base_values: dict, arm: str = "", metric: str = "") -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of ``arm - baseline`` over the pairs both have, with effect size.

    Zero differences are dropped (Wilcoxon's method) and counted. With no nonzero pair the test is not
    computed (p is nan and the note says why); with few pairs the note gives the smallest attainable p.
    """
    from scipy.stats import wilcoxon

    pairs = sorted(set(arm_values) & set(base_values))
    d = np.asarray([arm_values[p] - base_values[p] for p in pairs], dtype=float)
    nonzero = int(np.count_nonzero(d))
    nan = float("nan")
    min_p = min(1.0, 2.0 / 2**nonzero) if nonzero else 1.0
    test = PairedTest(arm, metric, len(d), nonzero, nan, nan, nan, nan, rank_biserial(d), min_p)
    if len(d) == 0:
        test.note = "no complete pairs with the baseline"
        return test
    test.mean_diff, test.median_diff = float(d.mean()), float(np.median(d))
    if nonzero == 0:
        test.note = f"all {len(d)} differences are zero: no evidence of any difference"
        return test
    result = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    if min_p > ALPHA:
        test.note = f"{nonzero} nonzero pairs: p cannot go below {min_p:.3g}, so p < {ALPHA} is impossible"
    elif nonzero < len(d):
        test.note = f"{len(d) - nonzero} zero differences dropped"
    return test


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan entries stay nan and do not count in the family)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class BenchmarkStats:
    """Everything the report states: per-arm summaries and paired tests against the baseline."""

    arms: list[str]
    baseline: str
    metrics: list[str]  # test metrics present in the table
    explanation_metrics: list[str]  # explanation numbers present in the table
    summaries: dict[tuple[str, str], ArmSummary]  # (arm, metric) -> summary
    tests: list[PairedTest]  # every non-baseline arm x test metric, Holm-adjusted together
    n_done: int
    n_failed: int


def compute_stats(
    rows: list[dict[str, Any]], arms: list[str], baseline: str, explanation_metrics=EXPLANATION_METRICS
) -> BenchmarkStats:
    """Summaries of every arm and metric, and the paired tests of each arm against ``baseline``.

    ``explanation_metrics`` are summarised per arm where the table has them; only the test metrics are tested.
    """
    present = {k for r in rows if r.get("status") == "done" for k, v in r.items() if v is not None}
    metrics = [m for m in METRICS if m in present]
    explanation = [m for m in explanation_metrics if m in present]
    summaries = {(a, m): summarize_arm(rows, a, m) for a in arms for m in (*metrics, *explanation)}
    tests = [
        paired_test(values_by_pair(rows, a, m), values_by_pair(rows, baseline, m), a, m)
        for a in arms
        if a != baseline
        for m in metrics
    ]
    for t, p in zip(tests, holm([t.p_value for t in tests]), strict=True):
        t.p_holm = p
    return BenchmarkStats(
        arms=list(arms),
        baseline=baseline,
        metrics=metrics,
        explanation_metrics=explanation,
        summaries=summaries,
        tests=tests,
        n_done=sum(r["status"] == "done" for r in rows),
        n_failed=sum(r["status"] == "failed" for r in rows),
    )


# ----------------------------------------------------------------------------------------------------------------
# Report: Markdown and plots


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric.replace("_", " "))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def results_table(stats: BenchmarkStats, metrics: list[str]) -> list[str]:
    """Markdown rows: per arm, ``mean ± SD`` of each metric and the number of runs."""
    rows = []
    for arm in stats.arms:
        cells = [f"{_fmt(s.mean)} ± {_fmt(s.sd)}" for s in (stats.summaries[(arm, m)] for m in metrics)]
        n = max((stats.summaries[(arm, m)].n for m in metrics), default=0)
        rows.append([f"**{arm}**" if arm == stats.baseline else arm, str(n), *cells])
    return _table(["arm", "runs", *(_title(m) for m in metrics)], rows)


def repeatability_table(stats: BenchmarkStats) -> list[str]:
    """Markdown rows: per arm, the seed-to-seed SD of each metric and its ratio to the baseline's."""
    rows = []
    for arm in stats.arms:
        cells = []
        for m in stats.metrics:
            own, base = stats.summaries[(arm, m)].seed_sd, stats.summaries[(stats.baseline, m)].seed_sd
            ratio = own / base if math.isfinite(own) and math.isfinite(base) and base > 0 else float("nan")
            cells.append(_fmt(own) if arm == stats.baseline else f"{_fmt(own)} (×{_fmt(ratio, 2)})")
        rows.append([arm, *cells])
    return _table(["arm", *(_title(m) for m in stats.metrics)], rows)


def tests_table(stats: BenchmarkStats) -> list[str]:
    """Markdown rows: one paired test per arm and metric."""
    rows = [
        [
            t.arm,
            _title(t.metric),
            f"{t.n} ({t.n_nonzero})",
            f"{t.mean_diff:+.3f}" if math.isfinite(t.mean_diff) else "n/a",
            f"{t.median_diff:+.3f}" if math.isfinite(t.median_diff) else "n/a",
            _fmt(t.statistic, 1),
            _p(t.p_value),
            _p(t.p_holm),
            f"{t.rank_biserial:+.2f}" if math.isfinite(t.rank_biserial) else "n/a",
            t.note,
        ]
        for t in stats.tests
    ]
    header = [
        "arm",
        "metric",
        "pairs (nonzero)",
        "mean Δ",
        "median Δ",
        "W",
        "p",
        "p Holm",
        "r (rank-biserial)",
    ]
    return _table([*header, "note"], rows)


def caveats(stats: BenchmarkStats) -> list[str]:
    """Automatic cautions: how many pairs, what p can reach, how many tests, failed runs."""
    lines = []
    n_pairs = max((t.n for t in stats.tests), default=0)
    if stats.tests:
        floor = min(1.0, 2.0 / 2**n_pairs) if n_pairs else 1.0
        lines.append(
            f"- Each paired test has at most {n_pairs} pairs (folds × seeds); the smallest two-sided p a Wilcoxon "
            f"test can give with {n_pairs} pairs is {floor:.3g}."
            + (" Significance at 0.05 is out of reach by construction." if floor > ALPHA else "")
        )
        lines.append(
            f"- {len(stats.tests)} tests are reported; `p Holm` corrects for all of them together. Pairs share "
            "folds (the same test images across seeds), so they are not fully independent and p is optimistic."
        )
        lines.append(
            "- Δ is arm minus baseline; r (rank-biserial) is +1 when the arm wins every pair, -1 when it loses "
            "every pair, 0 when wins and losses balance."
        )
    lines.append(
        "- Repeatability is the pooled within-fold SD across seeds (same data, different seed); a ratio below "
        "1 means the arm's runs agree more closely than the baseline's."
    )
    lines += _spread_caveat(stats)
    if stats.n_failed:
        lines.append(
            f"- {stats.n_failed} run(s) failed and are left out (see below); pairs missing a run drop."
        )
    return lines


def _spread_caveat(stats: BenchmarkStats) -> list[str]:
    """How far SD ratios stray by chance alone with the seed repeats the table has (F distribution)."""
    others = [a for a in stats.arms if a != stats.baseline]
    if not stats.metrics or not others:
        return []
    metric = stats.metrics[0]
    dof_base = stats.summaries[(stats.baseline, metric)].seed_dof
    dof_arm = max(stats.summaries[(a, metric)].seed_dof for a in others)
    lo, hi = equal_spread_band(dof_arm, dof_base)
    if not math.isfinite(lo):
        return ["- No fold has two finished seeds yet, so there is no repeatability figure."]
    return [
        f"- The seed SDs rest on {dof_arm} and {dof_base} degrees of freedom: two arms with truly equal spread give "
        f"SD ratios between {lo:.2f} and {hi:.2f} 95% of the time, so only ratios outside that band say anything."
    ]


def render_report(
    cfg: BenchmarkConfig,
    stats: BenchmarkStats,
    fold_info: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    plots: dict[str, str],
    reading: str = "",
    config_path: str = "",
) -> str:
    """The Markdown report: protocol, results, repeatability, paired tests, explanations, plots, runs, reading."""
    cmd = f"python benchmarks/stda_benchmark.py --config {config_path or '<config>.yaml'}"
    lines = [f"# ST-DA benchmark: {cfg.name}", "", f"Reproduce or extend (it resumes): `{cmd}`", ""]
    lines += _protocol_section(cfg, fold_info)
    lines += ["", f"## Results on the test folds (mean ± SD over runs, {stats.n_done} finished runs)", ""]
    lines += results_table(stats, stats.metrics) if stats.metrics else ["No finished runs yet."]
    if stats.metrics:
        lines += ["", "## Repeatability: seed-to-seed SD (ratio to the baseline's)", ""]
        lines += repeatability_table(stats)
    if stats.tests:
        lines += [
            "",
            f"## Paired tests against `{stats.baseline}` (Wilcoxon signed-rank over folds × seeds)",
            "",
        ]
        lines += tests_table(stats)
    if stats.explanation_metrics:
        explain = {**DEFAULT_EXPLAIN, **cfg.explain}
        what = f"`{explain['method']}` on the first {explain['limit'] or 'all'} {explain['split']} images of each fold"
        lines += ["", f"## Explanations ({what}; share of positive relevance, mean ± SD)", ""]
        lines += results_table(stats, stats.explanation_metrics)
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()] or ["No plots (no finished runs)."]
    lines += [
        "",
        "## Runs",
        "",
        f"Every run, with its metrics and errors: [runs.csv](runs.csv). Failed: {len(failed)}.",
    ]
    lines += [
        f"- {r['arm']} fold {r['fold']} seed {r['seed']}: {r.get('error') or 'no message'}" for r in failed
    ]
    lines += ["", "## Caveats (automatic)", "", *caveats(stats), "", "## Reading", ""]
    lines += [reading.strip() or "No reading written yet: put one in `reading.md` beside this report."]
    return "\n".join(lines) + "\n"


def _protocol_section(cfg: BenchmarkConfig, fold_info: list[dict[str, Any]]) -> list[str]:
    data = cfg.real or f"phantoms {_settings(cfg.phantoms) or '(defaults)'}"
    lines = ["## Protocol", "", f"- Data: {data}"]
    if cfg.shortcut:
        lines.append(f"- Planted shortcut: {_settings(cfg.shortcut)}")
    lines += [
        f"- {cfg.folds} folds grouped by lesion, patient and near-duplicates (fold seed {cfg.fold_seed}; "
        f"validation {cfg.val:.0%} of the images), × seeds {list(cfg.seeds)}; validation and test real only",
        *(f"- Arm `{a}`: {_settings(s) or 'train settings only'}" for a, s in cfg.arms.items()),
        f"- Shared training settings: {_settings(cfg.train) or 'train.py defaults'}",
        f"- Teacher (per fold, real train images only): {_settings(cfg.teacher) or 'train.py defaults'}",
        f"- Style transfer (per fold, train images only): {_settings(cfg.generate) or 'defaults'}",
        f"- Pseudo-labels: {_settings(cfg.label) or 'defaults'}",
    ]
    if fold_info:
        lines += ["", *_fold_table(fold_info)]
    return lines


def _fold_table(fold_info: list[dict[str, Any]]) -> list[str]:
    rows = []
    for info in fold_info:
        counts = info.get("counts", {})
        cells = [
            f"{counts.get(s, {}).get('benign', 0)}/{counts.get(s, {}).get('malignant', 0)}"
            for s in SPLIT_ORDER
        ]
        synthetic = info.get("synthetic", {})
        rows.append(
            [
                str(info.get("fold")),
                *cells,
                str(synthetic.get("images", "")),
                str(synthetic.get("kept", "")),
                str(synthetic.get("malignant", "")),
                info.get("error", ""),
            ]
        )
    header = ["fold", "train b/m", "validation b/m", "test b/m", "synthetic", "kept", "labelled malignant"]
    return _table([*header, "error"], rows)


def _settings(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arm_colors(arms: list[str]) -> dict[str, Any]:
    cmap = _pyplot().get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_boxplots(rows: list[dict[str, Any]], arms: list[str], metrics: list[str], path: Path) -> Path:
    """One box plot per metric, a box per arm, every run drawn as a point (jittered); written to ``path``."""
    plt = _pyplot()
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    rng = np.random.default_rng(0)
    colors = _arm_colors(arms)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        data = [list(values_by_pair(rows, a, metric).values()) for a in arms]
        ax.boxplot(data, showfliers=False, widths=0.5)
        for i, (arm, values) in enumerate(zip(arms, data, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=colors[arm], zorder=3)
        ax.set_xticks(range(1, len(arms) + 1), arms, rotation=20, fontsize=8)
        ax.set_title(_title(metric), fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    return _save_figure(fig, path)


def plot_learning_curves(
    logs: dict[RunKey, list[dict[str, float]]], arms: list[str], metric: str, path: Path
) -> Path:
    """Training loss and validation ``metric`` per epoch: a thin line per run, coloured by arm."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    colors = _arm_colors(arms)
    for key, records in sorted(logs.items()):
        for ax, column in zip(axes, ("train_loss", f"val_{metric}"), strict=True):
            points = [(r["epoch"], r[column]) for r in records if _finite(r.get(column)) and "epoch" in r]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, color=colors.get(key.arm, "gray"), alpha=0.6, lw=1)
    for ax, title in zip(axes, ("training loss", f"validation {_title(metric)}"), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in arms]
    axes[1].legend(handles=handles, fontsize=7, frameon=False)
    return _save_figure(fig, path)


def plot_heatmaps(images: dict[str, Path], path: Path, caption: str = "") -> Path:
    """The arms' heatmap grids of the same fold, seed and images, one above the other, each under its arm's name.

    Composed at the grids' own resolution (no resampling), so every pixel of the heatmaps stays readable.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .images import load_image, save_image

    grids = {arm: load_image(p) for arm, p in images.items()}
    font = ImageFont.load_default(size=14)
    bar = 24
    width = max(g.width for g in grids.values())
    height = bar * (len(grids) + bool(caption)) + sum(g.height for g in grids.values())
    canvas = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    if caption:
        draw.text((6, y + 4), caption, fill="black", font=font)
        y += bar
    for arm, grid in grids.items():
        draw.text((6, y + 4), arm, fill="black", font=font)
        canvas.paste(grid, (0, y + bar))
        y += bar + grid.height
    save_image(canvas, path)
    return path


def _save_figure(fig, path: Path) -> Path:
    from .fileio import atomic_write

    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    _pyplot().close(fig)
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------------------------
# Data: phantoms or the user's folder, and one leakage-free view per fold


def prepare_sources(cfg: BenchmarkConfig) -> dict[str, Path]:
    """``{split: real-image folder}`` the fold views draw each split's images from.

    Real data: the user's folder for every split. Phantoms: one folder made with ``cfg.phantoms``; with a
    ``shortcut`` a second folder of the same phantoms with the artifact planted serves the shortcut's splits.
    """
    if cfg.real:
        root = Path(cfg.real)
        return dict.fromkeys(SPLIT_ORDER, root)
    clean = _make_phantoms(cfg.work_dir / "phantoms", dict(cfg.phantoms))
    sources = dict.fromkeys(SPLIT_ORDER, clean)
    if cfg.shortcut:
        settings, splits = shortcut_phantom_settings(cfg.phantoms, cfg.shortcut)
        planted = _make_phantoms(cfg.work_dir / "phantoms-shortcut", settings)
        sources.update(dict.fromkeys(splits, planted))
    return sources


def shortcut_phantom_settings(phantoms: dict[str, Any], shortcut: dict[str, Any]) -> tuple[dict, list[str]]:
    """Phantom settings with the shortcut artifact planted, and the splits that get them.

    Raises
    ------
    StdaError
        Unknown keys, artifact or split in ``shortcut``.
    """
    from .phantoms import DEFAULT_ARTIFACT_RATES
    from .real import ARTIFACTS

    known = {"artifact", "benign", "malignant", "splits"}
    if set(shortcut) - known or "artifact" not in shortcut:
        raise StdaError(
            f"shortcut {shortcut}: give artifact (one of {list(ARTIFACTS)}) and optionally {sorted(known)}"
        )
    if shortcut["artifact"] not in ARTIFACTS:
        raise StdaError(f"shortcut artifact {shortcut['artifact']!r}; valid: {list(ARTIFACTS)}")
    splits = list(shortcut.get("splits", ["train"]))
    if not splits or set(splits) - set(SPLIT_ORDER):
        raise StdaError(f"shortcut splits {splits}; choose among {list(SPLIT_ORDER)}")
    rates = dict(phantoms.get("artifacts", DEFAULT_ARTIFACT_RATES))
    rates[shortcut["artifact"]] = (float(shortcut.get("benign", 1.0)), float(shortcut.get("malignant", 0.0)))
    return {**phantoms, "artifacts": rates}, splits


def _make_phantoms(root: Path, settings: dict[str, Any]) -> Path:
    """Make the phantom folder unless it already holds exactly these settings (resume skips it)."""
    import yaml

    from .config import config_to_dict
    from .phantoms import PhantomConfig, make_phantoms

    cfg = PhantomConfig(**settings)
    saved = root / "phantoms.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") == yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False
    ):
        return root
    logger.info("making %d phantoms (%d px) in %s", cfg.n, cfg.size, root)
    make_phantoms(root, cfg, overwrite=True)
    return root


def write_fold_view(dest: Path, folds, fold: int, sources: dict[str, Path]) -> Path:
    """A real-image folder for one fold: links to each image (from its split's source), metadata, splits.csv.

    Only the fold's images are listed; masks and artifact maps are linked too. Re-writing a view is cheap and
    gives the same folder, so resumed benchmarks simply rebuild it.
    """
    from .licenses import write_attribution
    from .real import read_real_folder

    readers = {root: read_real_folder(root) for root in set(sources.values())}
    assignment = folds.assignments[fold]
    images = [readers[sources[assignment[im.isic_id]]][im.isic_id] for im in folds.images]
    for sub, attr in (("images", "path"), ("masks", "mask_path"), ("artifacts", "artifact_path")):
        _link_files(dest / sub, [getattr(im, attr) for im in images if getattr(im, attr) is not None])
    rows = [_metadata_row(im) for im in images]
    write_text(dest / "metadata.csv", _csv_text(rows))
    write_text(dest / "splits.csv", folds.splits_csv(fold))
    write_attribution(dest, rows, title=f"Attribution: fold {fold} of the benchmark's images")
    return dest


def _link_files(folder: Path, targets: list[Path]) -> None:
    """Make ``folder`` hold exactly one symbolic link per target, named like it."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    wanted = {t.name: t.resolve() for t in targets}
    for entry in folder.iterdir():
        if entry.name not in wanted or not entry.is_symlink() or entry.resolve() != wanted[entry.name]:
            entry.unlink()
    for name, target in wanted.items():
        if not (folder / name).is_symlink():
            os.symlink(target, folder / name)


def _metadata_row(im) -> dict[str, str]:
    from .real import REQUIRED_COLUMNS

    row = {c: getattr(im, c) for c in REQUIRED_COLUMNS}
    return {**row, **{k: v for k, v in im.extra.items() if k not in row}}


def _csv_text(rows: list[dict[str, str]]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def check_fold_synthetic(view: Path, synthetic: Path) -> int:
    """Refuse synthetic images whose content or style image is not in this fold's train split; return the count.

    Raises
    ------
    StdaError
        Naming the offending synthetic ids and their source images.
    """
    from .fileio import read_jsonl
    from .real import read_real_folder

    train = {im.isic_id for im in read_real_folder(view).subset("train")}
    records = read_jsonl(synthetic / "manifest.jsonl")
    bad = [r for r in records if r["content_id"] not in train or r["style_id"] not in train]
    if bad:
        examples = ", ".join(f"{r['id']} ({r['content_id']} x {r['style_id']})" for r in bad[:3])
        raise StdaError(
            f"{synthetic}: {len(bad)} synthetic image(s) derive from images outside the train split of {view}, "
            f"e.g. {examples}; delete {synthetic} and re-run the benchmark"
        )
    return len(records)


# ----------------------------------------------------------------------------------------------------------------
# Fold preparation: teacher, style transfer, pseudo-labels, dataset (each stage resumes on its own)


def fold_dir(cfg: BenchmarkConfig, fold: int) -> Path:
    return cfg.work_dir / "folds" / f"fold{fold}"


def needs_synthetic(cfg: BenchmarkConfig) -> bool:
    """Whether any arm trains on synthetic images (then each fold needs a teacher and a synthetic set)."""
    return any(arm_uses_synthetic(s) for s in cfg.arms.values())


def prepare_fold(cfg: BenchmarkConfig, folds, fold: int, sources: dict[str, Path]) -> Path:
    """Build one fold's dataset and return its folder (``stda package`` layout); records ``fold.json``.

    Real view -> (teacher trained on the view's real train images -> synthetic images from its train images
    -> pseudo-labels) -> packaged dataset with validation and test real only.
    """
    from .fileio import write_json
    from .package import PackageConfig, package

    d = fold_dir(cfg, fold)
    view = write_fold_view(d / "real", folds, fold, sources)
    info: dict[str, Any] = {"fold": fold, "counts": folds.summary(fold)}
    synthetic = None
    if needs_synthetic(cfg):
        package(view, d / "hub-real", cfg=PackageConfig(name=f"benchmark/{cfg.name}-fold{fold}-real"))
        teacher = train_teacher(cfg, d / "teacher", d / "hub-real")
        synthetic = d / "synthetic"
        info["synthetic"] = make_synthetic(cfg, view, synthetic, teacher)
    package(view, d / "hub", synthetic=synthetic, cfg=PackageConfig(name=f"benchmark/{cfg.name}-fold{fold}"))
    write_json(d / "fold.json", info)
    return d / "hub"


def make_synthetic(cfg: BenchmarkConfig, view: Path, out: Path, teacher: Path) -> dict[str, Any]:
    """Style transfer from the fold's train images, the leakage check, and pseudo-labels; returns counts."""
    from .generate import GenerateConfig, generate
    from .label import LabelConfig, label_synthetic

    generate(view, out, GenerateConfig(**cfg.generate))
    images = check_fold_synthetic(view, out)
    summary = label_synthetic(out, LabelConfig(**{**cfg.label, "teacher": str(teacher), "real": str(view)}))
    return {
        "images": images,
        "kept": summary["kept"],
        "malignant": summary["labels"].get("malignant", 0),
        "teacher": summary["teacher"],
    }


def train_teacher(cfg: BenchmarkConfig, run_dir: Path, dataset: Path) -> Path:
    """Train (or reuse) the fold's teacher on real images only, seeded with ``fold_seed``; return its run folder.

    Raises
    ------
    StdaError
        When the training command fails (the message carries the end of its log).
    """
    if (run_dir / "model" / "config.json").is_file():
        return run_dir
    settings = {
        **cfg.train,
        **cfg.teacher,
        "synthetic": "none",
        "seed": cfg.fold_seed,  # fixed with the folds: adding or reordering seeds never changes a teacher
        "dataset": str(dataset),
    }
    argv = train_argv(cfg, settings, run_dir, "resume")
    ok, error, _ = run_command(argv, run_dir.with_suffix(".log"), None, cfg.run_timeout, cfg.cpu_threads)
    if not ok:
        raise StdaError(f"teacher training in {run_dir} failed: {error}")
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Training runs as subprocesses (a failing run is recorded, not fatal)


def default_train_command(gpus: int = 1) -> list[str]:
    """``python train.py``, or ``accelerate launch --multi_gpu`` when one run spans several GPUs.

    Raises
    ------
    StdaError
        When ``train.py`` is not beside the package (an installed copy without the repository).
    """
    import sys

    script = Path(__file__).resolve().parent.parent / "train.py"
    if not script.is_file():
        raise StdaError(
            f"{script} not found; run the benchmark from a checkout of the repository or set train_command"
        )
    if gpus == 1:
        return [sys.executable, str(script)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus)]
    return [*launch, str(script)]


def train_argv(cfg: BenchmarkConfig, settings: dict[str, Any], run_dir: Path, mode: str) -> list[str]:
    """The command line of one training run: the settings go in a YAML beside the run folder.

    ``mode`` is ``resume`` (continue an interrupted run, fresh start if none) or ``overwrite`` (start again).
    """
    import sys

    import yaml

    config = run_dir.parent / f"{run_dir.name}.yaml"
    write_text(config, yaml.safe_dump({**settings, "output_dir": str(run_dir)}, sort_keys=True))
    base = [sys.executable if c == "{python}" else c for c in cfg.train_command]
    return [*(base or default_train_command(cfg.gpus_per_run)), "--config", str(config), f"--{mode}"]


def run_command(
    argv: list[str], log: Path, devices: str | None, timeout: float, threads: int = 0
) -> tuple[bool, str, float]:
    """Run one training command with its output in ``log``; return (ok, error, seconds).

    The command runs in its own process group, so a timeout or Ctrl-C stops it and every worker it started.
    ``devices`` sets ``CUDA_VISIBLE_DEVICES`` (None: the CPU, or whatever the environment says); ``threads``
    (if positive) caps its CPU threads.
    """
    import os
    import subprocess
    import time

    env = {**os.environ, "STDA_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if threads > 0:
        env.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"), str(threads)))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _ACTIVE.add(proc.pid)
        try:
            code = proc.wait(timeout=timeout or None)
        except BaseException as err:  # timeout, Ctrl-C: stop the whole group, then report or re-raise
            stop_group(proc.pid)
            proc.wait()
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            return False, f"stopped after {timeout:g} s (run_timeout); log: {log}", time.monotonic() - start
        finally:
            _ACTIVE.discard(proc.pid)
    seconds = time.monotonic() - start
    if code != 0:
        return False, f"exit status {code}: {last_error_line(log)} (log: {log})", seconds
    return True, "", seconds


def stop_group(pgid: int) -> None:
    """Kill a training command's process group (it may already be gone)."""
    import os
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_error_line(log: Path) -> str:
    """The most telling line at the end of a log: the last line naming an error, else the last line."""
    lines = [
        ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    for line in reversed(lines[-60:]):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def device_slots(devices: str, gpus_per_run: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` values of the parallel run slots; ``[None]`` (one slot) on the CPU.

    Raises
    ------
    StdaError
        A bad ``devices`` value, or fewer GPUs than one run needs.
    """
    import os

    if devices == "cpu":
        return [None]
    if devices == "auto":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    else:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not all(d.isdigit() for d in ids):
            raise StdaError(f"devices {devices!r}: use auto, cpu, or GPU ids like 0,1,2")
    if not ids:
        return [None]
    if len(ids) < gpus_per_run:
        raise StdaError(
            f"gpus_per_run {gpus_per_run} but only {len(ids)} GPU(s) ({','.join(ids)}) are available"
        )
    return [",".join(ids[i : i + gpus_per_run]) for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


def read_run_metrics(run_dir: Path) -> dict[str, float]:
    """Test metrics of a finished run (:data:`RUN_METRICS` from ``metrics/test.json``, ``evaluate.save``'s file).

    Explanation numbers the trainer may log there are left out: the benchmark explains every run itself, on
    the same images for every arm (:func:`explain_run`).

    Raises
    ------
    StdaError
        When the run wrote no test metrics.
    """
    import json

    path = run_dir / "metrics" / "test.json"
    if not path.is_file():
        raise StdaError(f"{run_dir} finished without test metrics ({path} missing)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {k: float(raw[k]) for k in RUN_METRICS if isinstance(raw.get(k), (int, float))}


def read_run_log(run_dir: Path) -> list[dict[str, float]]:
    """Per-epoch records of a run's JSON-lines log as ``{epoch, train_loss, val_<metric>...}``."""
    from .fileio import read_jsonl

    records = []
    for r in read_jsonl(run_dir / "log.jsonl"):
        if not isinstance(r.get("epoch"), int) or "train/loss" not in r:
            continue
        rec = {"epoch": r["epoch"], "train_loss": r["train/loss"]}
        rec.update({f"val_{k.split('/', 1)[1]}": v for k, v in r.items() if k.startswith("validation/")})
        records.append(rec)
    return records


def find_heatmap(run_dir: Path) -> Path | None:
    """The heatmap grid the benchmark's explanation of a run wrote (``explain/grid.png``), or None."""
    grid = run_dir / EXPLAIN_DIR / "grid.png"
    return grid if grid.is_file() else None


def explain_run(cfg: BenchmarkConfig, key: RunKey, run_dir: Path) -> dict[str, float | None]:
    """Explain one finished run on its fold's images (``stda explain``); return its ``relevance_*`` numbers.

    Every arm of a fold is explained on the same images (the fold view's ``explain.split``, first ``limit``),
    so the numbers and heatmap grids compare arms directly. Resumes like ``stda explain`` does.
    """
    from .explain import ExplainConfig, run_explain

    view = fold_dir(cfg, key.fold) / "real"
    settings = ExplainConfig(**{**DEFAULT_EXPLAIN, **cfg.explain})
    summary = run_explain(run_dir, run_dir / EXPLAIN_DIR, settings, images=view, overwrite=True)
    return {k: v for k, v in summary.numbers.items() if k.startswith("relevance_")}


def explain_runs(cfg: BenchmarkConfig, table: RunTable) -> None:
    """Add explanation numbers to every finished run (a failure is noted in the row, the run stays done)."""
    from .utils import progress

    if not cfg.explain:
        return
    done = [k for k in sorted(table.rows) if table.rows[k]["status"] == "done"]
    for key in progress(done, desc="explain runs", unit="run"):
        row = dict(table.rows[key])
        try:
            row.update(explain_run(cfg, key, cfg.work_dir / str(row["run_dir"])), error="")
        except Exception as err:  # explanations are extra: a failure is recorded, the run's metrics stand
            logger.warning("explaining %s failed: %s", key.name, err)
            row["error"] = f"explain: {type(err).__name__}: {err}"
        table.record(key, **row)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark: protocol check, folds, runs, report


def check_stage_settings(cfg: BenchmarkConfig) -> None:
    """Build every stage's config from the benchmark's settings now, so a typo fails before hours of work.

    Raises
    ------
    StdaError
        Naming the section (``generate``, ``arms.mix``, ...) and the stage's own complaint.
    """
    from .config import load_config
    from .explain import ExplainConfig
    from .generate import GenerateConfig
    from .label import LabelConfig

    checks: list[tuple[str, type, dict[str, Any], Any]] = [
        ("generate", GenerateConfig, cfg.generate, None),
        ("label", LabelConfig, {**cfg.label, "teacher": "<each fold's teacher>"}, None),
    ]
    if cfg.explain:
        checks.append(("explain", ExplainConfig, {**DEFAULT_EXPLAIN, **cfg.explain}, None))
    if not cfg.train_command:  # train.py's own settings; another trainer may take others
        from .training import TrainConfig, check_config

        checks.append(("teacher", TrainConfig, {**cfg.train, **cfg.teacher}, check_config))
        checks += [(f"arms.{a}", TrainConfig, {**cfg.train, **s}, check_config) for a, s in cfg.arms.items()]
    for where, cls, values, extra_check in checks:
        try:
            built = load_config(cls, None, **values)
            if extra_check is not None:
                extra_check(built)
        except StdaError as err:
            raise StdaError(f"benchmark setting `{where}`: {err}") from None


def protocol_record(cfg: BenchmarkConfig, folds) -> dict[str, Any]:
    """What fixes the meaning of every run (data, folds, stage and training settings) and each arm's settings."""
    from .config import config_to_dict
    from .utils import stable_hash

    plain = config_to_dict(cfg)
    keys = (
        "phantoms",
        "shortcut",
        "folds",
        "fold_seed",
        "val",
        "phash_distance",
        "train",
        "teacher",
        "generate",
        "label",
    )
    protocol = {k: plain[k] for k in keys}
    protocol["real"] = str(Path(cfg.real).resolve()) if cfg.real else ""
    protocol["fold_assignments"] = stable_hash(folds.assignments)
    return {"protocol": protocol, "arms": {a: stable_hash(s) for a, s in plain["arms"].items()}}


def check_protocol(cfg: BenchmarkConfig, folds) -> None:
    """Refuse to add runs to a work folder whose earlier runs used another protocol or other arm settings.

    Seeds and new arms may be added at any time; anything that would make old and new runs incomparable is
    refused, naming the settings that changed.

    Raises
    ------
    StdaError
        Naming the changed settings or arms and what to do.
    """
    import json

    from .fileio import write_json

    path = cfg.work_dir / "protocol.json"
    current = protocol_record(cfg, folds)
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else current
    changed = sorted(k for k in current["protocol"] if saved["protocol"].get(k) != current["protocol"][k])
    if changed:
        raise StdaError(
            f"{cfg.work_dir} holds runs made with other {changed} settings; its runs would not be comparable. "
            "Use another `out` folder (or name), or restore the settings"
        )
    arms = sorted(
        a for a in current["arms"] if saved["arms"].get(a, current["arms"][a]) != current["arms"][a]
    )
    if arms:
        raise StdaError(
            f"arm(s) {arms} changed settings since their runs in {cfg.work_dir}; give the new settings a new arm "
            f"name, or delete {cfg.work_dir / 'runs'}/<arm> and its rows in runs.csv to redo them"
        )
    write_json(path, {"protocol": current["protocol"], "arms": {**saved["arms"], **current["arms"]}})


def prepare_folds(cfg: BenchmarkConfig, folds, sources: dict[str, Path], wanted: list[int]) -> dict[int, Any]:
    """``{fold: dataset folder}`` for each wanted fold, or the error that stopped its preparation."""
    out: dict[int, Any] = {}
    for fold in wanted:
        logger.info("preparing fold %d of %d", fold + 1, cfg.folds)
        try:
            out[fold] = prepare_fold(cfg, folds, fold, sources)
        except Exception as err:  # one broken fold is recorded against its runs; the others go on
            logger.warning(
                "fold %d could not be prepared: %s", fold, err, exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            out[fold] = f"fold {fold} preparation failed: {type(err).__name__}: {err}"
    return out


_ACTIVE: set[int] = set()  # process groups of running training commands, stopped on Ctrl-C


def run_one(cfg: BenchmarkConfig, key: RunKey, dataset: Path, slot: str | None, mode: str) -> dict[str, Any]:
    """Train one run and return its table row values (status, seconds, run_dir, metrics, error)."""
    run_dir = cfg.work_dir / "runs" / key.name
    log = run_dir.parent / f"{run_dir.name}.log"
    if mode == "overwrite":
        import shutil

        log.unlink(missing_ok=True)
        shutil.rmtree(run_dir / EXPLAIN_DIR, ignore_errors=True)
    settings = {**cfg.train, **cfg.arms[key.arm], "seed": key.seed, "dataset": str(dataset)}
    argv = train_argv(cfg, settings, run_dir, mode)
    ok, error, seconds = run_command(argv, log, slot, cfg.run_timeout, cfg.cpu_threads)
    metrics: dict[str, float] = {}
    if ok:
        try:
            metrics = read_run_metrics(run_dir)
        except StdaError as err:
            ok, error = False, str(err)
    values = {
        "seconds": round(seconds, 1),
        "run_dir": str(Path("runs") / key.name),
        **metrics,
        "error": error,
    }
    return {"status": "done" if ok else "failed", **values}


def execute_runs(cfg: BenchmarkConfig, table: RunTable, todo: list[RunKey], datasets: dict[int, Any]) -> None:
    """Run ``todo`` (serially on the CPU, one run per GPU slot otherwise), recording each as it ends."""
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from queue import Queue

    from .utils import progress

    lock = threading.Lock()
    for key in (k for k in todo if not isinstance(datasets.get(k.fold), Path)):
        table.record(key, "failed", error=datasets.get(key.fold, "fold not prepared"))
    ready = [k for k in todo if isinstance(datasets.get(k.fold), Path)]
    slots = device_slots(cfg.devices, cfg.gpus_per_run)
    free: Queue = Queue()
    for slot in slots:
        free.put(slot)

    def work(key: RunKey) -> dict[str, Any]:
        slot = free.get()
        try:
            with lock:
                mode = "resume" if table.status(key) == "running" else "overwrite"
                table.record(key, "running", run_dir=str(Path("runs") / key.name))
            return run_one(cfg, key, datasets[key.fold], slot, mode)
        finally:
            free.put(slot)

    bar = progress(total=len(ready), desc="benchmark runs", unit="run")
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = {pool.submit(work, key): key for key in ready}
        try:
            for future in as_completed(futures):
                key, row = futures[future], future.result()
                with lock:
                    table.record(key, **row)
                bar.set_postfix_str(f"{key.name}: {row['status']}")
                bar.update()
        except BaseException:  # Ctrl-C: stop every run; their rows stay "running" and resume next time
            pool.shutdown(wait=False, cancel_futures=True)
            for pgid in list(_ACTIVE):
                stop_group(pgid)
            raise
        finally:
            bar.close()


def run_benchmark(cfg: BenchmarkConfig, config_path: str = "", report_only: bool = False) -> Path:
    """Run (or resume, or extend) the benchmark and write its report; return the report's path.

    Parameters
    ----------
    cfg : BenchmarkConfig
        The protocol, arms and settings.
    config_path : str
        The YAML file ``cfg`` came from, quoted in the report's reproduce line.
    report_only : bool
        Only re-render the report from the runs already recorded.

    Raises
    ------
    StdaError
        Bad settings, unusable data, or a work folder holding runs of another protocol. A failing run or fold
        is recorded in the table, not raised.
    """
    from .config import dump_config
    from .split import make_folds

    if not report_only:
        check_stage_settings(cfg)
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        if cfg.cpu_threads > 0:
            import torch

            torch.set_num_threads(cfg.cpu_threads)
        sources = prepare_sources(cfg)
        folds = make_folds(sources["test"], cfg.folds, cfg.fold_seed, cfg.val, cfg.phash_distance)
        check_protocol(cfg, folds)
        dump_config(cfg, cfg.work_dir / "benchmark.yaml")
        table = RunTable.load(cfg.work_dir / "runs.csv")
        todo = table.todo(plan_runs(cfg), cfg.retry_failed)
        logger.info("%d of %d runs to do", len(todo), len(plan_runs(cfg)))
        datasets = prepare_folds(cfg, folds, sources, sorted({k.fold for k in todo}))
        execute_runs(cfg, table, todo, datasets)
        explain_runs(cfg, table)
    return write_report(cfg, config_path)


def write_report(cfg: BenchmarkConfig, config_path: str = "") -> Path:
    """Render ``report.md``, ``runs.csv``, ``stats.json`` and the plots into the report folder.

    A hand-written ``reading.md`` in the report folder is kept and quoted under "Reading".

    Raises
    ------
    StdaError
        When the work folder has no run table yet.
    """
    table_path = cfg.work_dir / "runs.csv"
    if not table_path.is_file():
        raise StdaError(f"{table_path} not found: no runs yet; run the benchmark without --report-only first")
    table = RunTable.load(table_path)
    rows = list(table.rows.values())
    arms = list(dict.fromkeys([*cfg.arms, *(r["arm"] for r in rows)]))
    stats = compute_stats(rows, arms, cfg.baseline, report_explanations(cfg))
    out = cfg.report_dir
    plots = render_plots(cfg, table, stats, out)
    reading = (out / "reading.md").read_text(encoding="utf-8") if (out / "reading.md").is_file() else ""
    failed = [r for r in rows if r["status"] == "failed"]
    text = render_report(cfg, stats, read_fold_info(cfg), failed, plots, reading, config_path)
    write_text(out / "runs.csv", table.to_csv())
    _write_stats_json(out / "stats.json", stats)
    write_text(out / "report.md", text)
    return out / "report.md"


def report_explanations(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """Explanation numbers the report shows: lesion and artifacts, plus the planted shortcut's own share."""
    if cfg.shortcut:
        return (*EXPLANATION_METRICS, f"relevance_on_{cfg.shortcut['artifact']}")
    return EXPLANATION_METRICS


def read_fold_info(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """The ``fold.json`` of each prepared fold (counts, synthetic images), in fold order."""
    import json

    paths = [fold_dir(cfg, f) / "fold.json" for f in range(cfg.folds)]
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths if p.is_file()]


def render_plots(cfg: BenchmarkConfig, table: RunTable, stats: BenchmarkStats, out: Path) -> dict[str, str]:
    """Write the plots the finished runs allow; return ``{title: file name}`` for the report."""
    rows = list(table.rows.values())
    plots: dict[str, str] = {}
    metrics = [*stats.metrics, *stats.explanation_metrics]
    if metrics:
        plot_boxplots(rows, stats.arms, metrics, out / "boxplots.png")
        plots["Box plots per metric (each point a run)"] = "boxplots.png"
    done = {k: r for k, r in table.rows.items() if r["status"] == "done"}
    logs = {k: read_run_log(cfg.work_dir / str(r["run_dir"])) for k, r in done.items()}
    if any(logs.values()):
        plot_learning_curves(logs, stats.arms, cfg.curve_metric, out / "learning_curves.png")
        plots["Learning curves (each line a run)"] = "learning_curves.png"
    pair = heatmap_pair(cfg, done, stats.arms)
    if pair:
        (fold, seed), images = pair
        split = {**DEFAULT_EXPLAIN, **cfg.explain}["split"]
        plot_heatmaps(
            images, out / "heatmaps.png", f"fold {fold}, seed {seed}: the same {split} images, per arm"
        )
        plots["Heatmaps of the same images, per arm"] = "heatmaps.png"
    return plots


def heatmap_pair(cfg: BenchmarkConfig, done: dict[RunKey, dict], arms: list[str]):
    """The first (fold, seed) where every arm finished and wrote heatmaps: ``((fold, seed), {arm: png})``."""
    for fold, seed in sorted({(k.fold, k.seed) for k in done}):
        images = {}
        for arm in arms:
            key = RunKey(fold, seed, arm)
            found = find_heatmap(cfg.work_dir / str(done[key]["run_dir"])) if key in done else None
            if found is not None:
                images[arm] = found
        if len(images) == len(arms):
            return (fold, seed), images
    return None


def _write_stats_json(path: Path, stats: BenchmarkStats) -> None:
    from dataclasses import asdict

    from .fileio import write_json

    def clean(x: Any) -> Any:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    write_json(
        path,
        {
            "baseline": stats.baseline,
            "runs": {"done": stats.n_done, "failed": stats.n_failed},
            "summaries": [{k: clean(v) for k, v in asdict(s).items()} for s in stats.summaries.values()],
            "tests": [{k: clean(v) for k, v in asdict(t).items()} for t in stats.tests],
        },
    )
