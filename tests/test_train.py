"""train.py end to end on a packaged phantom dataset: learning, metrics, run folder, resume, two processes,
synthetic mixing and pretraining, the evaluation hook, push, and clear refusals."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VGG8, tiny_train_flags
from PIL import Image

from stda_hf.core.errors import StdaError
from stda_hf.training import TrainConfig, run_training
from stda_hf.training.data import EpochSampler, class_weights, load_splits
from stda_hf.training.step import learning_rate

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = str(ROOT / "train.py")
TINY = TINY_VGG8
TINY_FLAGS = tiny_train_flags()
METRIC_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "loss",
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "STDA_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}


def _cfg(hub: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(dataset=str(hub), output_dir=str(out), **{**TINY, **kw})


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _metrics(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {k: data[k] for k in METRIC_KEYS}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def _without_timing(records: list[dict]) -> list[dict]:
    timing = ("train/images_per_second", "train/data_seconds", "train/compute_seconds")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


# ----------------------------------------------------------------------------------------------------------------
# One finished run, inspected by several tests


@pytest.fixture(scope="module")
def finished_run(phantom_hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vgg8"
    result = run_training(_cfg(phantom_hub, out, epochs=5, augment=False, dropout=0.0))
    return out, result


def test_training_loss_decreases(finished_run):
    run, _ = finished_run
    losses = [r["train/loss"] for r in _log(run) if "train/loss" in r]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.05  # (0.71 -> 0.58 with these settings)


def test_metrics_are_saved_with_evaluate_each_epoch_and_for_test(finished_run, phantom_hub):
    run, result = finished_run
    files = sorted(p.name for p in (run / "metrics").iterdir())
    assert files == ["test.json", "test_subgroups.json"] + [
        f"validation-epoch_{e:04d}.json" for e in range(1, 6)
    ]
    test = json.loads((run / "metrics" / "test.json").read_text())
    assert set(METRIC_KEYS) <= set(test) and "_evaluate_version" in test  # written by evaluate.save
    assert test["split"] == "test" and test["epoch"] == result.best_epoch
    assert test["n"] == 15  # every test image once, gathered
    assert test["tn"] + test["fp"] + test["fn"] + test["tp"] == 15
    assert _metrics(run / "metrics" / "test.json") == {k: result.test[k] for k in METRIC_KEYS}


def test_test_metrics_are_reported_per_skin_type_with_counts_in_metrics_and_card(finished_run, phantom_hub):
    import datasets
    from huggingface_hub import ModelCard

    run, _ = finished_run
    groups = json.loads((run / "metrics" / "test_subgroups.json").read_text())["skin_type"]
    test = datasets.load_dataset(str(phantom_hub), split="test")
    counts = {t: test["skin_type"].count(t) for t in set(test["skin_type"])}
    assert {t: int(m["n"]) for t, m in groups.items()} == counts and sum(counts.values()) == 15
    for m in groups.values():
        assert m["tn"] + m["fp"] + m["fn"] + m["tp"] == m["n"]
    card = ModelCard.load(run / "model" / "README.md").text
    assert "## Results per subgroup" in card
    for skin_type, m in groups.items():
        assert f"| {skin_type} | {int(m['n'])} | " in card


def test_best_checkpoint_is_the_final_model(finished_run):
    run, result = finished_run
    val = [r["validation/roc_auc"] for r in _log(run) if "validation/roc_auc" in r]
    assert result.best_epoch == int(np.argmax(val)) + 1  # first epoch reaching the best score
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    best = json.loads((run / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert best["best_epoch"] == result.best_epoch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "epoch_0004", "epoch_0005"]


def test_final_model_reloads_and_reproduces_the_test_metrics(finished_run, phantom_hub):
    import datasets

    from stda_hf.metrics import load_metric
    from stda_hf.models import load_model
    from stda_hf.training.data import build_transforms
    from stda_hf.training.step import compute_metrics

    run, result = finished_run
    model, pre = load_model(run)
    test = datasets.load_dataset(str(phantom_hub), split="test")
    transform = build_transforms(TrainConfig(), pre, train=False)
    x = torch.stack([transform(im.convert("RGB")) for im in test["image"]])
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    metrics = compute_metrics(logits, torch.tensor(test["label"]), load_metric())
    assert metrics["roc_auc"] == pytest.approx(result.test["roc_auc"])
    assert metrics["balanced_accuracy"] == pytest.approx(result.test["balanced_accuracy"])


def test_model_card_has_the_test_metrics_as_model_index_and_the_layer_list(finished_run):
    from huggingface_hub import ModelCard

    run, result = finished_run
    card = ModelCard.load(run / "model" / "README.md")
    metrics = {m.metric_type: m.metric_value for m in card.data.eval_results}
    assert metrics["roc_auc"] == pytest.approx(round(result.test["roc_auc"], 4))
    assert metrics["recall"] == pytest.approx(round(result.test["sensitivity"], 4))
    assert card.data.eval_results[0].dataset_split == "test"
    assert "8. Linear(32, 2)" in card.text and "1. Conv2d(3, 8, 3x3, padding 1)" in card.text
    assert card.data.license == "cc0-1.0"  # the phantom dataset's licence travels with the model
    assert str(run.parent) not in card.content and str(Path.home()) not in card.content  # no local folders
    for png in ("confusion_matrix.png", "roc_curve.png"):
        assert f"]({png})" in card.text
        with Image.open(run / "model" / png) as img:
            assert img.format == "PNG" and img.width > 200


def test_run_folder_records_what_the_model_was_trained_on(finished_run, phantom_hub):
    import datasets

    run, _ = finished_run
    train_ids = datasets.load_dataset(str(phantom_hub), split="train")["isic_id"]
    assert (run / "train_ids.txt").read_text().split() == sorted(train_ids)
    data = json.loads((run / "data.json").read_text())
    assert data["trained_on_splits"] == ["train"]
    assert data["splits"] == {"train": 68, "validation": 13, "test": 15}
    config = (run / "config.yaml").read_text()
    assert "vgg8_widths:\n- 8\n- 16" in config


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_resume_after_a_stop_matches_an_uninterrupted_run(phantom_hub, tmp_path):
    settings = {
        "epochs": 4,
        "dropout": 0.3,
        "imbalance": "sampler",
    }  # augmentation, dropout, sampling: all random
    full = run_training(_cfg(phantom_hub, tmp_path / "full", **settings))
    stopped = run_training(_cfg(phantom_hub, tmp_path / "cut", stop_after_epoch=2, **settings))
    assert stopped.status == "stopped" and stopped.epochs == 2
    assert not (tmp_path / "cut" / "model").exists()
    resumed = run_training(_cfg(phantom_hub, tmp_path / "cut", resume=True, **settings))
    assert resumed.status == "finished" and resumed.epochs == 4
    assert resumed.test == full.test
    assert _without_timing(_log(tmp_path / "cut")) == _without_timing(_log(tmp_path / "full"))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(phantom_hub, tmp_path):
    argv = [sys.executable, TRAIN_PY, "--dataset", str(phantom_hub), *TINY_FLAGS, "--epochs", "4"]
    run_training(_cfg(phantom_hub, tmp_path / "full", epochs=4))  # the same run uninterrupted, in-process
    proc = subprocess.Popen(
        [*argv, "--output-dir", str(tmp_path / "cut")], env=_env(), stderr=subprocess.DEVNULL
    )
    marker = tmp_path / "cut" / "checkpoints" / "epoch_0002" / "trainer_state.json"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "model").exists(), "the run finished before it could be killed"
    done = subprocess.run(
        [*argv, "--output-dir", str(tmp_path / "cut"), "--resume"], env=_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    full, cut = tmp_path / "full" / "metrics" / "test.json", tmp_path / "cut" / "metrics" / "test.json"
    assert _metrics(cut) == _metrics(full)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in _log(tmp_path / "cut") if "train/loss" in r] == [1, 2, 3, 4]


def test_resume_without_checkpoint_starts_from_the_beginning(phantom_hub, tmp_path):
    result = run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, resume=True))
    assert result.status == "finished" and result.epochs == 1


def test_existing_run_needs_resume_or_overwrite(phantom_hub, tmp_path):
    run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, stop_after_epoch=1))
    with pytest.raises(StdaError, match="already holds a run; pass --resume"):
        run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1))
    with pytest.raises(StdaError, match=r"lr: 0.003 -> 0.1"):
        run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, resume=True, lr=0.1))
    again = run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, overwrite=True))
    assert again.status == "finished" and len(_log(tmp_path / "run")) == 2  # epoch 1 and the test record


def test_a_transformers_model_from_a_folder_trains_and_reloads(phantom_hub, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from stda_hf.models import load_model

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    result = run_training(_cfg(phantom_hub, tmp_path / "run", model=str(tmp_path / "vit"), epochs=1))
    assert result.status == "finished" and result.test["n"] == 15
    model, pre = load_model(tmp_path / "run")
    assert model.config.id2label == {0: "benign", 1: "malignant"} and pre.image_size == 32


# ----------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_two_process_cpu_training_with_torchrun(phantom_hub, tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += [TRAIN_PY, "--dataset", str(phantom_hub), *TINY_FLAGS, "--epochs", "2", "--output-dir", str(out)]
    done = subprocess.run(argv, env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().count("finished after 2 epoch(s)") == 1  # the main process reports
    test = json.loads((out / "metrics" / "test.json").read_text())
    assert test["n"] == 15  # predictions gathered from both processes, padding dropped
    epochs = [r for r in _log(out) if "train/loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["train/images"] >= 68 for r in epochs)  # both halves of every epoch counted
    assert (out / "checkpoints" / "epoch_0002" / "random_states_1.pkl").is_file()  # each process's RNG saved


# ----------------------------------------------------------------------------------------------------------------
# Synthetic images


def test_mix_adds_the_asked_share_of_synthetic_images_to_each_epoch(phantom_hub, tmp_path):
    result = run_training(
        _cfg(phantom_hub, tmp_path / "mix", epochs=1, synthetic="mix", synthetic_ratio=0.25)
    )
    assert result.status == "finished"
    record = next(r for r in _log(tmp_path / "mix") if "train/loss" in r)
    assert record["train/images"] == 68 + 17
    data = json.loads((tmp_path / "mix" / "data.json").read_text())
    assert data["trained_on_splits"] == ["train", "synthetic"]
    ids = (tmp_path / "mix" / "train_ids.txt").read_text().split()
    assert sum(i.startswith("syn_") for i in ids) == 24


def test_pretrain_runs_synthetic_epochs_before_real_ones(phantom_hub, tmp_path):
    cfg = _cfg(phantom_hub, tmp_path / "pre", synthetic="pretrain", pretrain_epochs=2, epochs=1)
    result = run_training(cfg)
    phases = [(r["epoch"], r["phase"], r["train/images"]) for r in _log(tmp_path / "pre") if "phase" in r]
    assert phases == [(1, "pretrain", 24), (2, "pretrain", 24), (3, "train", 68)]
    assert result.best_epoch == 3  # the model is chosen among fine-tuned epochs only


def test_synthetic_only_trains_on_the_synthetic_split_alone(phantom_hub, tmp_path):
    result = run_training(_cfg(phantom_hub, tmp_path / "only", epochs=1, synthetic="only"))
    assert result.status == "finished"
    record = next(r for r in _log(tmp_path / "only") if "train/loss" in r)
    assert record["train/images"] == 24
    data = json.loads((tmp_path / "only" / "data.json").read_text())
    assert data["trained_on_splits"] == ["synthetic"]
    ids = (tmp_path / "only" / "train_ids.txt").read_text().split()
    assert ids and all(i.startswith("syn_") for i in ids)


def test_min_confidence_keeps_only_confident_pseudo_labels(phantom_hub):
    splits = load_splits(TrainConfig(dataset=str(phantom_hub), synthetic="mix", min_confidence=0.8))
    confidences = splits.synthetic["pseudo_label_confidence"]
    assert len(confidences) == 12 and min(confidences) >= 0.8


def test_epoch_sampler_uses_every_real_image_once_plus_fresh_synthetic_draws():
    labels = [0] * 10 + [1] * 10 + [0] * 30
    sampler = EpochSampler(labels, n_always=20, n_draw=5, balanced=False, seed=3)
    epochs = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 25
        assert sorted(i for i in order if i < 20) == list(range(20))
        assert len({i for i in order if i >= 20}) == 5
        epochs.append(order)
    assert epochs[0] != epochs[1]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[0]  # the order depends on (seed, epoch) alone


def test_balanced_sampler_draws_both_classes_equally_often():
    labels = [0] * 90 + [1] * 10
    sampler = EpochSampler(labels, n_always=100, n_draw=0, balanced=True, seed=0)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [labels[i] for i in sampler]
    assert np.mean(drawn) == pytest.approx(0.5, abs=0.05)


def test_class_weights_are_inverse_class_frequencies():
    weights = class_weights([0] * 30 + [1] * 10, n_always=40, n_draw=0)
    assert weights.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    # 10 real (5/5) plus 10 of 20 synthetic (all malignant) drawn per epoch: expected 5 benign, 15 malignant
    weights = class_weights([0] * 5 + [1] * 5 + [1] * 20, n_always=10, n_draw=10)
    assert weights.tolist() == pytest.approx([20 / (2 * 5), 20 / (2 * 15)])


def test_learning_rate_schedules_restart_at_fine_tuning():
    cosine = TrainConfig(lr=1.0, epochs=4, schedule="cosine", synthetic="pretrain", pretrain_epochs=2)
    assert [round(learning_rate(cosine, e), 4) for e in range(1, 7)] == [1.0, 0.5, 1.0, 0.8536, 0.5, 0.1464]
    step = TrainConfig(lr=1.0, epochs=5, schedule="step", step_size=2, gamma=0.5, warmup_epochs=1)
    assert [learning_rate(step, e) for e in range(1, 6)] == [0.5, 1.0, 1.0, 0.5, 0.5]


# ----------------------------------------------------------------------------------------------------------------
# The evaluation hook


def test_evaluation_hook_sees_real_validation_images_with_masks_and_its_numbers_are_logged(
    phantom_hub, tmp_path
):
    calls = []

    def on_evaluate(ctx):
        calls.append((ctx.split, ctx.epoch, len(ctx.dataset), ctx.model.training))
        assert {"mask", "artifact_mask", "isic_id"} <= set(ctx.dataset.column_names)
        assert set(ctx.dataset["origin"]) == {"real"}
        image = ctx.transform(ctx.dataset[0]["image"].convert("RGB"))
        assert image.shape == (3, ctx.preprocessing.image_size, ctx.preprocessing.image_size)
        return {"relevance_in_mask": 0.25 * ctx.epoch}

    run_training(_cfg(phantom_hub, tmp_path / "hook", epochs=2), on_evaluate=on_evaluate)
    assert [c[:3] for c in calls] == [("validation", 1, 13), ("validation", 2, 13), ("test", calls[2][1], 15)]
    assert not any(c[3] for c in calls)  # the model is in eval mode
    assert [r.get("validation/relevance_in_mask") for r in _log(tmp_path / "hook")[:2]] == [0.25, 0.5]
    test = json.loads((tmp_path / "hook" / "metrics" / "test.json").read_text())
    assert test["relevance_in_mask"] == 0.25 * calls[2][1]


# ----------------------------------------------------------------------------------------------------------------
# Push


@pytest.fixture
def local_hub(monkeypatch):
    """The project's Hub-protocol test server on 127.0.0.1, with huggingface_hub pointed at it."""
    import huggingface_hub.constants as hf_constants

    sys.path.insert(0, str(ROOT / "tests"))
    import hub_server

    def lfs_batch_of_model(self, body: bytes, repo: str) -> None:
        self._lfs_batch(body=body, type="models", repo=repo)

    # model repos have no type prefix in their git-LFS URL (/<owner>/<name>.git/...); dataset repos do
    model_route = ("POST", r"/(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch", "lfs_batch_of_model")
    monkeypatch.setattr(hub_server._Handler, "ROUTES", (model_route, *hub_server._Handler.ROUTES))
    monkeypatch.setattr(hub_server._Handler, "_lfs_batch_of_model", lfs_batch_of_model, raising=False)
    with hub_server.HubServer(token="hf_test_secret") as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
        yield hub


