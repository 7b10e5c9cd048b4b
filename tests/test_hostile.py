"""Hostile input against every ``stda`` subcommand it applies to, each run as a user runs it.

Every case runs ``python -m stda_hf ...`` in a subprocess and asserts one line on stderr with exit status 2 (or
the stated report), that nothing was written outside ``--out`` and that no input lost a byte. Read-only
folders are real read-only bind mounts (``unshare -m`` + ``mount -o remount,bind,ro``), since root ignores
file permissions; the cases skip where the kernel refuses a mount namespace.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "http://127.0.0.1:9/api/v2/"  # fetch cases must fail before any request; nothing listens here


def stda(*args: object, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``stda`` in a subprocess from ``cwd``, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STDA_NO_PROGRESS": "1"}
    command = [*prefix, sys.executable, "-m", "stda_hf", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def refused(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Assert exit status 2 with exactly one line on stderr, from ``stda <command>``, holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"stda {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file under ``folder`` (but not under ``skip``) with its bytes: "nothing written, nothing lost"."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (skip is None or skip not in (p, *p.parents))
    }


@pytest.fixture(scope="module")
def real_session(tmp_path_factory) -> Path:
    """A split phantom folder of 30 images at 32 px, built once for this module. Copy it to change it."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits

    root = tmp_path_factory.mktemp("hostile") / "real"
    make_phantoms(root, PhantomConfig(n=30, size=32, seed=0))
    make_splits(root, SplitConfig(seed=0))
    return root


