"""The ST-DA benchmark: baseline vs style-transfer augmentation over folds x seeds, as one command.

    python benchmarks/stda_benchmark.py --config benchmarks/configs/phantoms-small.yaml
    stda benchmark --config benchmarks/configs/phantoms-small.yaml          # the same command

Re-running the same command resumes an interrupted benchmark; adding seeds or arms to the config adds runs
to it. ``--report-only`` re-renders the report from the runs recorded so far. Every setting of the config can
be overridden by a flag (``--folds 5``, ``--seeds 0 1 2``, ``--devices 0,1``); see ``--help``. This script is
an entry point kept for existing commands: it runs ``stda benchmark`` (:mod:`stda_hf.benchmark`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stda_hf.cli import main as stda


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stda benchmark`` with ``argv``; 0 when the report is written, 2 on bad input, 130 when interrupted."""
    return stda(["benchmark", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
