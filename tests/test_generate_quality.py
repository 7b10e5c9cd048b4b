"""The quality gate inside ``stda generate``: every image's record, a no-op and a wipe caught, the run's exit."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import read_jsonl
from stda_hf.generate.stage import GenerateConfig, QualityGateFailed, generate

# Random weights, 32 px, the network cut after conv2_1 (as tests/test_generate.py), 9 pairs in batches of 3.
TINY = {
    "weights": "random",
    "size": 32,
    "per_content": 1,
    "precision": "fp32",
    "content_layer": "conv2_1",
    "style_layers": ("conv1_1", "conv2_1"),
    "limit": 9,
    "batch": 3,
    "regions": "none",  # the whole-frame measure (tests/test_regions.py has the lesion's)
}
NO_OP = {
    **TINY,
    "iterations": 1,
}  # the least nst allows: one evaluation, and the best point seen is the start
WIPE = {
    **TINY,
    "iterations": 20,
    "content_weight": 0.0,
    "init": "noise",
}  # nothing ties the result to the content


def _verdicts(out) -> Counter:
    return Counter(r["quality"]["verdict"] for r in read_jsonl(out / "manifest.jsonl"))


def test_every_record_holds_terms_style_distances_structure_and_verdict(phantom_real_session, tmp_path):
    generate(phantom_real_session, tmp_path / "syn", GenerateConfig(**TINY, iterations=8))
    for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl"):
        terms, q = r["terms"], r["quality"]
        assert {f"{w}_{t}" for w in ("initial", "final") for t in ("content", "style", "tv", "total")} == set(
            terms
        )
        assert terms["initial_content"] == 0 and terms["final_style"] < terms["initial_style"]
        assert q["style_reduction"] == pytest.approx(1 - q["style_after"] / q["style_before"], rel=1e-4)
        assert 0 < q["mean_abs_change"] < 255 and -1 <= q["ssim"] <= 1
        assert q["verdict"] == "ok"


def test_forced_no_op_is_caught_as_unchanged_and_fails_the_run(phantom_real_session, tmp_path):
    out = tmp_path / "syn"
    with pytest.raises(QualityGateFailed, match=r"100% of the run's 9 images failed") as caught:
        generate(phantom_real_session, out, GenerateConfig(**NO_OP))
    assert _verdicts(out) == {"unchanged": 9}  # written before the run failed: nothing lost
    assert all(r["quality"]["mean_abs_change"] < 1 for r in read_jsonl(out / "manifest.jsonl"))
    saved = json.loads((out / "generate_summary.json").read_text())
    assert saved["run_verdicts"] == {"unchanged": 9} == caught.value.summary.run_verdicts


def test_forced_wipe_is_caught_as_content_lost(phantom_real_session, tmp_path):
    out = tmp_path / "syn"
    summary = generate(phantom_real_session, out, GenerateConfig(**WIPE, max_failed_share=1.0))
    verdicts = _verdicts(out)
    assert verdicts["content_lost"] >= 7 and verdicts["unchanged"] == 0, verdicts
    assert summary.verdicts == dict(verdicts)


def test_a_run_within_the_failed_share_returns(phantom_real_session, tmp_path):
    summary = generate(phantom_real_session, tmp_path / "syn", GenerateConfig(**NO_OP, max_failed_share=1.0))
    assert summary.run_verdicts == {"unchanged": 9} and "unchanged 9" in summary.format()


def test_cli_exits_2_with_one_line_when_too_many_images_fail(phantom_real_session, tmp_path, capsys):
    flags = [
        x
        for k, v in NO_OP.items()
        for x in (f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, tuple) else [v]))
    ]
    assert main(["generate", str(phantom_real_session), "--out", str(tmp_path / "syn"), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stda generate: error")]
    assert len(err) == 1 and "--max-failed-share 0.5" in err[0]


def test_gate_thresholds_do_not_change_ids_but_a_folder_keeps_its_own(phantom_real_session, tmp_path):
    loose = {**NO_OP, "max_failed_share": 1.0, "min_style_reduction": -1.0}
    generate(phantom_real_session, tmp_path / "a", GenerateConfig(**loose))
    generate(phantom_real_session, tmp_path / "b", GenerateConfig(**NO_OP, max_failed_share=1.0))
    ids = [{r["id"] for r in read_jsonl(tmp_path / d / "manifest.jsonl")} for d in ("a", "b")]
    assert ids[0] == ids[1] and _verdicts(tmp_path / "a") == {"ok": 9}
    with pytest.raises(StdaError, match="min_style_reduction"):
        generate(phantom_real_session, tmp_path / "a", GenerateConfig(**NO_OP, max_failed_share=1.0))


def test_bad_failed_share_is_refused():
    with pytest.raises(StdaError, match="--max-failed-share 2"):
        GenerateConfig(max_failed_share=2)


def test_records_and_summary_name_the_gate_network(phantom_real_session, tmp_path):
    summary = generate(phantom_real_session, tmp_path / "syn", GenerateConfig(**NO_OP, max_failed_share=1.0))
    saved = json.loads((tmp_path / "syn" / "generate_summary.json").read_text())
    assert saved["gate_features"] == summary.gate_features == "vgg19-imagenet"
    assert {r["quality"]["features"] for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl")} == {
        "vgg19-imagenet"
    }
    assert "quality gate (vgg19-imagenet)" in summary.format()


def test_phantom_records_judge_the_lesion_against_its_mask(phantom_real_session, tmp_path):
    generate(phantom_real_session, tmp_path / "syn", GenerateConfig(**NO_OP, max_failed_share=1.0))
    for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl"):  # a no-op keeps every lesion exactly
        q = r["quality"]
        assert (
            q["lesion_contrast"] == q["lesion_similarity"] == q["structure"] == pytest.approx(1.0, abs=1e-4)
        )


def test_the_gate_computes_each_style_images_grams_once(phantom_real_session, tmp_path, monkeypatch):
    from stda_hf.generate.quality import StyleDistance

    calls = Counter()
    original = StyleDistance.grams

    def counting(self, images):
        calls[len(images)] += 1
        return original(self, images)

    monkeypatch.setattr(StyleDistance, "grams", counting)
    settings = {**NO_OP, "per_content": 3, "limit": 12, "max_failed_share": 1.0}
    generate(phantom_real_session, tmp_path / "syn", GenerateConfig(**settings))
    styles = {r["style_id"] for r in read_jsonl(tmp_path / "syn" / "manifest.jsonl")}
    assert calls == {1: len(styles)}  # one call per style image, none per batch