def test_push_to_hub_uploads_the_model_folder(phantom_hub, tmp_path, local_hub, capsys, caplog):
    cfg = _cfg(phantom_hub, tmp_path / "run", epochs=1, push_to_hub=True, hub_model_id="me/vgg8-phantoms")
    run_training(cfg)
    files = local_hub.files("me/vgg8-phantoms", repo_type="models")
    expected = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "roc_curve.png"}
    assert expected <= set(files)
    assert files["model.safetensors"] == (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    assert not any(name.startswith("checkpoints") for name in files)
    out = capsys.readouterr()
    assert "hf_test_secret" not in out.out + out.err + caplog.text


def test_refused_push_names_the_repo_and_not_the_token(finished_run, local_hub, monkeypatch):
    from stda_hf.training import push_run

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret")
    with pytest.raises(StdaError, match=r"push to me/vgg8 failed \(HTTP 401\)") as err:
        push_run(finished_run[0] / "model", "me/vgg8")
    assert "hf_wrong_secret" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def _write_hub(folder: Path, columns: dict[str, dict], features) -> Path:
    """A Hub-layout folder with one Parquet shard per split, for datasets the packager would never write."""
    import datasets

    for split, data in columns.items():
        ds = datasets.Dataset.from_dict(data, features=features)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def _png(seed: int) -> dict:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return {"bytes": buf.getvalue(), "path": None}


def test_dataset_without_a_label_column_is_refused_naming_the_columns_found(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "diagnosis": datasets.Value("string")})
    rows = {"image": [_png(i) for i in range(4)], "diagnosis": ["nevus", "melanoma"] * 2}
    hub = _write_hub(tmp_path / "hub", {"train": rows, "validation": rows}, features)
    with pytest.raises(StdaError, match=r"lacks column\(s\) \['label'\]; found \['image', 'diagnosis'\]"):
        load_splits(TrainConfig(dataset=str(hub)))