@pytest.fixture
def work(tmp_path, real_session) -> Path:
    """A working folder (the command's cwd) holding a private copy of the real folder as ``real``."""
    shutil.copytree(real_session, tmp_path / "real")
    return tmp_path


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A prefix that runs a command with one folder mounted read-only (skips where mounts are not allowed)."""
    probe = tmp_path_factory.mktemp("probe")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    test = subprocess.run(["unshare", "-m", "sh", "-c", script, str(probe), "touch", str(probe / "x")], text=True, capture_output=True)  # fmt: skip
    if shutil.which("unshare") is None or test.returncode == 0 or "Read-only" not in test.stderr:
        pytest.skip("no read-only bind mounts here (needs root and a mount namespace)")
    return lambda folder: ("unshare", "-m", "sh", "-c", script, str(folder))


# ----------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written


READ_ONLY_CASES = {
    "phantoms": ("phantoms", "--out", "ro/real", "--n", "2", "--size", "32"),
    "generate": ("generate", "real", "--out", "ro/syn", "--size", "32"),
    "package": ("package", "real", "--out", "ro/hub"),
    "fetch": ("fetch", "--out", "ro/isic", "--api-url", NOWHERE),
}


@pytest.mark.parametrize("command", sorted(READ_ONLY_CASES))
def test_an_output_on_a_read_only_file_system_is_one_line(command, work, read_only):
    (work / "ro").mkdir()
    before = snapshot(work)
    proc = stda(*READ_ONLY_CASES[command], cwd=work, prefix=read_only(work / "ro"))
    refused(proc, command, "ro", "read-only")
    assert snapshot(work) == before


def test_split_of_a_read_only_real_folder_is_one_line_before_any_work(work, read_only):
    before = snapshot(work)
    refused(stda("split", "real", cwd=work, prefix=read_only(work / "real")), "split", "real", "read-only")
    assert snapshot(work) == before


UNDER_A_FILE_CASES = {
    "phantoms": ("phantoms", "--out", "afile/real", "--n", "2", "--size", "32"),
    "generate": ("generate", "real", "--out", "afile/syn", "--size", "32"),
    "package": ("package", "real", "--out", "afile/hub"),
}


@pytest.mark.parametrize("command", sorted(UNDER_A_FILE_CASES))
def test_an_output_under_a_regular_file_is_one_line(command, work):
    (work / "afile").write_text("not a folder")
    before = snapshot(work)
    refused(stda(*UNDER_A_FILE_CASES[command], cwd=work), command, "afile")
    assert snapshot(work) == before


# ----------------------------------------------------------------------------------------------------------------
# Config files


WRONG_TYPES = {
    "phantoms": (("phantoms", "--out", "o"), "size: abc\n", "setting size in cfg.yaml: 'abc' is not an integer"),
    "phantoms-null": (("phantoms", "--out", "o"), "size: null\n", "setting size in cfg.yaml: None is not an integer"),
    "split": (("split", "real"), "val: abc\n", "setting val in cfg.yaml: 'abc' is not a number"),
    "generate": (("generate", "real", "--out", "o"), "iterations: ten\n", "setting iterations in cfg.yaml: 'ten'"),
    "fetch": (("fetch", "--out", "o", "--api-url", NOWHERE), "limit: many\n", "setting limit in cfg.yaml: 'many'"),
    "package": (("package", "real", "--out", "o"), "max_shard_rows: x\n", "setting max_shard_rows in cfg.yaml"),
    "label": (("label", "o"), "batch_size: [1, 2]\n", "setting batch_size in cfg.yaml: [1, 2] is not an integer"),
    "push": (("push", "o"), "private: maybe\n", "setting private in cfg.yaml: 'maybe' is not true or false"),
    "explain": (("explain", "--model", "m", "--images", "real", "--out", "o"), "grid: 2.5\n", "setting grid"),
    "benchmark": (("benchmark",), "seeds: [a]\n", "setting seeds in cfg.yaml: ['a'] is not a list of values"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_config_value_of_the_wrong_type_names_the_setting_and_value(case, work):
    args, text, needle = WRONG_TYPES[case]
    (work / "cfg.yaml").write_text(text)
    before = snapshot(work)
    refused(stda(*args, "--config", "cfg.yaml", cwd=work), args[0], needle)
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["phantoms", "split", "fetch"])
def test_a_binary_config_file_is_one_line(command, work):
    (work / "cfg.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    args = {
        "phantoms": ("phantoms", "--out", "o"),
        "split": ("split", "real"),
        "fetch": ("fetch", "--out", "o"),
    }
    before = snapshot(work)
    refused(stda(*args[command], "--config", "cfg.yaml", cwd=work), command, "cfg.yaml is not UTF-8 text")
    assert snapshot(work) == before


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_fetch_refuses_a_timeout_that_is_not_finite(value, work):
    proc = stda("fetch", "--out", "isic", "--timeout", value, "--api-url", NOWHERE, cwd=work)
    refused(proc, "fetch", f"{value} is not a finite number")
    assert not (work / "isic").exists()


def test_phantom_size_is_bounded_before_allocating(work):
    proc = stda("phantoms", "--out", "big", "--n", "1", "--size", "100000", cwd=work)
    refused(proc, "phantoms", "16 to 4096 pixels a side", "149.0 GiB")
    assert not (work / "big").exists()


def test_generate_size_is_bounded_before_allocating(work):
    proc = stda("generate", "real", "--out", "big", "--size", "100000", cwd=work)
    refused(proc, "generate", "32 to 4096 pixels a side", "2,384.2 GiB")
    assert not (work / "big").exists()


# ----------------------------------------------------------------------------------------------------------------
# The real folder's contract


@pytest.mark.parametrize("command", ["inspect", "split", "package"])
def test_a_latin1_metadata_csv_is_one_line(command, work):
    meta = work / "real" / "metadata.csv"
    meta.write_bytes(
        meta.read_bytes().replace(b"stda-hf phantom generator", b"stda-hf phantom g\xe9n\xe9rator")
    )
    before = snapshot(work)
    args = ("package", "real", "--out", "hub") if command == "package" else (command, "real")
    refused(stda(*args, cwd=work), command, "metadata.csv is not UTF-8 text", "0xe9")
    assert snapshot(work) == before


def test_a_utf8_bom_in_metadata_csv_is_read(work):
    meta = work / "real" / "metadata.csv"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    proc = stda("inspect", "real", "--no-decode", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "30 images" in proc.stdout


@pytest.mark.parametrize("command", ["inspect", "split"])  # every stage reads the folder through one reader
def test_one_id_with_two_files_is_refused_naming_both(command, work):
    images = work / "real" / "images"
    shutil.copy(images / "PHANTOM_0000009.jpg", images / "PHANTOM_0000010.png")
    before = snapshot(work)
    refused(stda(command, "real", cwd=work), command, "PHANTOM_0000010.jpg", "PHANTOM_0000010.png")
    assert snapshot(work) == before


def test_imagefolder_takes_what_pillow_reads_and_reports_every_file_left_out(tmp_path):
    real = tmp_path / "folder"
    img = Image.new("RGB", (32, 32), (180, 120, 90))
    (real / "benign" / "sub").mkdir(parents=True)
    (real / "Malignant").mkdir()
    img.save(real / "benign" / "a.jpg")
    img.save(real / "benign" / "b.gif")
    img.save(real / "benign" / "c.jfif", format="JPEG")
    img.save(real / "benign" / "d", format="PNG")
    img.save(real / "benign" / "sub" / "e.jpg")
    (real / "benign" / "notes.txt").write_text("seen by a dermatologist")
    img.save(real / "Malignant" / "f.png")
    img.save(real / "Malignant" / "g.bmp")
    proc = stda("inspect", "folder", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6 images" in out and "benign 4, malignant 2" in out
    assert "left out:    2" in out
    assert f"{Path('folder/benign/notes.txt')}: not an image file Pillow can read" in out
    assert f"{Path('folder/benign/sub')}: a folder" in out


def test_an_image_missing_from_splits_csv_is_reported_by_package(work):
    splits = work / "real" / "splits.csv"
    lines = splits.read_text().splitlines(keepends=True)
    dropped = next(line for line in lines[1:] if ",train," in line or line.split(",")[1] == "train")
    splits.write_text("".join(line for line in lines if line != dropped))
    dropped_id = dropped.split(",")[0]
    proc = stda("package", "real", "--out", "hub", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert f"{dropped_id}.jpg: in no split of splits.csv" in proc.stdout
    assert "1 labelled image(s)" in proc.stderr
    inspect = stda("inspect", "real", "--no-decode", cwd=work)
    assert "in no split: 1 labelled image(s)" in inspect.stdout


# ----------------------------------------------------------------------------------------------------------------
# Outputs and inputs


@pytest.mark.parametrize(
    ("command", "out", "needle"),
    [
        ("generate", "real", "is (inside) the real-image folder"),
        ("generate", "real/images", "is (inside) the real-image folder"),
        ("generate", ".", "holds the real-image folder"),
        ("generate", "", "an empty path"),
        ("package", "real/hub", "is (inside) the real-image folder"),
    ],
)
def test_an_output_equal_to_inside_or_holding_an_input_is_refused(command, out, needle, work):
    before = snapshot(work)
    refused(stda(command, "real", "--out", out, cwd=work), command, needle)
    assert snapshot(work) == before


def _safetensors(path: Path, tensors: dict[str, list[float]]) -> None:
    """A valid safetensors file of float32 vectors, written by hand (no torch import in the test process)."""
    header, data = {}, b""
    for name, values in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": [len(values)],
            "data_offsets": [len(data), len(data) + len(blob)],
        }
        data += blob
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def test_a_failed_generate_does_not_bind_the_folder_to_its_settings(work):
    _safetensors(work / "wrong.safetensors", {"x": [0.0]})
    small = ("--size", "32", "--iterations", "1", "--limit", "1", "--per-content", "1", "--device", "cpu")
    small += ("--max-failed-share", "1")  # 1-2 evaluations leave the image `unchanged`: not what this tests
    failed = stda("generate", "real", "--out", "syn", "--weights", "wrong.safetensors", *small, cwd=work)
    refused(failed, "generate", "missing 26 tensor(s)")
    fixed = stda(
        "generate", "real", "--out", "syn", "--weights", "random", *small, "--iterations", "2", cwd=work
    )
    assert fixed.returncode == 0, fixed.stderr
    assert len(list((work / "syn" / "images").iterdir())) == 1
    again = stda("generate", "real", "--out", "syn", "--weights", "random", *small, cwd=work)
    refused(again, "generate", "was made with other settings", "iterations: 2 -> 1")


def test_a_second_generate_into_a_busy_folder_is_refused(work):
    (work / "syn").mkdir()
    with open(work / "syn" / ".generate.rank0.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = stda("generate", "real", "--out", "syn", "--size", "32", cwd=work)
    refused(proc, "generate", "another `stda generate` is writing to syn")
    assert [p.name for p in (work / "syn").iterdir()] == [".generate.rank0.lock"]


# ----------------------------------------------------------------------------------------------------------------
# Logs


def test_verbose_http_logs_scrub_headers_and_queries(caplog):
    """In-process: the filter sits on urllib3's loggers, which a subprocess could only reach with a live server
    that sends the headers urllib3 complains about."""
    from stda_hf.fetch.http import RetryingClient, RetryPolicy

    RetryingClient(RetryPolicy()).close()
    headers = (
        "{'Set-Cookie': 'session=s3cr3t', 'Location': 'https://x/a.jpg?Signature=abc', 'Server': 'isic'}"
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("urllib3.connection").warning(
            "Failed to parse headers (url=%s): %s", "/a?t=1", headers
        )
    text = caplog.text
    assert "s3cr3t" not in text and "Signature" not in text and "t=1" not in text
    assert "'Set-Cookie': '<redacted>'" in text and "'Server': 'isic'" in text


# ----------------------------------------------------------------------------------------------------------------
# Issue 26: state files, model folders, seeds, sizes and --overwrite. The cases run in one process (one import of
# torch for all), each from its own folder; every test asserts on its case's exit status, stderr and files.

BATCH = """
import json, os, sys, tempfile
from stda_hf.cli import main
exec(sys.argv[2])  # the prelude: builds the shared assets (model folders) with the torch this process imports
results = {}
for name, cwd, argv in json.loads(sys.argv[1]):
    os.chdir(cwd)
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results[name] = [rc, err.read().decode()]
print("RESULTS " + json.dumps(results))
"""


def run_batch(
    cases: dict[str, tuple[Path, tuple[str, ...]]], prelude: str = ""
) -> dict[str, subprocess.CompletedProcess]:
    """Run ``stda`` once per case (name -> (cwd, args)) in one subprocess, after the Python code ``prelude``;
    a CompletedProcess per case."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STDA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    spec = json.dumps([[name, str(cwd), list(map(str, args))] for name, (cwd, args) in cases.items()])
    proc = subprocess.run(
        [sys.executable, "-c", BATCH, spec, prelude], env=env, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return {
        name: subprocess.CompletedProcess(args, rc, "", err)
        for name, (rc, err) in json.loads(line[len("RESULTS ") :]).items()
        for args in [cases[name][1]]
    }


def _user_folder_with_a_config(folder: Path) -> None:
    """A folder of the user's that merely holds a ``config.yaml`` (the data-loss case: --overwrite must not delete it)."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "scan.csv").write_text("id,x\n1,2\n")
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.yaml").write_text("lr: 0.1\n")


def _train_cases(root: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    """name -> (cwd, args, folder the case must leave as it was)."""
    cases = {}
    work = root / "user-folder"
    _user_folder_with_a_config(work / "proj")
    cases["overwrite-user-folder"] = (
        work,
        ("train", "--output-dir", "proj", "--overwrite", "--dataset", "hub"),
    )
    work = root / "symlink"
    _user_folder_with_a_config(work / "target")
    (work / "target" / RUN_MARKER_NAME).write_text('{"made_by": "stda-hf train"}')
    (work / "link").symlink_to("target", target_is_directory=True)
    cases["overwrite-symlink"] = (work, ("train", "--output-dir", "link", "--overwrite", "--dataset", "hub"))
    work = root / "marker-link"
    _user_folder_with_a_config(work / "proj")
    (work / "elsewhere.json").write_text('{"made_by": "stda-hf train"}')
    (work / "proj" / RUN_MARKER_NAME).symlink_to(work / "elsewhere.json")
    cases["overwrite-marker-link"] = (
        work,
        ("train", "--output-dir", "proj", "--overwrite", "--dataset", "hub"),
    )
    work = root / "busy"
    (work / "run").mkdir(parents=True)
    (work / "run" / ".train.rank0.lock").touch()
    cases["train-busy"] = (work, ("train", "--output-dir", "run", "--dataset", "hub"))
    work = root / "mistyped"
    work.mkdir()
    cases["train-mistyped-dataset"] = (work, ("train", "--output-dir", "run", "--dataset", "hbu"))
    cases["train-mistyped-dataset-again"] = (work, ("train", "--output-dir", "run", "--dataset", "hbu2"))
    return cases


RUN_MARKER_NAME = ".stda-train.json"


def _prelude(assets: Path) -> str:
    """Code run in the batch process first: a tiny random VGG8 teacher (``assets/teacher``) and variants of it
    whose folder does not match its weights."""
    return f"""
import json, shutil, torch
from pathlib import Path
from stda_hf.models.vgg import build_model, default_preprocessing, save_model
torch.set_num_threads(1)
assets = Path({str(assets)!r})
model = build_model("vgg8", "random", seed=0, widths=(4, 8, 8, 8, 8), hidden=(8, 8))
save_model(model, assets / "teacher", default_preprocessing("vgg8", 32))
def variant(name, edit):
    shutil.copytree(assets / "teacher", assets / name)
    edit(assets / name)
def three_classes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {{"0": "a", "1": "b", "2": "c"}}
    config["label2id"] = {{"a": 0, "b": 1, "c": 2}}
    (folder / "config.json").write_text(json.dumps(config))
def other_widths(folder):
    config = json.loads((folder / "config.json").read_text())
    config["widths"] = [4, 8, 8, 8, 16]
    (folder / "config.json").write_text(json.dumps(config))
def truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
def corrupt_config(folder):
    (folder / "config.json").write_text('{{"model_type": "stda-vgg", oops')
variant("three-classes", three_classes)
variant("other-widths", other_widths)
variant("truncated", truncated)
variant("corrupt-config", corrupt_config)
if (assets / "real").is_dir():  # a packaged dataset, and copies whose Parquet no longer fits the card
    import pyarrow.parquet as pq
    from stda_hf.cli import main
    assert main(["package", str(assets / "real"), "--out", str(assets / "hub")]) == 0
    shutil.copytree(assets / "hub", assets / "hub-renamed-column")
    card = assets / "hub-renamed-column" / "README.md"
    card.write_text(card.read_text().replace("  - name: isic_id", "  - name: isic_idx", 1))
    shutil.copytree(assets / "hub", assets / "hub-empty-shard")
    shard = assets / "hub-empty-shard" / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 0), shard)
