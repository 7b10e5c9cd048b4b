"""Helpers for tests that run ``stda generate`` in a subprocess: flags from settings, and a kill mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from stda_hf.core.fileio import read_jsonl


def cli_flags(settings: dict) -> list[str]:
    """``--name value`` for each setting (tuples become several values)."""
    out = []
    for key, value in settings.items():
        out += [
            f"--{key.replace('_', '-')}",
            *(map(str, value) if isinstance(value, tuple) else [str(value)]),
        ]
    return out


def subprocess_env() -> dict[str, str]:
    """The environment of a generate subprocess: no progress bars, one thread."""
    return {**os.environ, "STDA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def manifest_lines(path: Path) -> int:
    """Finished images listed in a manifest (0 while it does not exist)."""
    return len(read_jsonl(path)) if path.exists() else 0


def kill_after_first_image(cmd: list[str], out: Path, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``out/manifest.jsonl`` lists an image (as a crash would)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while manifest_lines(out / "manifest.jsonl") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
