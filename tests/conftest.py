"""Shared fixtures: tiny phantom folders (32-64 px) so every test runs the real code paths in seconds."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

os.environ.setdefault("STDA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: tests run tiny tensors, several processes share two cores, and torch's
# thread pools fighting over them made training steps ~10x slower here. Set before anything imports torch.
# This is the one place tests choose threads; subprocesses inherit it, so in-process and subprocess runs
# compute the same arithmetic.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT ignored,
# and so would every process the tests start, which then cannot be stopped as a user's Ctrl-C stops them (the
# Ctrl-C tests of fetch and the benchmark). A handled signal is reset to the default in a child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def phantom_real_session(tmp_path_factory) -> Path:
    """A split phantom folder (60 images, 32 px), built once per session. Do not modify: copy it."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits

    root = tmp_path_factory.mktemp("phantoms") / "real"
    make_phantoms(root, PhantomConfig(n=60, size=32, seed=0))
    make_splits(root, SplitConfig(seed=0))
    return root


@pytest.fixture
def phantom_real(phantom_real_session, tmp_path) -> Path:
    """A private copy of the split phantom folder that a test may change."""
    dst = tmp_path / "real"
    shutil.copytree(phantom_real_session, dst)
    return dst
