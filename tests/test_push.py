"""stda push against a local Hub-protocol server: what arrives, retries, resume after a failure, token secrecy.

The client always runs in a fresh Python with ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1`` set before
``huggingface_hub`` is imported; the server (tests/hub_server.py) runs in this process on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_server import HubServer
from test_package import write_synthetic

from stda_hf.dataset.packaging import PackageConfig, package

TOKEN = "hf_stdaPushTestToken0123456789"
REPO_ID = "stda/skin-lesions"
PUSH = """
import sys
from stda_hf import cli
cli.COMMANDS = [cli._add_push]  # parse `push` only: building the other subcommands imports torch (slow)
sys.exit(cli.main(["push", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def packaged(phantom_real_session, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("push")
    synthetic = write_synthetic(phantom_real_session, tmp / "synthetic")
    package(phantom_real_session, tmp / "hub", synthetic=synthetic)
    return tmp / "hub"


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as state:
        yield state


def run_push(
    folder: Path, hub, home: Path, *args: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    """``stda push FOLDER ARGS`` in a fresh Python pointed at the local Hub, with ``HF_HOME`` isolated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-c", PUSH, str(folder), "--repo-id", REPO_ID, "--retry-wait", "0", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_push_uploads_every_file_and_parquet_goes_through_lfs(packaged, hub, tmp_path):
    proc = run_push(packaged, hub, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert hub.files(REPO_ID) == local_files(packaged)
    shards = [p for p in local_files(packaged) if p.endswith(".parquet")]
    assert {hashlib.sha256((packaged / p).read_bytes()).hexdigest() for p in shards} <= set(hub.lfs)
    assert not hub.repos[f"datasets/{REPO_ID}"].private
    assert f"uploaded {len(local_files(packaged))} files" in proc.stdout


def test_push_creates_a_private_repo_and_the_branch_asked_for(packaged, hub, tmp_path):
    proc = run_push(packaged, hub, tmp_path / "home", "--private", "--revision", "v1")
    assert proc.returncode == 0, proc.stderr
    assert hub.repos[f"datasets/{REPO_ID}"].private
    assert hub.files(REPO_ID, branch="v1") == local_files(packaged)
    assert hub.files(REPO_ID, branch="main") == {}


def test_a_failed_commit_is_retried_without_uploading_files_again(packaged, hub, tmp_path):
    hub.fail["commit"] = 1
    proc = run_push(packaged, hub, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert sum(kind == "commit" for kind, _, _ in hub.requests) == 2
    assert hub.files(REPO_ID) == local_files(packaged)
    assert set(hub.lfs_puts.values()) == {1}


def test_a_failed_lfs_upload_is_retried(packaged, hub, tmp_path):
    hub.fail["lfs_put"] = 1
    proc = run_push(packaged, hub, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert hub.files(REPO_ID) == local_files(packaged)


def test_a_push_that_fails_midway_then_reruns_leaves_a_complete_repo(packaged, hub, tmp_path):
    hub.fail["commit"] = 3
    failed = run_push(packaged, hub, tmp_path / "home", "--retries", "2")
    assert failed.returncode == 2
    assert "re-run the same command" in failed.stderr
    assert hub.files(REPO_ID) == {}  # nothing half-committed
    uploaded = dict(hub.lfs_puts)
    assert uploaded  # the LFS objects reached the server before the commit failed
    hub.fail["commit"] = 0
    rerun = run_push(packaged, hub, tmp_path / "home")
    assert rerun.returncode == 0, rerun.stderr
    assert hub.files(REPO_ID) == local_files(packaged)
    assert dict(hub.lfs_puts) == uploaded  # nothing was uploaded twice


def test_pushing_a_rebuilt_package_removes_stale_shards(phantom_real, hub, tmp_path):
    package(phantom_real, tmp_path / "hub", cfg=PackageConfig(max_shard_rows=10))
    assert run_push(tmp_path / "hub", hub, tmp_path / "home").returncode == 0
    package(phantom_real, tmp_path / "hub")
    proc = run_push(tmp_path / "hub", hub, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert hub.files(REPO_ID) == local_files(tmp_path / "hub")


def test_the_token_appears_in_no_output_error_or_file(packaged, hub, tmp_path):
    ok = run_push(packaged, hub, tmp_path / "home")
    wrong = "hf_wrongTokenForThisTest987654"
    refused = run_push(packaged, hub, tmp_path / "home", token=wrong)
    assert ok.returncode == 0 and refused.returncode == 2
    assert "refused the token" in refused.stderr and "hf auth login" in refused.stderr
    for secret in (TOKEN, wrong):
        for text in (ok.stdout, ok.stderr, refused.stdout, refused.stderr):
            assert secret not in text
        for root in (packaged, tmp_path):
            assert all(secret.encode() not in data for data in local_files(root).values())
        assert all(secret.encode() not in data for data in hub.files(REPO_ID).values())


def test_dry_run_lists_files_and_sizes_without_contacting_the_hub(packaged, hub, tmp_path):
    proc = run_push(packaged, hub, tmp_path / "home", "--dry-run", token=None)
    assert proc.returncode == 0, proc.stderr
    for path, data in local_files(packaged).items():
        assert f"{len(data):>14,d}  {path}" in proc.stdout
    assert "dry run: would upload" in proc.stdout
    assert hub.requests == []


def test_push_without_a_token_says_how_to_log_in(packaged, hub, tmp_path):
    proc = run_push(packaged, hub, tmp_path / "home", token=None)
    assert proc.returncode == 2
    assert "hf auth login" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert hub.requests == []


def test_push_refuses_a_folder_that_is_not_a_finished_package(packaged, hub, tmp_path):
    not_package = tmp_path / "notes"
    not_package.mkdir()
    proc = run_push(not_package, hub, tmp_path / "home")
    assert proc.returncode == 2 and "run `stda package`" in proc.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "data").mkdir()
    (unfinished / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    (unfinished / "README.md").write_text("---\n---\n")
    (unfinished / ".stda-package").mkdir()
    proc = run_push(unfinished, hub, tmp_path / "home")
    assert proc.returncode == 2 and "unfinished" in proc.stderr
    assert hub.requests == []


def test_an_unreachable_hub_fails_after_the_retries_with_a_clear_error(packaged, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = SimpleNamespace(url=f"http://127.0.0.1:{s.getsockname()[1]}")
    proc = run_push(packaged, closed, tmp_path / "home", "--retries", "2")
    assert proc.returncode == 2
    assert "push attempt 1/2 failed" in proc.stderr
    assert "failed after 2 attempt(s)" in proc.stderr and "re-run the same command" in proc.stderr
