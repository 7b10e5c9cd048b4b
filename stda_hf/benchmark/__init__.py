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
The public face is :class:`BenchmarkConfig` and :func:`run_benchmark`;
the rest is imported from its module.
"""

from __future__ import annotations

from stda_hf.benchmark.config import BenchmarkConfig
from stda_hf.benchmark.runner import run_benchmark

__all__ = ["BenchmarkConfig", "run_benchmark"]
