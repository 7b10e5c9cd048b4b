"""The dataset card of a build: the settings of the engine that made the images, every column in the field
table, and no link that points back at the dataset as if it were the tool."""

from __future__ import annotations

import re

import yaml
from test_package import ARBITRARY_ENGINE, _with_quality, write_synthetic

from stda_hf.dataset.packaging import package
from stda_hf.dataset_script import FEATURES

GATYS_AND_ARBITRARY = {
    "engine": "arbitrary", "strength": 0.8, "style_size": 256, "render_size": 256, "preserve_color": "none",
    "size": 32, "per_content": 4, "seed": 0, "preset": "original", "iterations": 100, "style_weight": 1.0,
    "weights": "imagenet", "optimizer": "lbfgs", "min_style_reduction": 0.05, "min_structure": 0.2,
}  # fmt: skip
"""generate.yaml of an arbitrary-engine run: every setting of `stda generate`, Gatys's included."""


def _settings_rows(text: str) -> dict[str, str]:
    block = text.split("Style-transfer settings (`stda generate`):", 1)[1].split("\n\n", 2)[1]
    return dict(re.findall(r"^\s*\| `([^`]+)` \| (.*?) \|$", block, flags=re.M))


def _built(phantom_real, tmp_path, settings: dict, engine: dict) -> str:
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok"] * 4, engine)
    (synthetic / "generate.yaml").write_text(yaml.safe_dump(settings))
    package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    return (tmp_path / "hub" / "README.md").read_text()


def test_arbitrary_build_lists_only_the_settings_its_engine_used(phantom_real, tmp_path):
    rows = _settings_rows(_built(phantom_real, tmp_path, GATYS_AND_ARBITRARY, ARBITRARY_ENGINE))
    assert rows["engine"] == "arbitrary" and rows["strength"] == "0.8"
    assert not {"preset", "iterations", "style_weight", "weights", "optimizer"} & set(rows)


def test_gatys_build_leaves_out_the_arbitrary_engines_settings(phantom_real, tmp_path):
    settings = {**GATYS_AND_ARBITRARY, "engine": "gatys"}
    rows = _settings_rows(_built(phantom_real, tmp_path, settings, {"name": "gatys", "weights": "imagenet"}))
    assert rows["weights"] == "imagenet" and rows["iterations"] == "100"
    assert not {"strength", "style_size", "render_size"} & set(rows)


def test_field_table_has_a_row_for_every_column(phantom_real, tmp_path):
    text = _built(phantom_real, tmp_path, GATYS_AND_ARBITRARY, ARBITRARY_ENGINE)
    named = set()
    for first_cell in re.findall(r"^\| (`[^|]+`) \| [a-z0-9 ]+ \|", text, flags=re.M):
        named |= set(re.findall(r"`([^`]+)`", first_cell))
    assert set(FEATURES) <= named, set(FEATURES) - named


def test_card_does_not_link_the_tool_to_the_dataset_itself(phantom_real, tmp_path):
    text = _built(phantom_real, tmp_path, GATYS_AND_ARBITRARY, ARBITRARY_ENGINE)
    assert "[stda-hf](https://huggingface.co/datasets/" not in text
    assert "built with stda-hf 0.1.0 (`stda package`)" in text