def test_synthetic_images_in_validation_are_refused(tmp_path):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["benign", "malignant"]),
         "origin": datasets.Value("string")}
    )  # fmt: skip
    real = {"image": [_png(i) for i in range(4)], "label": [0, 1, 0, 1], "origin": ["real"] * 4}
    mixed = {**real, "origin": ["real", "synthetic", "real", "synthetic"]}
    hub = _write_hub(tmp_path / "hub", {"train": real, "validation": mixed}, features)
    with pytest.raises(StdaError, match=r"'validation' holds 2 non-real image\(s\)"):
        load_splits(TrainConfig(dataset=str(hub)))


def test_undecodable_images_are_skipped_and_reported(tmp_path):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["benign", "malignant"]),
         "isic_id": datasets.Value("string")}
    )  # fmt: skip
    images = [_png(i) for i in range(8)]
    images[3] = {"bytes": images[3]["bytes"][:60], "path": None}  # truncated PNG
    rows = {"image": images, "label": [0, 1] * 4, "isic_id": [f"ISIC_{i}" for i in range(8)]}
    hub = _write_hub(tmp_path / "hub", {"train": rows, "validation": rows, "test": rows}, features)
    result = run_training(_cfg(hub, tmp_path / "run", epochs=1))
    assert result.test["n"] == 7
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())["skipped"]
    assert set(skipped) == {"train row 3 (ISIC_3)", "validation row 3 (ISIC_3)", "test row 3 (ISIC_3)"}


