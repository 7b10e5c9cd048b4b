"""The ST-DA benchmark: baseline vs style-transfer augmentation over folds x seeds, as one command.

    python benchmarks/stda_benchmark.py --config benchmarks/configs/phantoms-small.yaml

Re-running the same command resumes an interrupted benchmark; adding seeds or arms to the config adds runs
to it. ``--report-only`` re-renders the report from the runs recorded so far. Every setting of the config can
be overridden by a flag (``--folds 5``, ``--seeds 0 1 2``, ``--devices 0,1``); see ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from stda_hf.benchmark import BenchmarkConfig, run_benchmark
from stda_hf.config import add_config_flags, config_from_args
from stda_hf.errors import run_reporting_errors
from stda_hf.utils import setup_logging


def get_args_parser() -> argparse.ArgumentParser:
    """Flags: ``--config`` plus one flag per scalar setting of :class:`BenchmarkConfig`."""
    parser = argparse.ArgumentParser(
        prog="stda_benchmark.py",
        description="Baseline vs ST-DA over grouped k folds x seeds: runs, statistics and a Markdown report.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="benchmark YAML (benchmarks/configs/*.yaml)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only re-render the report from recorded runs"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_config_flags(parser, BenchmarkConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when the report is written, 2 on bad input, 130 when interrupted."""
    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)

    def benchmark() -> None:
        cfg = config_from_args(BenchmarkConfig, args)
        print(f"report: {run_benchmark(cfg, str(args.config or ''), report_only=args.report_only)}")

    return run_reporting_errors("stda_benchmark", benchmark, args.debug)


if __name__ == "__main__":
    sys.exit(main())
