"""Hostile input against every ``stda`` subcommand it applies to (issue 14), each run as a user runs it.

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


def run_batch(cases: dict[str, tuple[Path, tuple[str, ...]]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``stda`` once per case (name -> (cwd, args)) in one subprocess; a CompletedProcess per case."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STDA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    spec = json.dumps([[name, str(cwd), list(map(str, args))] for name, (cwd, args) in cases.items()])
    proc = subprocess.run(
        [sys.executable, "-c", BATCH, spec], env=env, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return {
        name: subprocess.CompletedProcess(args, rc, "", err)
        for name, (rc, err) in json.loads(line[len("RESULTS ") :]).items()
        for args in [cases[name][1]]
    }


def _user_folder_with_a_config(folder: Path) -> None:
    """A folder of the user's that merely holds a ``config.yaml`` (the data-loss case of issue 26)."""
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


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every issue-26 case run once, in one process: name -> (result, snapshot before, snapshot after)."""
    root = tmp_path_factory.mktemp("batch")
    cases = _train_cases(root)
    before = {name: snapshot(cwd) for name, (cwd, _args) in cases.items()}
    with open(root / "busy" / "run" / ".train.rank0.lock", "a") as held:  # a train running there now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results = run_batch({name: (cwd, args) for name, (cwd, args) in cases.items()})
    return {name: (results[name], before[name], snapshot(cases[name][0])) for name in cases}


BATCH_REFUSALS = {
    "overwrite-user-folder": ("train", "proj was not made by train", "nothing in it is deleted"),
    "overwrite-symlink": ("train", "link is a symbolic link", "never deletes through a link"),
    "overwrite-marker-link": ("train", "proj was not made by train"),
    "train-busy": ("train", "another train is writing to run"),
}


@pytest.mark.parametrize("case", sorted(BATCH_REFUSALS))
def test_hostile_state_case_is_one_line_and_changes_nothing(case, batch):
    proc, before, after = batch[case]
    command, *needles = BATCH_REFUSALS[case]
    refused(proc, command, *needles)
    assert after == before


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_corrected_command(batch):
    first, _, _ = batch["train-mistyped-dataset"]
    again, _, after = batch["train-mistyped-dataset-again"]
    refused(first, "train", "dataset folder hbu not found")
    refused(again, "train", "dataset folder hbu2 not found")  # not "already holds a run"
    assert set(after) <= {"run/config.yaml", f"run/{RUN_MARKER_NAME}"}
