"""The built wheel works without the source tree: installed non-editable into a fresh venv, run from elsewhere.

The venv reuses the test interpreter's installed packages through a ``.pth`` line (no network, no copies) but
gets ``stda_hf`` only from the wheel: the repository is neither the working directory nor on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "stda_hf", "dataset_script", "cards"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)],
        tmp,
        env,
    )
    (wheel,) = (tmp / "dist").glob("stda_hf-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env
        ).strip()
    )
    (site / "outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return {
        "python": python, "stda": venv / "bin" / "stda", "site": site, "env": env, "work": work, "wheel": wheel
    }  # fmt: skip


SPECIFIED_TOP_LEVEL = {"pyproject.toml", "stda_hf", "dataset_script", "cards", "tests", "README.md"}
"""The repository's top level as the project was specified; docs/, benchmarks/, reports/, the Makefile,
train.py and dot-files may sit beside it."""


def test_repository_top_level_is_the_specified_one():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {path.split("/")[0] for path in tracked}
    extra = top - SPECIFIED_TOP_LEVEL - {"docs", "benchmarks", "reports", "Makefile", "train.py"}
    assert SPECIFIED_TOP_LEVEL <= top
    assert {name for name in extra if not name.startswith(".")} == set()
    assert (ROOT / "cards" / "dataset_card.md").is_file() and (
        ROOT / "dataset_script" / "__init__.py"
    ).is_file()
    assert not any(path.startswith(("stda_hf/cards/", "stda_hf/dataset/cards/")) for path in tracked)


def test_wheel_installs_one_top_level_package_holding_cards_and_the_loading_script(wheel_venv):
    names = zipfile.ZipFile(wheel_venv["wheel"]).namelist()
    assert {name.split("/")[0] for name in names} == {"stda_hf", "stda_hf-0.1.0.dist-info"}
    assert "stda_hf/cards/dataset_card.md" in names
    assert {"stda_hf/dataset_script/__init__.py", "stda_hf/dataset_script/skin_lesions.py"} <= set(names)
    source_packages = {
        str(folder.relative_to(ROOT)) for folder in (ROOT / "stda_hf").rglob("*")
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    }  # fmt: skip
    assert all(any(n.startswith(p + "/") for n in names) for p in source_packages), (
        "a package folder is missing"
    )


def test_installed_wheel_imports_the_loading_script_inside_the_package(wheel_venv):
    code = "import importlib.util as u, stda_hf.dataset_script as d; print(d.__file__, u.find_spec('dataset_script'))"
    where, top = _run([str(wheel_venv["python"]), "-c", code], wheel_venv["work"], wheel_venv["env"]).split()
    assert Path(where).is_relative_to(wheel_venv["site"] / "stda_hf" / "dataset_script") and top == "None"


def test_the_installed_package_is_the_wheel_with_its_card_template(wheel_venv):
    code = "import stda_hf, stda_hf.dataset.card as c; print(stda_hf.__file__); print(c.TEMPLATE.is_file())"
    where, template = _run(
        [str(wheel_venv["python"]), "-c", code], wheel_venv["work"], wheel_venv["env"]
    ).split()
    assert Path(where).is_relative_to(wheel_venv["site"]) and template == "True"


def test_package_and_train_run_from_the_wheel_outside_the_repository(wheel_venv):
    stda, work, env = (
        str(wheel_venv["stda"]),
        wheel_venv["work"],
        {**wheel_venv["env"], "STDA_NO_PROGRESS": "1"},
    )
    _run([stda, "phantoms", "--out", "real", "--n", "48", "--size", "32"], work, env)
    _run([stda, "split", "real"], work, env)
    _run([stda, "package", "real", "--out", "hub"], work, env)
    assert (work / "hub" / "README.md").is_file()
    out = _run(
        [stda, "train", "--dataset", "hub", "--output-dir", "run", "--epochs", "1", "--image-size", "32",
         "--vgg8-widths", "4", "8", "8", "16", "16", "--vgg8-hidden", "16", "16", "--batch-size", "16",
         "--num-workers", "0", "--explain-images", "0"],
        work, env,
    )  # fmt: skip
    assert "finished after 1 epoch(s)" in out
    assert (work / "run" / "model" / "modeling_stda_vgg.py").is_file()
    out = _run([str(wheel_venv["python"]), "-m", "stda_hf.training", "--help"], work, env)
    assert "--label-map" in out
