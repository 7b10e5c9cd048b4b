"""load_dataset("stda/skin-lesions") by repo id: the packaged folder served as a git repo by the olah mirror.

olah runs in a subprocess on a free 127.0.0.1 port with ``offline = true`` and ``mirrors-path`` pointing at a
folder holding ``datasets/stda/skin-lesions`` (a git repository on branch ``main``). The loading runs in a
fresh Python with ``HF_ENDPOINT`` set before ``datasets`` is imported and the offline switches of the test
session removed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_VGG8
from test_package import write_synthetic

from stda_hf.core.fileio import read_jsonl
from stda_hf.dataset.packaging import package
from stda_hf.dataset_script import FEATURES

REPO_ID = "stda/skin-lesions"
LOADER = """
import json, sys
import datasets
mode = sys.argv[1]
if mode == "full":
    ds = datasets.load_dataset("stda/skin-lesions")
    row = ds["synthetic"][0]
    out = {
        "rows": {k: v.num_rows for k, v in ds.items()},
        "features": ds["train"].features.to_dict(),
        "first_synthetic": [row["isic_id"], row["content_isic_id"], row["image"].size],
    }
else:
    stream = datasets.load_dataset("stda/skin-lesions", split="synthetic", streaming=True)
    rows = list(stream)
    out = {
        "kind": type(stream).__name__,
        "features": stream.features.to_dict(),
        "ids": [r["isic_id"] for r in rows],
        "labels": [r["label"] for r in rows],
        "sizes": [list(r["image"].size) for r in rows],
    }
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_repo(folder: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@127.0.0.1"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@127.0.0.1")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "stda package"]):
        subprocess.run(["git", *cmd], cwd=folder, env=env, check=True)


@pytest.fixture(scope="module")
def mirror(phantom_real_session, tmp_path_factory):
    """The packaged folder (real + synthetic) served by olah; yields the endpoint URL and the synthetic folder."""
    tmp = tmp_path_factory.mktemp("olah")
    synthetic = write_synthetic(phantom_real_session, tmp / "synthetic")
    repo = tmp / "mirrors" / "datasets" / REPO_ID
    package(phantom_real_session, tmp / "hub", synthetic=synthetic)
    shutil.copytree(tmp / "hub", repo)
    git_repo(repo)
    url, proc = start_olah(tmp, f"/api/datasets/{REPO_ID}/revision/main")
    try:
        yield {"url": url, "synthetic": synthetic, "home": tmp / "hf-home", "repo": repo}
    finally:
        stop(proc)


