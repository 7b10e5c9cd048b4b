"""load_dataset("stda/skin-lesions") by repo id: the packaged folder served as a git repo by the olah mirror.

olah runs in a subprocess on a free 127.0.0.1 port with ``offline = true`` and ``mirrors-path`` pointing at a
folder holding ``datasets/stda/skin-lesions`` (a git repository on branch ``main``). The loading runs in a
fresh Python with ``HF_ENDPOINT`` set before ``datasets`` is imported and the offline switches of the test
session removed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_package import write_synthetic

from dataset_script import FEATURES
from stda_hf.fileio import read_jsonl
from stda_hf.package import package

REPO_ID = "stda/skin-lesions"
LOADER = """
import json, sys
import datasets
mode = sys.argv[1]
if mode == "full":
    ds = datasets.load_dataset("stda/skin-lesions")
    row = ds["synthetic"][0]
    out = {
        "rows": {k: v.num_rows for k, v in ds.items()},
        "features": ds["train"].features.to_dict(),
        "first_synthetic": [row["isic_id"], row["content_isic_id"], row["image"].size],
    }
else:
    stream = datasets.load_dataset("stda/skin-lesions", split="synthetic", streaming=True)
    rows = list(stream)
    out = {
        "kind": type(stream).__name__,
        "features": stream.features.to_dict(),
        "ids": [r["isic_id"] for r in rows],
        "labels": [r["label"] for r in rows],
        "sizes": [list(r["image"].size) for r in rows],
    }
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_repo(folder: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@127.0.0.1"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@127.0.0.1")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "stda package"]):
        subprocess.run(["git", *cmd], cwd=folder, env=env, check=True)


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"olah exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/datasets/{REPO_ID}/revision/main", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"olah did not answer on {url} within {timeout}s")


@pytest.fixture(scope="module")
def mirror(phantom_real_session, tmp_path_factory):
    """The packaged folder (real + synthetic) served by olah; yields the endpoint URL and the synthetic folder."""
    tmp = tmp_path_factory.mktemp("olah")
    synthetic = write_synthetic(phantom_real_session, tmp / "synthetic")
    repo = tmp / "mirrors" / "datasets" / REPO_ID
    package(phantom_real_session, tmp / "hub", synthetic=synthetic)
    shutil.copytree(tmp / "hub", repo)
    git_repo(repo)
    port = free_port()
    config = tmp / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp / "repos"}"\n'
        f'mirrors-path = ["{tmp / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    olah = Path(sys.executable).with_name("olah-cli")
    proc = subprocess.Popen(
        [str(olah), "-c", str(config), "--log-path", str(tmp / "logs")],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)
        yield {"url": url, "synthetic": synthetic, "home": tmp / "hf-home"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load_by_repo_id(mirror: dict, mode: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=mirror["url"], HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_load_dataset_by_repo_id_through_the_mirror(mirror, phantom_real_session, tmp_path):
    result = load_by_repo_id(mirror, "full", tmp_path / "hf-home")
    manifest = read_jsonl(mirror["synthetic"] / "manifest.jsonl")
    splits = (phantom_real_session / "splits.csv").read_text().splitlines()[1:]
    count = {s: sum(line.split(",")[1] == s for line in splits) for s in ("train", "validation", "test")}
    expected = {"train": count["train"], "synthetic": len(manifest), "validation": count["validation"]}
    expected["test"] = count["test"]
    assert list(result["rows"].items()) == list(expected.items())
    assert result["features"] == FEATURES.to_dict()
    first = min(manifest, key=lambda r: r["id"])
    assert result["first_synthetic"] == [first["id"], first["content_id"], [32, 32]]


def test_streaming_by_repo_id_through_the_mirror(mirror, tmp_path):
    result = load_by_repo_id(mirror, "stream", tmp_path / "hf-home")
    labels = {r["id"]: r["label"] for r in read_jsonl(mirror["synthetic"] / "labels.jsonl")}
    assert result["kind"] == "IterableDataset"
    assert result["features"] == FEATURES.to_dict()
    assert result["ids"] == sorted(labels)
    assert [["benign", "malignant"][i] for i in result["labels"]] == [labels[i] for i in sorted(labels)]
    assert result["sizes"] == [[32, 32]] * len(labels)