"""


def _synthetic(folder: Path, real: Path, n: int = 2) -> list[dict]:
    """A synthetic folder by the contract (train benign content x train malignant style, images copied, each
    record with its image's digest); returns the records."""
    import csv
    import hashlib

    with open(real / "splits.csv", newline="") as fh:
        split = {row["isic_id"]: row["split"] for row in csv.DictReader(fh)}
    with open(real / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if split.get(r["isic_id"]) == "train"]
    benign = [r for r in rows if r["diagnosis_1"] == "Benign"]
    malignant = [r for r in rows if r["diagnosis_1"] == "Malignant"]
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        c, st = benign[i], malignant[i]
        image_id = f"syn_{i:04d}"
        data = next((real / "images").glob(f"{c['isic_id']}.*")).read_bytes()
        (folder / "images" / f"{image_id}.jpg").write_bytes(data)
        records.append(
            {"id": image_id, "file": f"images/{image_id}.jpg", "sha256": hashlib.sha256(data).hexdigest(),
             "content_id": c["isic_id"], "style_id": st["isic_id"], "seed": 0, "quality": {"verdict": "ok"},
             "content_license": c["copyright_license"], "content_attribution": c["attribution"],
             "style_license": st["copyright_license"], "style_attribution": st["attribution"]}
        )  # fmt: skip
    _lines(folder / "manifest.jsonl", records)
    splits_sha = hashlib.sha256((real / "splits.csv").read_bytes()).hexdigest()
    (folder / "source.json").write_text(json.dumps({"real": str(real), "splits_sha256": splits_sha}))
    labels = [{"id": r["id"], "label": "malignant", "probs": [0.2, 0.8], "confidence": 0.8, "teacher": "t"} for r in records]  # fmt: skip
    _lines(folder / "labels.jsonl", labels)
    return records


def _lines(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _state_cases(root: Path, real: Path, assets: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Hostile cases on state files, sizes and seeds: name -> (cwd, args)."""
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}
    shutil.copytree(real, assets / "real")
    gen = ("--size", "32", "--weights", "random", "--limit", "1", "--per-content", "1", "--device", "cpu")

    def case(name: str, *args: str, synthetic: str | None = None) -> Path:
        work = root / name
        shutil.copytree(real, work / "real")
        if synthetic is not None:
            _synthetic(work / synthetic, work / "real")
        cases[name] = (work, args)
        return work

    def edit_manifest(work: Path, folder: str, edit) -> None:
        path = work / folder / "manifest.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        _lines(path, edit(records))

    # generate: its own state files in --out
    work = case("generate-corrupt-engine-json", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    (work / "syn" / "engine.json").write_text('{"name": "gatys",')
    work = case("generate-corrupt-source-json", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    (work / "syn" / "source.json").write_text("[1, 2]")
    work = case("generate-fifo-manifest", "generate", "real", "--out", "syn", *gen)
    (work / "syn").mkdir()
    os.mkfifo(work / "syn" / "manifest.jsonl")
    for name, line in (("number", 42), ("text", "x"), ("empty", {})):
        work = case(f"generate-manifest-{name}", "generate", "real", "--out", "syn", *gen, synthetic="syn")
        edit_manifest(work, "syn", lambda records, line=line: [records[0], line, *records[1:]])
    work = case("generate-manifest-duplicate-id", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    edit_manifest(work, "syn", lambda records: [records[0], {**records[1], "id": records[0]["id"]}])
    work = case("generate-manifest-other-file", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    edit_manifest(work, "syn", lambda records: [records[0], {**records[1], "file": records[0]["file"]}])
    work = case("generate-image-replaced", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    shutil.copy(work / "syn" / "images" / "syn_0001.jpg", work / "syn" / "images" / "syn_0000.jpg")
    work = case("generate-settings-duplicate-key", "generate", "real", "--out", "syn", *gen, synthetic="syn")
    (work / "syn" / "generate.yaml").write_text("size: 32\nsize: 64\n")

    # label
    teacher = str(assets / "teacher")
    work = case("label-manifest-empty-record", "label", "syn", "--teacher", teacher, synthetic="syn")
    edit_manifest(work, "syn", lambda records: [*records, {}])
    (work / "syn" / "source.json").unlink()  # no real folder: no leakage check (and its warning line)
    work = case("label-duplicate-labels", "label", "syn", "--teacher", teacher, synthetic="syn")
    (work / "syn" / "source.json").unlink()
    with open(work / "syn" / "labels.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "syn_0000", "label": "benign", "confidence": 0.9, "teacher": "t"}) + "\n")
    work = case("label-labels-not-records", "label", "syn", "--teacher", teacher, synthetic="syn")
    (work / "syn" / "source.json").unlink()
    (work / "syn" / "labels.jsonl").write_text('"x"\n42\n')
    work = case("label-corrupt-source-json", "label", "syn", "--teacher", teacher, synthetic="syn")
    (work / "syn" / "source.json").write_text("{")
    work = case(
        "label-corrupt-calibration", "label", "syn", "--teacher", teacher, "--calibrate", synthetic="syn"
    )
    (work / "syn" / "calibration.json").write_text('{"key": 1}')
    (work / "syn" / "source.json").unlink()
    for model in ("three-classes", "other-widths", "truncated", "corrupt-config"):
        work = case(f"label-model-{model}", "label", "syn", "--teacher", str(assets / model), synthetic="syn")
        (work / "syn" / "source.json").unlink()
        case(
            f"explain-model-{model}",
            "explain",
            "--model",
            str(assets / model),
            "--images",
            "real",
            "--out",
            "ex",
        )
    work = case("explain-overwrite-user-folder", "explain", "--model", teacher, "--images", "real", "--out", "mine", "--overwrite")  # fmt: skip
    (work / "mine" / "heatmaps").mkdir(parents=True)
    (work / "mine" / "heatmaps" / "figure1.png").write_bytes(b"the user's own figure")
    case(
        "label-image-size-negative",
        "label",
        "syn",
        "--teacher",
        teacher,
        "--image-size",
        "-1",
        synthetic="syn",
    )

    # package
    work = case(
        "package-manifest-text", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn"
    )
    edit_manifest(work, "syn", lambda records: [*records, "x"])
    work = case("package-manifest-duplicate-id", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn")  # fmt: skip
    edit_manifest(work, "syn", lambda records: [records[0], {**records[1], "id": records[0]["id"]}])
    work = case("package-manifest-other-file", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn")  # fmt: skip
    edit_manifest(work, "syn", lambda records: [records[0], {**records[1], "file": records[0]["file"]}])
    work = case("package-image-replaced", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn")  # fmt: skip
    shutil.copy(work / "syn" / "images" / "syn_0001.jpg", work / "syn" / "images" / "syn_0000.jpg")
    work = case("package-duplicate-labels", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn")  # fmt: skip
    with open(work / "syn" / "labels.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "syn_0001", "label": "benign", "confidence": 0.9, "teacher": "t"}) + "\n")

    work = case("package-manifest-without-digests", "package", "real", "--out", "hub", "--synthetic", "syn", synthetic="syn")  # fmt: skip
    edit_manifest(
        work, "syn", lambda records: [{k: v for k, v in r.items() if k != "sha256"} for r in records]
    )

    # seeds, sizes and config files
    case("phantoms-negative-seed", "phantoms", "--out", "o", "--n", "2", "--size", "32", "--seed", "-1")
    case("split-negative-seed", "split", "real", "--seed", "-1")
    case("split-huge-seed", "split", "real", "--seed", str(2**32))
    case("generate-negative-seed", "generate", "real", "--out", "syn", *gen, "--seed", "-5")
    case("train-negative-seed", "train", "--output-dir", "run", "--dataset", "hub", "--seed", "-1")
    case(
        "train-image-size-huge", "train", "--output-dir", "run", "--dataset", "hub", "--image-size", "1000000"
    )
    arb = ("generate", "real", "--out", "syn", "--engine", "arbitrary", "--size", "32")
    case("generate-style-size-huge", *arb, "--style-size", "1000000")
    case("generate-render-size-huge", *arb, "--render-size", "1000000")
    work = case("config-is-a-folder", "phantoms", "--out", "o", "--config", "cfg")
    (work / "cfg").mkdir()
    work = case("config-duplicate-key", "phantoms", "--out", "o", "--config", "cfg.yaml")
    (work / "cfg.yaml").write_text("n: 2\nsize: 32\nn: 4\n")
    benchmarks = {
        "benchmark-arm-as-text": "arms:\n  baseline: none\n  mix: {synthetic: mix}\n",
        "benchmark-arm-twice": "arms:\n  baseline: {synthetic: none}\n  mix: {synthetic: mix}\n  mix: {synthetic: pretrain}\n",
        "benchmark-unknown-curve-metric": "curve_metric: auroc\n",
        "benchmark-negative-seed": "seeds: [0, -3]\n",
    }  # fmt: skip
    for hub in ("hub-renamed-column", "hub-empty-shard"):
        (root / f"train-{hub}").mkdir()
        cases[f"train-{hub}"] = (root / f"train-{hub}", ("train", "--dataset", str(assets / hub), "--output-dir", "run"))  # fmt: skip
    work = root / "fetch-refused"
    work.mkdir()
    cases["fetch-refused"] = (
        work,
        ("fetch", "--out", "isic", "--api-url", NOWHERE, "--limit", "2", "--retries", "0"),
    )
    for name, text in benchmarks.items():
        work = root / name
        work.mkdir()
        (work / "bench.yaml").write_text(text)
        cases[name] = (work, ("benchmark", "--config", "bench.yaml"))
    return cases


@pytest.fixture(scope="module")
def batch(tmp_path_factory, real_session):
    """Every issue-26 case run once, in one process: name -> (result, snapshot before, snapshot after)."""
    root = tmp_path_factory.mktemp("batch")
    assets = root / "assets"
    cases = {**_train_cases(root), **_state_cases(root, real_session, assets)}
    before = {name: snapshot(cwd) for name, (cwd, _args) in cases.items()}
    with open(root / "busy" / "run" / ".train.rank0.lock", "a") as held:  # a train running there now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results = run_batch({name: (cwd, args) for name, (cwd, args) in cases.items()}, _prelude(assets))
    return {name: (results[name], before[name], snapshot(cases[name][0])) for name in cases}


BATCH_REFUSALS = {
    "overwrite-user-folder": ("train", "proj was not made by train", "nothing in it is deleted"),
    "overwrite-symlink": ("train", "link is a symbolic link", "never deletes through a link"),
    "overwrite-marker-link": ("train", "proj was not made by train"),
    "train-busy": ("train", "another train is writing to run"),
    "generate-corrupt-engine-json": ("generate", "engine.json is not valid JSON (line 1", "delete it"),
    "generate-corrupt-source-json": ("generate", "source.json: expected a JSON object, found a list"),
    "generate-fifo-manifest": ("generate", "manifest.jsonl is a FIFO (named pipe), not a regular file"),
    "generate-manifest-number": ("generate", "manifest.jsonl, line 2: expected a JSON object, found an integer"),
    "generate-manifest-text": ("generate", "manifest.jsonl, line 2: expected a JSON object, found text"),
    "generate-manifest-empty": ("generate", "manifest.jsonl, line 2: the field 'id' is missing"),
    "generate-manifest-duplicate-id": ("generate", "line 2: id 'syn_0000' appears twice (first on line 1)"),
    "generate-manifest-other-file": ("generate", "line 2: the file of syn_0001 is 'images/syn_0000.jpg'"),
    "generate-image-replaced": ("generate", "syn_0000.jpg is not the image its manifest record (syn_0000)"),
    "generate-settings-duplicate-key": ("generate", "generate.yaml is not valid YAML", "'size' appears twice"),
    "label-manifest-empty-record": ("label", "manifest.jsonl, line 3: the field 'id' is missing"),
    "label-duplicate-labels": ("label", "labels.jsonl, line 3: id 'syn_0000' appears twice", "stda label"),
    "label-labels-not-records": ("label", "labels.jsonl, line 1: expected a JSON object, found text"),
    "label-corrupt-source-json": ("label", "source.json is not valid JSON", "--real"),
    "label-corrupt-calibration": ("label", "calibration.json: the field 'key' is an integer 1, not text"),
    "label-model-three-classes": ("label", "do not match config.json", "is [2, 8] in the weights but [3, 8]"),
    "label-model-other-widths": ("label", "do not match config.json", "[8, 8, 3, 3] in the weights but [16, 8"),
    "label-model-truncated": ("label", "model.safetensors is truncated"),
    "label-model-corrupt-config": ("label", "config.json is not valid JSON"),
    "explain-model-three-classes": ("explain", "do not match config.json", "in the weights but [3, 8]"),
    "explain-model-other-widths": ("explain", "do not match config.json"),
    "explain-model-truncated": ("explain", "model.safetensors is truncated"),
    "explain-model-corrupt-config": ("explain", "config.json is not valid JSON"),
    "explain-overwrite-user-folder": ("explain", "--out mine is not empty and holds no explain.yaml"),
    "label-image-size-negative": ("label", "--image-size -1: teacher inputs need 16 to 4096 pixels a side"),
    "package-manifest-text": ("package", "manifest.jsonl, line 3: expected a JSON object, found text"),
    "package-manifest-duplicate-id": ("package", "line 2: id 'syn_0000' appears twice"),
    "package-manifest-other-file": ("package", "line 2: the file of syn_0001 is 'images/syn_0000.jpg'"),
    "package-image-replaced": ("package", "syn_0000.jpg is not the image its manifest record (syn_0000)"),
    "package-duplicate-labels": ("package", "labels.jsonl, line 3: id 'syn_0001' appears twice"),
    "phantoms-negative-seed": ("phantoms", "--seed -1 must be a whole number from 0 to 4294967295"),
    "split-negative-seed": ("split", "--seed -1 must be a whole number from 0 to 4294967295"),
    "split-huge-seed": ("split", "--seed 4294967296 must be a whole number from 0"),
    "generate-negative-seed": ("generate", "--seed -5 must be a whole number from 0"),
    "train-negative-seed": ("train", "--seed -1 must be a whole number from 0"),
    "train-image-size-huge": ("train", "--image-size 1000000: training images need 16 to 4096", "238,418.6 GiB"),
    "generate-style-size-huge": ("generate", "--style-size 1000000", "32 to 4096 pixels a side", "GiB"),
    "generate-render-size-huge": ("generate", "--render-size 1000000", "32 to 4096 pixels a side", "GiB"),
    "train-hub-renamed-column": ("train", "hub-renamed-column' (CastError", "must be packaged again"),
    "train-hub-empty-shard": ("train", "hub-empty-shard' (ArrowInvalid", "must be packaged again"),
    "benchmark-arm-as-text": ("benchmark", "arms.baseline: 'none' is not a mapping of train.py settings"),
    "benchmark-arm-twice": ("benchmark", "bench.yaml is not valid YAML", "'mix' appears twice (first on line 3, again on line 4)"),
    "benchmark-unknown-curve-metric": ("benchmark", "curve_metric 'auroc': choose one of ['roc_auc'"),
    "benchmark-negative-seed": ("benchmark", "seeds -3 must be a whole number from 0"),
    "config-is-a-folder": ("phantoms", "config file cfg is a folder, not a regular file"),
    "config-duplicate-key": ("phantoms", "cfg.yaml is not valid YAML", "'n' appears twice (first on line 1, again on line 3)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BATCH_REFUSALS))
def test_hostile_state_case_is_one_line_and_changes_nothing(case, batch):
    proc, before, after = batch[case]
    command, *needles = BATCH_REFUSALS[case]
    refused(proc, command, *needles)
    out = {"generate": "syn/", "package": "hub/", "explain": "ex/", "train": "run/"}.get(
        command
    )  # --out may gain
    assert {k: v for k, v in after.items() if out is None or not k.startswith(out) or k in before} == before


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_corrected_command(batch):
    first, _, _ = batch["train-mistyped-dataset"]
    again, _, after = batch["train-mistyped-dataset-again"]
    refused(first, "train", "dataset folder hbu not found")
    refused(again, "train", "dataset folder hbu2 not found")  # not "already holds a run"
    assert set(after) <= {"run/config.yaml", f"run/{RUN_MARKER_NAME}"}


def test_a_manifest_written_before_digests_still_packages_with_a_warning_saying_so(batch):
    proc, _, after = batch["package-manifest-without-digests"]
    assert proc.returncode == 0, proc.stderr
    assert "2 record(s) of syn/manifest.jsonl carry no image digest" in proc.stderr
    assert any(k.startswith("hub/data/synthetic-") for k in after)


def test_a_corrupt_trainer_state_is_one_line_naming_the_checkpoint_to_delete(tmp_path):
    from stda_hf.core.errors import StdaError
    from stda_hf.training.state import read_run_state

    checkpoint = tmp_path / "checkpoints" / "epoch_0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"epoch": "two"}')
    with pytest.raises(
        StdaError, match=r"trainer_state\.json: the field 'epoch' is text .*delete the checkpoint"
    ):
        read_run_state(checkpoint)


@pytest.fixture
def onnx_models(monkeypatch):
    """The arbitrary engine's model loader, with a hook to hand it other bytes for one model."""
    from stda_hf.generate import arbitrary

    real = arbitrary.model_bytes
    return arbitrary, lambda edit: monkeypatch.setattr(arbitrary, "model_bytes", lambda n: edit(n, real(n)))


def test_the_onnx_files_as_installed_match_the_digests_their_installation_recorded(onnx_models):
    import hashlib

    arbitrary, _ = onnx_models
    for name in arbitrary.MODEL_FILES:
        recorded = arbitrary.recorded_digest(name)
        assert recorded is not None
        assert arbitrary.check_model_bytes(name, arbitrary.model_bytes(name)) == recorded
        assert recorded == hashlib.sha256(arbitrary.model_bytes(name)).hexdigest()


def test_a_truncated_onnx_file_is_refused_by_its_digest_before_a_session_is_built(onnx_models, monkeypatch):
    from stda_hf.core.errors import StdaError

    arbitrary, hand = onnx_models
    hand(lambda name, data: data[: len(data) // 2] if name == "predict" else data)  # the first one loaded
    monkeypatch.setattr(arbitrary, "_session", lambda *a: pytest.fail("a session was built"))
    with pytest.raises(StdaError, match=r"arbitrary_predict\.onnx is not the file the package installed"):
        arbitrary.load_models("cpu", threads=1)


def test_a_corrupt_onnx_file_without_a_recorded_digest_is_one_clear_error(onnx_models, monkeypatch):
    from stda_hf.core.errors import StdaError

    arbitrary, hand = onnx_models
    monkeypatch.setattr(arbitrary, "recorded_digest", lambda name: None)  # an editable or system install
    hand(lambda name, data: b"not an onnx model" if name == "predict" else data)
    with pytest.raises(StdaError, match=r"arbitrary_predict\.onnx cannot be loaded .*reinstall it"):
        arbitrary.load_models("cpu", threads=1)


def test_a_refused_fetch_leaves_no_lock_file_behind(batch):
    proc, _, after = batch["fetch-refused"]
    refused(proc, "fetch", "could not reach the ISIC Archive")
    assert not [k for k in after if k.endswith(".lock")]


def test_train_py_with_the_transformers_spelling_of_a_flag_is_one_line_naming_ours(capsys):
    from stda_hf.training.command import get_args_parser

    with pytest.raises(SystemExit) as stop:
        get_args_parser().parse_args(["--output_dir", "runs/x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    assert "--output_dir -> --output-dir" in lines[0]


def test_the_demo_never_deletes_a_synthetic_folder_that_generate_did_not_make(tmp_path, real_session):
    from stda_hf.core.errors import StdaError
    from stda_hf.demo import _generate_step

    mine = tmp_path / "synthetic"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own synthetic images")
    with pytest.raises(StdaError, match="was not made by `stda generate`"):
        _generate_step(tmp_path, real_session, 32, 0, "arbitrary")
    assert (mine / "notes.txt").read_text() == "my own synthetic images"