def test_mix_without_a_synthetic_split_is_refused(phantom_hub_real):
    with pytest.raises(
        StdaError, match=r"needs a 'synthetic' split, but .* has only \['test', 'train', 'validation'\]"
    ):
        load_splits(TrainConfig(dataset=str(phantom_hub_real), synthetic="mix"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--synthetic", "sometimes"],
            "--synthetic 'sometimes' is not valid; choose one of ['none', 'mix', 'pretrain', 'only']",
        ),
        (["--optimizer", "adam"], "--optimizer 'adam' is not valid; choose one of ['adamw', 'sgd']"),
        (["--lr", "0"], "--lr must be a positive number; got 0.0"),
        (["--min-confidence", "2"], "--min-confidence must be between 0 and 1; got 2.0"),
        (["--push-to-hub"], "--push-to-hub needs --hub-model-id"),
        (["--dataset", "no/such/folder"], "dataset folder no/such/folder not found"),
        (["--model", "resnet5"], "unknown model 'resnet5'"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(flags, message, tmp_path, phantom_hub, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train

    monkeypatch.chdir(tmp_path)
    code = train.main(["--dataset", str(phantom_hub), *TINY_FLAGS, "--output-dir", "run", *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err


def test_non_finite_loss_stops_the_run_with_advice():
    from stda_hf.training.step import _epoch_stats

    with pytest.raises(StdaError, match=r"training loss became nan in epoch 3.*Lower --lr"):
        _epoch_stats(float("nan"), 32.0, 0.1, 0.2, 3)


def test_other_column_names_and_a_seven_class_label_map_train(tmp_path):
    import datasets

    dx = ["nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]
    features = datasets.Features({"img": datasets.Image(), "dx": datasets.ClassLabel(names=dx),
                                  "age_approx": datasets.Value("int32")})  # fmt: skip
    rows = {
        "img": [_png(i) for i in range(14)],
        "dx": list(range(7)) * 2,
        "age_approx": [35, 47, 52, 68] * 3 + [20, 81],
    }
    hub = _write_hub(tmp_path / "hub", {"train": rows, "validation": rows, "test": rows}, features)
    mapping = "nv:benign,bkl:benign,df:benign,vasc:benign,mel:malignant,bcc:malignant,akiec:malignant"
    flags = {
        "image_column": "img",
        "label_column": "dx",
        "label_map": mapping,
        "epochs": 1,
        "explain_images": 0,
    }
    splits = load_splits(_cfg(hub, tmp_path / "run", **flags))
    assert splits.train.features["label"].names == ["benign", "malignant"]
    assert splits.train["label"] == [0, 1, 0, 1, 1, 0, 0] * 2
    result = run_training(_cfg(hub, tmp_path / "run", **flags))
    assert result.test["n"] == 14
    ages = json.loads((tmp_path / "run" / "metrics" / "test_subgroups.json").read_text())["age_approx"]
    assert {k: int(v["n"]) for k, v in ages.items()} == {
        "20-29": 1,
        "30-39": 3,
        "40-49": 3,
        "50-59": 3,
        "60-69": 3,
        "80-89": 1,
    }


def test_a_label_value_left_out_of_the_label_map_is_refused_by_name(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "dx": datasets.Value("string")})
    rows = {"image": [_png(i) for i in range(3)], "dx": ["nv", "mel", "scc"]}
    hub = _write_hub(tmp_path / "hub", {"train": rows, "validation": rows}, features)
    cfg = TrainConfig(dataset=str(hub), label_column="dx", label_map="nv:benign,mel:malignant")
    with pytest.raises(StdaError, match=r"does not map label value\(s\) \['scc'\]"):
        load_splits(cfg)


def test_accelerate_launch_settings_apply_unless_a_flag_is_given(phantom_hub, tmp_path):
    import yaml

    # what `accelerate launch --mixed_precision bf16 --gradient_accumulation_steps 2 train.py` sets
    env = {**_env(), "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}
    base = [
        sys.executable,
        TRAIN_PY,
        "--dataset",
        str(phantom_hub),
        *TINY_FLAGS,
        "--epochs",
        "1",
        "--explain-images",
        "0",
    ]
    for name, flags in (("launcher", []), ("flags", ["--mixed-precision", "no", "--grad-accum", "1"])):
        proc = subprocess.run(
            [*base, "--output-dir", str(tmp_path / name), *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    launched = yaml.safe_load((tmp_path / "launcher" / "config.yaml").read_text())
    flagged = yaml.safe_load((tmp_path / "flags" / "config.yaml").read_text())
    assert (launched["mixed_precision"], launched["grad_accum"]) == ("bf16", 2)
    assert (flagged["mixed_precision"], flagged["grad_accum"]) == ("no", 1)


def test_with_tracking_reports_to_tensorboard(phantom_hub, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(
        _cfg(
            phantom_hub,
            tmp_path / "run",
            epochs=1,
            explain_images=0,
            with_tracking=True,
            report_to="tensorboard",
        )
    )
    events = sorted((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    tags = {t for e in events for t in EventAccumulator(str(e)).Reload().Tags()["scalars"]}
    assert {"validation/roc_auc", "train/loss", "test/roc_auc"} <= tags


def test_without_tracking_only_the_jsonl_log_is_written(phantom_hub, tmp_path):
    run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, explain_images=0))
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "log.jsonl").is_file()


def test_an_unknown_tracker_is_refused_with_the_known_ones():
    from stda_hf.training.config import check_report_to

    with pytest.raises(StdaError, match=r"unknown tracker\(s\) \['tensorbored'\]; choose from \['all', "):
        check_report_to("tensorbored")


TRACKER_REFUSALS = """
import sys
import accelerate.tracking
sys.path.insert(0, sys.argv[1])
import train
flags = ["--dataset", "no/such/folder", "--output-dir", sys.argv[2], "--with-tracking", "--report-to"]
code = train.main([*flags, "wandb"])
print("wandb", code, file=sys.stderr)
accelerate.tracking._available_trackers.remove(accelerate.tracking.LoggerType.TENSORBOARD)  # the plain wheel
code = train.main([*flags, "tensorboard"])
print("tensorboard", code, file=sys.stderr)
"""


def test_a_tracker_that_is_not_installed_exits_2_with_one_line_before_any_accelerator(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", TRACKER_REFUSALS, str(ROOT), str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [
        "train.py: error: --report-to: tracker(s) ['wandb'] are not installed",
        "wandb 2",
        "train.py: error: --report-to: tracker(s) ['tensorboard'] are not installed (pip install 'stda-hf[tracking]')",
        "tensorboard 2",
    ]


@pytest.mark.parametrize("client", ["httpx", "httpx2"])
def test_http_request_lines_of_the_hub_client_are_held_back_unless_verbose(client, caplog):
    from stda_hf.training import quiet_loggers

    http = logging.getLogger(client)
    saved = http.level
    try:
        with caplog.at_level(logging.INFO):
            quiet_loggers(verbose=False)
            http.info('HTTP Request: GET http://127.0.0.1/api/datasets/stda/skin-lesions "HTTP/1.1 200 OK"')
            assert caplog.records == []
            quiet_loggers(verbose=True)
            http.setLevel(logging.NOTSET)
            http.info("HTTP Request: HEAD http://127.0.0.1/x")
            assert [r.name for r in caplog.records] == [client]
    finally:
        http.setLevel(saved)


def test_accelerate_launch_cpu_with_two_processes_says_it_trains_one(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN_PY,
         "--dataset", "no/such/folder", "--output-dir", str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert "accelerate launch --cpu started ONE process" in proc.stderr, proc.stderr[-2000:]
    assert "train.py: error: dataset folder no/such/folder not found" in proc.stderr


def test_no_lone_process_warning_for_real_multi_process_or_plain_runs():
    from stda_hf.training.command import lone_cpu_process

    launched = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert lone_cpu_process(launched) is not None
    assert lone_cpu_process({**launched, "WORLD_SIZE": "2", "RANK": "0"}) is None  # torchrun
    assert lone_cpu_process({"ACCELERATE_USE_CPU": "True"}) is None  # accelerate launch --cpu, one process
    assert lone_cpu_process({"MASTER_PORT": "29500"}) is None  # python train.py on a cluster node


def test_evaluation_of_a_bf16_run_is_measured_in_float32_as_the_saved_model_predicts():
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils.data import DataLoader, TensorDataset

    from stda_hf.models import build_model
    from stda_hf.training.step import predict

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = build_model("vgg8", "random", seed=0, widths=(8, 16, 16, 32, 32), hidden=(32, 32)).eval()
        saved = copy.deepcopy(model)
        prepared = accelerator.prepare(model)
        x, y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
        logits, labels = predict(
            prepared, accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=4)), accelerator
        )
        with torch.no_grad():
            expected = saved(x).logits
            under_autocast = prepared(x).logits  # training steps still run in bf16
        assert torch.allclose(logits, expected, rtol=0, atol=1e-6) and torch.equal(labels, y)
        assert not torch.allclose(under_autocast, expected, rtol=0, atol=1e-4)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_dataset_card_licence_other_links_to_the_dataset_repo_file_not_a_missing_local_one(tmp_path):
    from stda_hf.training.model_card import dataset_card_facts

    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: isic-mixed\nlicense_link: LICENSE\n---\n\n"
        'Load it with `load_dataset("stda/skin-lesions")`.\n'
    )
    facts = dataset_card_facts(str(tmp_path), revision="abc123")
    assert facts == {
        "hub_id": "stda/skin-lesions",
        "license": "other",
        "license_name": "isic-mixed",
        "license_link": "https://huggingface.co/datasets/stda/skin-lesions/blob/abc123/LICENSE",
    }


# ----------------------------------------------------------------------------------------------------------------
# The flags of transformers' run_image_classification_no_trainer.py


def _parsed(argv: list[str]) -> TrainConfig:
    from stda_hf.core.config import config_from_args
    from stda_hf.training.command import get_args_parser, hyphen_spelling

    return config_from_args(TrainConfig, get_args_parser().parse_args(hyphen_spelling(argv)))


def test_the_example_scripts_flags_mean_what_ours_mean():
    theirs = _parsed(
        ["--dataset_name", "org/data", "--model_name_or_path", "vgg11", "--output_dir", "out",
         "--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size=16",
         "--learning_rate", "5e-05", "--weight_decay", "0.0", "--seed", "42", "--image_column_name", "img",
         "--label_column_name", "dx", "--with_tracking", "--report_to", "tensorboard", "--push_to_hub",
         "--hub_model_id", "me/m", "--gradient_accumulation_steps", "2", "--max_train_samples", "100",
         "--max_eval_samples", "20", "--train_val_split", "0.2"]
    )  # fmt: skip
    ours = _parsed(
        ["--dataset", "org/data", "--model", "vgg11", "--output-dir", "out", "--epochs", "3", "--batch-size", "8",
         "--eval-batch-size", "16", "--lr", "5e-05", "--weight-decay", "0.0", "--seed", "42", "--image-column",
         "img", "--label-column", "dx", "--with-tracking", "--report-to", "tensorboard", "--push-to-hub",
         "--hub-model-id", "me/m", "--grad-accum", "2", "--max-train-samples", "100", "--max-eval-samples",
         "20", "--train-val-split", "0.2"]
    )  # fmt: skip
    assert theirs == ours
    assert (ours.epochs, ours.batch_size, ours.eval_batch_size, ours.lr, ours.grad_accum) == (
        3,
        8,
        16,
        5e-05,
        2,
    )


def test_help_documents_the_hyphen_spelling_and_names_the_example_spellings():
    from stda_hf.training.command import get_args_parser

    text = get_args_parser().format_help()
    assert "--output-dir" in text and "--output_dir OUTPUT_DIR" not in text
    assert "--per_device_train_batch_size (--batch-size)" in " ".join(text.split())


def test_only_option_names_change_spelling():
    from stda_hf.training.command import hyphen_spelling

    argv = ["--label_map", "a_b:benign", "--output_dir=my_run", "--", "--not_a_flag"]
    assert hyphen_spelling(argv) == ["--label-map", "a_b:benign", "--output-dir=my_run", "--", "--not_a_flag"]


def _class_folder(root: Path, n: int) -> Path:
    for k, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((32, 32, 3), 60 + 120 * k + i, np.uint8)).save(
                root / name / f"{name}{i}.png"
            )
    return root


def test_train_dir_with_the_example_flags_splits_off_validation_and_caps_the_samples(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    folder = _class_folder(tmp_path / "images", 30)
    code = train.main(
        ["--train_dir", str(folder), "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "1",
         "--max_train_samples", "40", "--max_eval_samples", "5", "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "4", "--image_size", "32", "--vgg8_widths", "4", "8", "8", "16", "16",
         "--vgg8_hidden", "16", "16", "--num_workers", "0", "--explain_images", "0"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert record["dataset"] == str(folder) and record["splits"] == {"train": 40, "validation": 5}


def test_split_off_validation_keeps_each_lesion_on_one_side():
    import datasets

    from stda_hf.training.data import split_off_validation

    lesions = [f"L{i // 3}" for i in range(60)]  # 20 lesions, 3 images each
    ds = datasets.Dataset.from_dict({"lesion_id": lesions, "label": [i % 2 for i in range(60)]})
    train, validation = split_off_validation(ds, 0.15, seed=0)
    assert len(train) + len(validation) == 60 and len(validation) == 9  # 3 whole lesions: 15 % of 60
    assert not set(train["lesion_id"]) & set(validation["lesion_id"])
    assert split_off_validation(ds, 0.15, seed=0)[1]["lesion_id"] == validation["lesion_id"]  # seeded


def test_resume_from_an_earlier_checkpoint_replays_the_same_run(phantom_hub, tmp_path):
    settings = {"epochs": 4, "keep_checkpoints": 4, "dropout": 0.3, "explain_images": 0}
    first = run_training(_cfg(phantom_hub, tmp_path / "run", **settings))
    weights = _weights(tmp_path / "run")
    earlier = tmp_path / "run" / "checkpoints" / "epoch_0002"
    again = run_training(_cfg(phantom_hub, tmp_path / "run", resume_from_checkpoint=str(earlier), **settings))
    assert again.epochs == 4 and again.best_epoch == first.best_epoch and again.test == first.test
    assert [r["epoch"] for r in _log(tmp_path / "run") if "train/loss" in r] == [1, 2, 3, 4]
    assert all(torch.equal(weights[k], v) for k, v in _weights(tmp_path / "run").items())


def test_resume_from_checkpoint_takes_latest_or_a_checkpoint_of_the_run(phantom_hub, tmp_path):
    assert _parsed(["--resume_from_checkpoint", "latest"]).resume is True
    run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, stop_after_epoch=1, explain_images=0))
    with pytest.raises(StdaError, match=r"not an epoch checkpoint of the run in .*found: \['epoch_0001'\]"):
        run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, resume_from_checkpoint=str(tmp_path)))
    done = run_training(_cfg(phantom_hub, tmp_path / "run", epochs=1, resume_from_checkpoint="latest"))
    assert done.status == "finished" and done.epochs == 1


def test_max_train_steps_overrides_epochs_and_stops_the_last_epoch_part_way(phantom_hub, tmp_path):
    full = run_training(_cfg(phantom_hub, tmp_path / "probe", epochs=1, explain_images=0))
    per_epoch = -(-json.loads((tmp_path / "probe" / "data.json").read_text())["splits"]["train"] // 16)
    result = run_training(
        _cfg(phantom_hub, tmp_path / "run", epochs=30, max_train_steps=per_epoch + 2, explain_images=0)
    )
    images = [r["train/images"] for r in _log(tmp_path / "run") if "train/images" in r]
    assert full.epochs == 1 and result.epochs == 2 and len(images) == 2
    assert images[1] == 2 * 16 < images[0]
    assert "`epochs=2`" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_max_train_steps_with_pretrain_is_refused():
    from stda_hf.training.config import check_config

    with pytest.raises(StdaError, match="--max-train-steps counts the steps of one phase"):
        check_config(TrainConfig(synthetic="pretrain", max_train_steps=10))


class _Killed(Exception):
    """Stands for a kill right after a step checkpoint."""


def test_a_run_killed_mid_epoch_resumes_from_its_step_checkpoint_without_redoing_its_batches(
    phantom_hub, tmp_path, monkeypatch
):
    import stda_hf.training.run as run_module

    settings = {"epochs": 3, "dropout": 0.3, "checkpointing_steps": "2", "explain_images": 0}
    run_training(_cfg(phantom_hub, tmp_path / "full", **settings))
    assert not list((tmp_path / "full" / "checkpoints").glob("step_*"))  # superseded by epoch checkpoints
    real_saver = run_module.step_saver

    def killing_saver(accelerator, run_dir, every, epoch, batches, accum, state):
        save = real_saver(accelerator, run_dir, every, epoch, batches, accum, state)

        def save_then_die(progress):
            save(progress)
            if list((run_dir / "checkpoints").glob("step_0002_*")):  # part-way through epoch 2
                raise _Killed

        return save_then_die

    monkeypatch.setattr(run_module, "step_saver", killing_saver)
    with pytest.raises(_Killed):
        run_training(_cfg(phantom_hub, tmp_path / "cut", **settings))
    monkeypatch.setattr(run_module, "step_saver", real_saver)
    (step,) = (tmp_path / "cut" / "checkpoints").glob("step_*")
    assert (
        step.name.startswith("step_0002_") and not (tmp_path / "cut" / "checkpoints" / "epoch_0002").exists()
    )
    from stda_hf.training.resume import latest_resumable, read_progress

    assert latest_resumable(tmp_path / "cut", processes=1) == step and read_progress(step, 0).batches > 0
    resumed = run_training(_cfg(phantom_hub, tmp_path / "cut", resume=True, **settings))
    cut, full = _log(tmp_path / "cut"), _log(tmp_path / "full")
    assert resumed.epochs == 3 and [r["epoch"] for r in cut] == [r["epoch"] for r in full]
    assert cut[0] == full[0] or _without_timing(cut[:1]) == _without_timing(full[:1])  # epoch 1 untouched
    assert [r.get("train/images") for r in cut] == [r.get("train/images") for r in full]  # no batch twice
    assert not list((tmp_path / "cut" / "checkpoints").glob("step_*"))


def test_checkpointing_steps_takes_epoch_or_a_positive_number():
    from stda_hf.training.config import check_config

    check_config(TrainConfig(checkpointing_steps="epoch"))
    check_config(TrainConfig(checkpointing_steps="50"))
    for bad in ("0", "often", "-3"):
        with pytest.raises(StdaError, match=f"--checkpointing-steps '{bad}': give 'epoch' or a positive"):
            check_config(TrainConfig(checkpointing_steps=bad))


def test_model_card_says_its_metrics_are_float32_and_the_training_precision():
    from stda_hf.training.model_card import _precision_note

    assert (
        _precision_note({"mixed_precision": "no"})
        == "Metrics measured in float32, as the published model predicts."
    )
    assert _precision_note({"mixed_precision": "bf16"}).endswith("(training used bf16 mixed precision).")