def load_by_repo_id(mirror: dict, mode: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=mirror["url"], HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_load_dataset_by_repo_id_through_the_mirror(mirror, phantom_real_session, tmp_path):
    result = load_by_repo_id(mirror, "full", tmp_path / "hf-home")
    manifest = read_jsonl(mirror["synthetic"] / "manifest.jsonl")
    splits = (phantom_real_session / "splits.csv").read_text().splitlines()[1:]
    count = {s: sum(line.split(",")[1] == s for line in splits) for s in ("train", "validation", "test")}
    expected = {"train": count["train"], "synthetic": len(manifest), "validation": count["validation"]}
    expected["test"] = count["test"]
    assert list(result["rows"].items()) == list(expected.items())
    assert result["features"] == FEATURES.to_dict()
    first = min(manifest, key=lambda r: r["id"])
    assert result["first_synthetic"] == [first["id"], first["content_id"], [32, 32]]


def test_streaming_by_repo_id_through_the_mirror(mirror, tmp_path):
    result = load_by_repo_id(mirror, "stream", tmp_path / "hf-home")
    labels = {r["id"]: r["label"] for r in read_jsonl(mirror["synthetic"] / "labels.jsonl")}
    assert result["kind"] == "IterableDataset"
    assert result["features"] == FEATURES.to_dict()
    assert result["ids"] == sorted(labels)
    assert [["benign", "malignant"][i] for i in result["labels"]] == [labels[i] for i in sorted(labels)]
    assert result["sizes"] == [[32, 32]] * len(labels)


def test_training_by_dataset_id_records_its_commit_and_licence_without_request_lines(mirror, tmp_path):
    import yaml
    from huggingface_hub import DatasetCard

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=mirror["url"], HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
    env.update(OMP_NUM_THREADS="1", STDA_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), "--dataset", REPO_ID, "--output-dir", "run", "--epochs", "1",
         "--image-size", "32", "--vgg8-widths", "4", "8", "8", "16", "16", "--vgg8-hidden", "16", "16",
         "--batch-size", "16", "--num-workers", "0", "--explain-images", "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HTTP Request" not in proc.stderr
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=mirror["repo"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dataset_card = DatasetCard.load(mirror["repo"] / "README.md").data
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == dataset_card.license and header["license"] not in ("other", "unknown")
    assert "license_link" not in header
    (result,) = header["model-index"][0]["results"]
    assert result["dataset"]["revision"] == commit and result["dataset"]["name"] == REPO_ID
    assert json.loads((tmp_path / "run" / "data.json").read_text())["revision"] == commit


# ----------------------------------------------------------------------------------------------------------------
# A trained model by id: AutoModelForImageClassification and pipeline, without stda_hf importable

MODEL_ID = "stda/vgg8-stda"
MODEL_LOADER = """
import importlib.abc, json, sys

class NoStda(importlib.abc.MetaPathFinder):  # the user has transformers, not stda-hf
    def find_spec(self, name, path=None, target=None):
        if name == "stda_hf" or name.startswith("stda_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, NoStda())
import datasets, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

model_id, hub = sys.argv[1], sys.argv[2]
images = [im.convert("RGB") for im in datasets.load_dataset(hub, split="test")["image"]]
classifier = pipeline("image-classification", model=model_id, trust_remote_code=True)
scores = [{r["label"]: r["score"] for r in classifier(im)}["malignant"] for im in images]
model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)
with torch.no_grad():
    logits = model(**processor(images, return_tensors="pt")).logits
out = {"scores": scores, "logits": logits.tolist(), "labels": model.config.id2label,
       "stda_loaded": [m for m in sys.modules if m.startswith("stda_hf")]}
print("RESULT " + json.dumps(out))
"""


def start_olah(tmp: Path, probe: str) -> tuple[str, subprocess.Popen]:
    """olah serving ``tmp/mirrors`` (offline) on a free port, answering ``probe``; returns (url, process)."""
    port = free_port()
    config = tmp / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp / "repos"}"\n'
        f'mirrors-path = ["{tmp / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    olah = Path(sys.executable).with_name("olah-cli")
    proc = subprocess.Popen(
        [str(olah), "-c", str(config), "--log-path", str(tmp / "logs")],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"olah exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + probe, timeout=2) as resp:
                if resp.status == 200:
                    return url, proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"olah did not answer {probe} on {url}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served_model(phantom_real_session, tmp_path_factory):
    """A train.py run on the packaged phantoms; its model/ folder served by olah as ``stda/vgg8-stda``."""
    from stda_hf.training import TrainConfig, run_training

    tmp = tmp_path_factory.mktemp("olah-model")
    package(phantom_real_session, tmp / "hub")
    cfg = TrainConfig(
        **TINY_VGG8, dataset=str(tmp / "hub"), output_dir=str(tmp / "run"), epochs=2, explain_images=0,
        hub_model_id=MODEL_ID,
    )  # fmt: skip
    result = run_training(cfg)
    repo = tmp / "mirrors" / "models" / MODEL_ID
    shutil.copytree(tmp / "run" / "model", repo)
    git_repo(repo)
    url, proc = start_olah(tmp, f"/api/models/{MODEL_ID}/revision/main")
    server, proxy, _ = range_proxy(url, tmp / "mirrors")
    try:
        yield {
            "url": proxy,
            "hub": tmp / "hub",
            "run": tmp / "run",
            "result": result,
            "home": tmp / "hf-home",
        }
    finally:
        server.shutdown()
        stop(proc)


def test_pipeline_by_model_id_reproduces_train_py_test_metrics_without_stda_hf(served_model):
    import torch

    from stda_hf.metrics import load_metric
    from stda_hf.training.step import compute_metrics

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=served_model["url"], HF_HOME=str(served_model["home"]), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH="")  # stda_hf neither on the path nor importable
    proc = subprocess.run(
        [sys.executable, "-c", MODEL_LOADER, MODEL_ID, str(served_model["hub"])],
        env=env, capture_output=True, text=True, timeout=300, cwd=served_model["home"].parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(
        next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert out["stda_loaded"] == [] and out["labels"] == {"0": "benign", "1": "malignant"}
    import datasets

    labels = torch.tensor(datasets.load_dataset(str(served_model["hub"]), split="test")["label"])
    logits = torch.tensor(out["logits"])
    assert torch.allclose(logits.softmax(-1)[:, 1], torch.tensor(out["scores"]), atol=1e-6)
    ours = compute_metrics(logits, labels, load_metric())
    theirs = json.loads((served_model["run"] / "metrics" / "test.json").read_text())
    assert [ours[k] for k in ("tn", "fp", "fn", "tp")] == [theirs[k] for k in ("tn", "fp", "fn", "tp")]
    assert ours["roc_auc"] == pytest.approx(theirs["roc_auc"], abs=1e-6)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_model_card_says_how_to_use_the_model_by_id(served_model):
    from huggingface_hub import ModelCard

    card = ModelCard.load(served_model["run"] / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert f'pipeline("image-classification", model="{MODEL_ID}", trust_remote_code=True)' in card.text
    assert card.data.datasets == ["stda/skin-lesions"]  # trained from a local copy whose card names its id


EXAMPLE_FINE_TUNE = """
import importlib.abc, json, os, sys

class NoStda(importlib.abc.MetaPathFinder):  # the user has transformers, not stda-hf
    def find_spec(self, name, path=None, target=None):
        if name == "stda_hf" or name.startswith("stda_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, NoStda())
import torch
from datasets import load_dataset
from torch.utils.data import DataLoader
from torchvision.transforms import (
    CenterCrop, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor,
)
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

# run_image_classification_no_trainer.py, step by step, with its flags
# --model_name_or_path <id> --train_dir <dir> --trust_remote_code True --ignore_mismatched_sizes
# --learning_rate 1e-3 --per_device_train_batch_size 8 --num_train_epochs 12 --seed 0
model_name_or_path, train_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
dataset = load_dataset("imagefolder", data_files={"train": os.path.join(train_dir, "**")})
labels = dataset["train"].features["label"].names
label2id = {label: str(i) for i, label in enumerate(labels)}
id2label = {str(i): label for i, label in enumerate(labels)}
config = AutoConfig.from_pretrained(
    model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id,
    finetuning_task="image-classification", trust_remote_code=True,
)
image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(
    model_name_or_path, config=config, ignore_mismatched_sizes=True, trust_remote_code=True,
)
head = model.classifier[-1].weight.detach().clone()
with torch.no_grad():
    zero_loss = float(model(torch.zeros(1, 3, 32, 32), labels=torch.tensor([0])).loss)

if "shortest_edge" in image_processor.size:
    size = image_processor.size["shortest_edge"]
else:
    size = (image_processor.size["height"], image_processor.size["width"])
normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

def preprocess_train(example_batch):
    example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
    return example_batch

def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}

train_dataloader = DataLoader(
    dataset["train"].with_transform(preprocess_train), shuffle=True, collate_fn=collate_fn, batch_size=8
)
no_decay = ["bias", "LayerNorm.weight"]
groups = [
    {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
]
optimizer = torch.optim.AdamW(groups, lr=1e-3)
epoch_losses = []
for epoch in range(12):
    model.train()
    total = 0.0
    for batch in train_dataloader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total += float(loss) * len(batch["labels"])
    epoch_losses.append(total / len(dataset["train"]))
val_pixels = val_transforms(dataset["train"][0]["image"].convert("RGB"))
out = {
    "size": image_processor.size, "labels": model.config.id2label, "zero_loss": zero_loss,
    "head_finite": bool(torch.isfinite(head).all()), "head_max": float(head.abs().max()),
    "head_std": float(head.std()), "epoch_losses": epoch_losses,
    "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    "val_shape": list(val_pixels.shape), "stda_loaded": [m for m in sys.modules if m.startswith("stda_hf")],
}
print("RESULT " + json.dumps(out))
"""


def three_class_folder(root: Path, per_class: int = 8) -> Path:
    """An ImageFolder of three classes told apart by colour (48 px noisy images, a red, green, blue cast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("bcc", "mel", "nv")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 96, (48, 48, 3))
            pixels[..., k] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def test_transformers_example_fine_tunes_our_vgg8_by_id_on_three_classes(served_model, tmp_path):
    train_dir = three_class_folder(tmp_path / "ham3")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=served_model["url"], HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", EXAMPLE_FINE_TUNE, MODEL_ID, str(train_dir)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(
        next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert out["stda_loaded"] == [] and out["labels"] == {"0": "bcc", "1": "mel", "2": "nv"}
    assert out["size"] == {"height": 32, "width": 32} and out["val_shape"] == [3, 32, 32]
    assert out["head_finite"] and 1e-4 < out["head_std"] and out["head_max"] < 1.0  # PyTorch's Linear init
    assert out["zero_loss"] < 10.0  # a fresh 3-way head: about ln 3, not 1e25
    losses = out["epoch_losses"]
    assert out["weights_finite"] and all(l == l for l in losses)  # noqa: E741 - NaN check
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# Streaming by id at a realistic shard size, through a server that honours HTTP Range

NOISE_ID = "stda/noise-lesions"
N_NOISE = 240
STREAMER = """
import json, sys
import datasets
stream = datasets.load_dataset(sys.argv[1], split="train", streaming=True)
rows = [(r["label"], r["image"].size) for r in stream]
print("RESULT " + json.dumps({"n": len(rows), "labels": [r[0] for r in rows], "sizes": sorted({r[1] for r in rows})}))
"""


def range_proxy(upstream: str, mirrors: Path, chunk_pause: float = 0.0):
    """A threaded HTTP server on 127.0.0.1 in front of olah, answering as the Hub does where olah does not:
    ``GET .../resolve/<rev>/<file>`` with a Range header gets 206 and the bytes from the mirror folder, and a
    file the repository lacks gets 404 ``EntryNotFound`` (olah answers 401); everything else goes to
    ``upstream``. A Range answer goes out in 64 kB chunks, ``chunk_pause`` seconds apart (a network's pace,
    so that how much a client took shows). Returns (server, url, served ranges as ``[start, end, bytes sent]``)."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    resolve = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/([^?]+)")
    ranges: list[tuple[int, int]] = []

    def local_file(path: str) -> Path | None:
        match = resolve.match(path)
        if not match:
            return None
        kind = "datasets" if match.group(1) else "models"
        return mirrors / kind / match.group(2) / urllib.parse.unquote(match.group(3))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _missing(self) -> bool:
            file = local_file(self.path)
            if file is None or file.is_file():
                return False
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_GET(self):
            if self._missing():
                return
            file = local_file(self.path)
            wanted = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if file is not None and wanted:
                data = file.read_bytes()
                start = int(wanted.group(1))
                end = min(int(wanted.group(2) or len(data) - 1), len(data) - 1)
                served = [start, end, 0]  # the range asked for, and the bytes the client took of it
                ranges.append(served)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                for at in range(start, end + 1, 65536):
                    try:
                        self.wfile.write(data[at : min(at + 65536, end + 1)])
                    except (BrokenPipeError, ConnectionResetError):  # the client has read enough
                        return
                    served[2] += min(65536, end + 1 - at)
                    time.sleep(chunk_pause)
                return
            self._forward("GET")

        def do_HEAD(self):
            if not self._missing():
                self._forward("HEAD")

        def do_POST(self):
            self._forward("POST")

        def _forward(self, method: str) -> None:
            path = re.sub(
                r"^(/api/datasets/[^/?]+/[^/?]+)(\?|$)", r"\1/revision/main\2", self.path
            )  # the Hub answers both
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            request = urllib.request.Request(upstream + path, data=body, headers=headers, method=method)
            try:
                resp = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as err:
                resp = err
            payload = resp.read() if method != "HEAD" else b""
            self.send_response(resp.status)
            for key, value in resp.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(
                        key, value.replace(upstream, f"http://127.0.0.1:{self.server.server_port}")
                    )
            length = resp.headers.get("Content-Length") if method == "HEAD" else str(len(payload))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}", ranges


def test_streaming_a_multi_megabyte_shard_by_id_reads_its_footer_apart_and_rows_through_ranges(tmp_path):
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(N_NOISE):  # noise does not compress: about 12 kB per 64 px PNG
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["benign", "malignant"])}
    )
    repo = tmp_path / "mirrors" / "datasets" / NOISE_ID
    shard = repo / "data" / "train-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(N_NOISE)]}, features=features
    ).to_parquet(str(shard), batch_size=40)
    assert (
        shard.stat().st_size > 2_000_000
    )  # the 0.5 MB file that olah alone could not stream, four times over
    git_repo(repo)
    url, olah = start_olah(tmp_path, f"/api/datasets/{NOISE_ID}/revision/main")
    server, proxy, ranges = range_proxy(url, tmp_path / "mirrors")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=proxy, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STREAMER, NOISE_ID], env=env, capture_output=True, text=True, timeout=300
        )
        time.sleep(0.2)  # the server thread finishes its last answer
    finally:
        server.shutdown()
        stop(olah)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(
        next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert out == {"n": N_NOISE, "labels": [i % 2 for i in range(N_NOISE)], "sizes": [[64, 64]]}
    size = shard.stat().st_size
    footer = [r for r in ranges if r[1] == size - 1 and r[0] > size // 2]
    body = [r for r in ranges if r not in footer]
    assert footer and all(sent <= 65536 for _, _, sent in footer)  # the footer alone: a partial read
    assert sum(sent for _, _, sent in body) >= size - 4  # every row came through Range requests, not a GET
