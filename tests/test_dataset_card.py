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


def _unknown_ids(real_root):
    """The same folder with its lesion and patient ids removed, as ISIC challenge folders come."""
    import csv

    path = real_root / "metadata.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["lesion_id"] = row["patient_id"] = ""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_unknown_lesions_and_patients_are_unknown_and_the_grouping_claim_says_what_was_used(
    phantom_real, tmp_path
):
    _unknown_ids(phantom_real)
    package(phantom_real, tmp_path / "hub")
    text = (tmp_path / "hub" / "README.md").read_text()
    train = next(line for line in text.splitlines() if line.startswith("| `train` |"))
    assert train.split("|")[6:8] == [" unknown ", " unknown "]
    assert "Images sharing a near-identical perceptual hash form one group" in text
    assert "The metadata gives no lesion ids, so two photographs of one lesion can sit on both sides" in text
    assert "refuses to build when a lesion or patient" not in text


def test_known_lesions_are_counted_and_grouping_names_them(phantom_real, tmp_path):
    package(phantom_real, tmp_path / "hub")
    text = (tmp_path / "hub" / "README.md").read_text()
    train = next(line for line in text.splitlines() if line.startswith("| `train` |"))
    assert int(train.split("|")[6]) > 0 and int(train.split("|")[7]) > 0
    assert "Images sharing a lesion, a patient or a near-identical perceptual hash form one group" in text
    assert "appears in validation or test.\n" in text  # the list item ends its line


def test_model_card_of_a_mix_run_states_the_synthetic_images_it_drew_and_only_settings_that_applied():
    from stda_hf.models.vgg import Preprocessing
    from stda_hf.training.config import TrainConfig
    from stda_hf.training.model_card import RunFacts, render_card

    config = {**vars(TrainConfig(synthetic="mix", synthetic_ratio=1.0)), "dataset": "me/data"}
    facts = RunFacts(
        config=config, layers=["Linear(2, 2)"], parameters=6, weights="random(seed=0)",
        split_sizes={"train": 69, "synthetic": 50, "validation": 10, "test": 10}, best_epoch=1, epochs=1,
        stopped_early=False, validation={}, test=None, preprocessing=Preprocessing(32), dataset_license="cc0-1.0",
    )  # fmt: skip
    text = render_card(facts, [])
    assert (
        "its 69 real training images plus 50 of its 50 synthetic images drawn anew each epoch (0.72" in text
    )
    assert "pretrain_epochs" not in text
    pretrain = render_card(RunFacts(**{**vars(facts), "config": {**config, "synthetic": "pretrain"}}), [])
    assert "`pretrain_epochs=" in pretrain
