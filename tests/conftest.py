"""Shared fixtures: tiny phantom folders (32-64 px) so every test runs the real code paths in seconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

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


TINY_VGG8 = {
    "image_size": 32,
    "vgg8_widths": (8, 16, 16, 32, 32),
    "vgg8_hidden": (32, 32),
    "batch_size": 16,
    "num_workers": 0,
    "lr": 3e-3,
    "early_stopping": 0,
}
"""The one tiny VGG8 training recipe of the tests (TrainConfig settings): seconds per epoch on 32 px phantoms."""


def tiny_train_flags(**overrides) -> list[str]:
    """:data:`TINY_VGG8` (with ``overrides``) as train.py flags, in the documented hyphen spelling."""
    flags: list[str] = []
    for key, value in {**TINY_VGG8, **overrides}.items():
        flags.append("--" + key.replace("_", "-"))
        flags += [str(v) for v in value] if isinstance(value, (tuple, list)) else [str(value)]
    return flags


def _write_synthetic(real_root: Path, out: Path, n: int = 24) -> Path:
    """A synthetic folder by the contract (manifest, labels, source.json): blends of benign and malignant
    training images stand in for style transfer, with pseudo-label confidences from 0.55 to 1."""
    from stda_hf.core.fileio import append_jsonl, write_json
    from stda_hf.data.images import load_image, save_image
    from stda_hf.data.real import read_real_folder

    real = read_real_folder(real_root)
    benign, malignant = real.subset("train", "benign"), real.subset("train", "malignant")
    for i in range(n):
        content, style = benign[i % len(benign)], malignant[(3 * i) % len(malignant)]
        syn_id = "syn_" + hashlib.sha256(f"{content.isic_id}/{style.isic_id}/{i}".encode()).hexdigest()[:16]
        image = Image.blend(load_image(content.path), load_image(style.path), 0.5)
        save_image(image, out / "images" / f"{syn_id}.jpg")
        append_jsonl(
            out / "manifest.jsonl",
            {
                "id": syn_id, "file": f"images/{syn_id}.jpg", "content_id": content.isic_id,
                "style_id": style.isic_id, "seed": i, "params_hash": "test", "content_loss": 1.0,
                "style_loss": 1.0, "seconds": 0.1, "size": image.width,
                "content_license": content.copyright_license, "content_attribution": content.attribution,
                "style_license": style.copyright_license, "style_attribution": style.attribution,
            },
        )  # fmt: skip
        confidence = 0.55 + 0.15 * (i % 4)
        label = "malignant" if i % 3 else "benign"
        probs = [1 - confidence, confidence] if label == "malignant" else [confidence, 1 - confidence]
        append_jsonl(
            out / "labels.jsonl",
            {"id": syn_id, "label": label, "probs": probs, "confidence": confidence, "entropy": 0.5,
             "teacher": "test-teacher"},
        )  # fmt: skip
    digest = hashlib.sha256((real_root / "splits.csv").read_bytes()).hexdigest()
    write_json(out / "source.json", {"real": str(real_root), "splits_sha256": digest})
    return out


@pytest.fixture(scope="session")
def phantom_hub(tmp_path_factory) -> Path:
    """96 phantoms at 32 px, split, 24 synthetic images, packaged by `stda package` (read-only)."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits
    from stda_hf.dataset.packaging import package

    base = tmp_path_factory.mktemp("train-data")
    make_phantoms(base / "real", PhantomConfig(n=96, size=32, seed=0))
    make_splits(base / "real", SplitConfig(seed=0))
    synthetic = _write_synthetic(base / "real", base / "synthetic")
    package(base / "real", base / "hub", synthetic=synthetic)
    return base / "hub"


@pytest.fixture(scope="session")
def phantom_hub_real(phantom_hub) -> Path:
    """The same real images packaged without synthetic ones (no synthetic split)."""
    from stda_hf.dataset.packaging import package

    package(phantom_hub.parent / "real", phantom_hub.parent / "hub-real")
    return phantom_hub.parent / "hub-real"
