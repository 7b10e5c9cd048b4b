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
seed-to-seed spread as the repeatability figure, and tests against the baseline with the fold as the unit:
seeds averaged within a fold, a t-test over fold means with the exact sign-flip test beside it, the corrected
repeated k-fold t-test for several ``fold_seeds``, one primary endpoint and Holm over the secondaries) and the Markdown report with its plots are
pure functions of that table and the runs' folders.

    stda benchmark --config benchmarks/configs/phantoms-small.yaml
    python benchmarks/stda_benchmark.py --config benchmarks/configs/phantoms-small.yaml   # the same

One module per job: :mod:`.config` (settings and the run plan), :mod:`.table` (``runs.csv``), :mod:`.stats`,
:mod:`.report` (Markdown) and :mod:`.plots`, :mod:`.data` (phantoms and the per-fold views), :mod:`.stages`
(teacher, synthetic set, labels, dataset and explanations per fold: the stages it orchestrates), :mod:`.runs`
(training subprocesses and their scheduling) and :mod:`.runner` (:func:`run_benchmark`, tying them together).
Their public names are re-exported here.
"""

from __future__ import annotations

from stda_hf.benchmark.config import (
    ALPHA,
    AREA_METRICS,
    DEFAULT_ARMS,
    DEFAULT_EXPLAIN,
    EXPLAIN_DIR,
    EXPLANATION_METRICS,
    METRIC_TITLES,
    METRICS,
    RUN_COLUMNS,
    RUN_METRICS,
    SPLIT_ORDER,
    STATUSES,
    BenchmarkConfig,
    RunKey,
    arm_uses_synthetic,
    fold_dir,
    needs_synthetic,
    plan_runs,
    recipe_settings,
    synthetic_recipe,
    train_settings,
)
from stda_hf.benchmark.data import (
    check_fold_synthetic,
    prepare_sources,
    shortcut_phantom_settings,
    write_fold_view,
)
from stda_hf.benchmark.plots import plot_boxplots, plot_heatmaps, plot_learning_curves
from stda_hf.benchmark.report import (
    caveats,
    primary_line,
    render_report,
    repeatability_table,
    results_table,
    tests_table,
    unit_of_analysis,
)
from stda_hf.benchmark.runner import (
    check_protocol,
    check_stage_settings,
    check_thresholds,
    heatmap_pair,
    protocol_record,
    read_fold_info,
    render_plots,
    report_explanations,
    run_benchmark,
    write_report,
)
from stda_hf.benchmark.runs import (
    dataset_of,
    default_train_command,
    device_slots,
    execute_runs,
    find_heatmap,
    last_error_line,
    read_run_log,
    read_run_metrics,
    run_command,
    run_one,
    stop_group,
    train_argv,
)
from stda_hf.benchmark.stages import (
    explain_run,
    explain_runs,
    label_by_style_source,
    make_synthetic,
    prepare_fold,
    prepare_folds,
    shortcut_labels,
    train_teacher,
)
from stda_hf.benchmark.stats import (
    ArmSummary,
    BenchmarkStats,
    FoldTest,
    adjust,
    compute_stats,
    corrected_t,
    equal_spread_band,
    exact_wilcoxon,
    fold_differences,
    fold_test,
    holm,
    seed_spread,
    sign_flip_p,
    summarize_arm,
    values_by_pair,
)
from stda_hf.benchmark.table import RunTable

__all__ = [
    "ALPHA",
    "AREA_METRICS",
    "DEFAULT_ARMS",
    "DEFAULT_EXPLAIN",
    "EXPLAIN_DIR",
    "EXPLANATION_METRICS",
    "METRICS",
    "METRIC_TITLES",
    "RUN_COLUMNS",
    "RUN_METRICS",
    "SPLIT_ORDER",
    "STATUSES",
    "ArmSummary",
    "BenchmarkConfig",
    "BenchmarkStats",
    "FoldTest",
    "RunKey",
    "RunTable",
    "adjust",
    "arm_uses_synthetic",
    "caveats",
    "check_fold_synthetic",
    "check_protocol",
    "check_stage_settings",
    "check_thresholds",
    "compute_stats",
    "corrected_t",
    "dataset_of",
    "default_train_command",
    "device_slots",
    "equal_spread_band",
    "exact_wilcoxon",
    "execute_runs",
    "explain_run",
    "explain_runs",
    "find_heatmap",
    "fold_differences",
    "fold_dir",
    "fold_test",
    "heatmap_pair",
    "holm",
    "label_by_style_source",
    "last_error_line",
    "make_synthetic",
    "needs_synthetic",
    "plan_runs",
    "plot_boxplots",
    "plot_heatmaps",
    "plot_learning_curves",
    "prepare_fold",
    "prepare_folds",
    "prepare_sources",
    "primary_line",
    "protocol_record",
    "read_fold_info",
    "read_run_log",
    "read_run_metrics",
    "recipe_settings",
    "render_plots",
    "render_report",
    "repeatability_table",
    "report_explanations",
    "results_table",
    "run_benchmark",
    "run_command",
    "run_one",
    "seed_spread",
    "shortcut_labels",
    "shortcut_phantom_settings",
    "sign_flip_p",
    "stop_group",
    "summarize_arm",
    "synthetic_recipe",
    "tests_table",
    "train_argv",
    "train_settings",
    "train_teacher",
    "unit_of_analysis",
    "values_by_pair",
    "write_fold_view",
    "write_report",
]
