"""``stda generate``: restyle benign training images with malignant training styles, batched, resumable and sharded.

::

    stda generate real/ --out synthetic/ --per-content 4 --size 224 --iterations 100 --batch 16
    stda generate real/ --out synthetic/ --engine arbitrary --strength 0.8       # pretrained, feed-forward
    torchrun --nproc_per_node 8 -m stda_hf.cli generate real/ --out synthetic/    # same result, 8 processes

Two engines: ``gatys`` (the paper's method: optimise each image, :mod:`stda_hf.generate.nst`) and ``arbitrary``
(Magenta's pretrained feed-forward network, :mod:`stda_hf.generate.arbitrary`; ``pip install 'stda-hf[arbitrary]'``).
Style statistics (Gram targets or style vectors) are computed once per style image; the engines and the quality
gate's application are :mod:`stda_hf.generate.engines`, and this module is the stage: pairing, ids, the folder's contract.

Content images are the benign images of the ``train`` split, style images the malignant ones of the same split
(validation and test images are never read). Each content image gets ``per_content`` different styles, spread
evenly over the style images. Every finished image is written to ``images/<id>.jpg`` and only then recorded in
the append-only ``manifest.jsonl``; a re-run of the same command skips what is recorded, so a killed job loses
at most the batch in flight and ends with the same images as an uninterrupted run. Under ``torchrun`` or
``accelerate launch`` each process takes the pairs whose id hashes to its rank, writes
``manifest.rank<k>.jsonl``, and rank 0 merges the shards into ``manifest.jsonl`` when all are done.

Every image passes the quality gate (:mod:`stda_hf.generate.quality`) on its 8-bit pixels: its manifest line records the
style distance before and after, the structure score, the mean pixel change and the verdict (``ok``,
``unchanged``, ``content_lost``), and for Gatys the initial and final loss terms. When more than
``max_failed_share`` of the run's images fail, :func:`generate` raises :class:`QualityGateFailed` after
everything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from stda_hf.core.config import changed_settings, config_to_dict, describe_changes, dump_config, read_settings
from stda_hf.core.devices import check_device_name, resolve_device
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import append_jsonl, check_separate, exclusive, write_json, write_text
from stda_hf.core.processes import finish_group, shard_of, start_group, world_info
from stda_hf.core.statefile import (
    MANIFEST_RECOVER,
    Fields,
    image_digest_problem,
    read_json,
    read_manifest,
    read_records,
)
from stda_hf.core.utils import check_seed, progress, sha256_file, stable_hash
from stda_hf.data.images import (
    DEFAULT_RESIZE,
    SkipReport,
    check_resize,
    check_side,
    fit_image,
    fit_mask,
    load_image,
    save_image,
)
from stda_hf.data.real import RealFolder, RealImage, read_real_folder
from stda_hf.generate.engines import (
    ArbitraryEngine,
    GatysEngine,
    StyleStates,
    as_saved,
    assess_batch,
    pop_gate_grams,
)
from stda_hf.generate.nst import PRESENT, NSTConfig, resolve_precision
from stda_hf.generate.quality import VERDICTS, QualityGate, StyleDistance
from stda_hf.generate.regions import check_mode, gate_weights, pair_mode
from stda_hf.models.weights import VGG19_IMAGENET, default_weights, input_space_of, parse_weights

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
ENGINE_FILE = "engine.json"
JPEG_QUALITY = 95
ENGINES = ("gatys", "arbitrary")
RESUMABLE = ("per_content", "batch", "device", "limit", "max_failed_share")
"""Settings that may change between runs into the same folder (they change neither an image nor its record)."""
GATE = ("min_style_reduction", "min_structure")
LEGACY_VALUES: dict[str, Any] = {"regions": "none", "resize": "squash"}
"""Settings added later, with the value that reproduces what every run did before them: that value stays out of
image ids, and a saved generate.yaml without the setting reads as it, so older folders (and benchmarks) resume."""
"""Settings of the quality gate: they change verdicts, not pixels (not in ids; a folder keeps its own)."""
ARBITRARY_ONLY = ("strength", "render_size")
GATYS_ONLY = (*(f.name for f in dataclasses.fields(NSTConfig) if f.name != "preserve_color"), "weights")
FAILED = tuple(v for v in VERDICTS if v != "ok")
MIN_SIZE = 32
MAX_SIZE = 4096
"""Largest output side: an image is stylized through VGG feature maps of 64 x size x size floats (4 GiB at 4096)."""
_GATE_DEFAULTS = QualityGate()


@dataclass
class GenerateConfig(NSTConfig):
    """Settings of ``stda generate``: the engines' (see :class:`~stda_hf.generate.nst.NSTConfig`), pairing, batching, gate."""

    engine: str = (
        "gatys"  # gatys (optimisation, the paper's method) or arbitrary (pretrained feed-forward network)
    )
    strength: float = 1.0  # arbitrary: 0 the content's own style vector, 1 the style image's, linear between
    style_size: int = (
        0  # side the style image is resized to, in pixels (0: the engine's own: gatys --size, arbitrary 256)
    )
    render_size: int = (
        256  # arbitrary: longer side the network renders at (result resized to --size); 0: --size
    )
    per_content: int = 4  # styles per content image, each a different malignant train image
    size: int = 224  # side of the square output images in pixels (content images are resized to it)
    resize: str = DEFAULT_RESIZE  # how content, style and mask become squares: crop (aspect kept, centre; default), pad (aspect kept, ImageNet-mean bands) or squash (stretched)
    batch: int = 16  # pairs stylized at once; results do not depend on it
    seed: int = 0  # pairing and noise start images: same seed and settings, same images
    weights: str | None = (
        None  # gatys VGG weights: vgg19-imagenet (offline, the imagenet extra), imagenet (download), a .safetensors/.pth/.h5 file, or random (unset: vgg19-imagenet when installed, else imagenet)
    )
    regions: str = "auto"  # lesion-skin (the style's lesion into the content's lesion, its perilesional skin into the skin), lesion (only the lesion restyled), none (whole frame into whole frame) or auto (lesion-skin when the folder has lesion masks, else none)
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    limit: int = 0  # make at most this many pairs (0: all), for a quick look
    min_style_reduction: float = (
        _GATE_DEFAULTS.min_style_reduction
    )  # gate: unchanged below this style-distance fall
    min_structure: float = _GATE_DEFAULTS.min_structure  # gate: content_lost below this structure score
    max_failed_share: float = 0.5  # exit 2 when more than this share of the run's images fail the gate

    REMOVED: ClassVar[dict[str, str]] = {
        "style_scale": "use --style-size, the style image's side in pixels for both engines (e.g. --style-size "
        "448 for --style-scale 2 at --size 224)",
    }
    """Settings that no longer exist, and what replaces each (a config or flag naming one is refused)."""

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = default_weights()
        if self.arch is None and self.weights == VGG19_IMAGENET:
            self.arch = "vgg19"  # the only network they fit; --preset original: INetwork's --model vgg19
        super().__post_init__()
        if self.engine not in ENGINES:
            raise StdaError(f"unknown --engine {self.engine!r}; valid engines: {list(ENGINES)}")
        for name, low in (
            ("per_content", 1),
            ("size", MIN_SIZE),
            ("batch", 1),
            ("limit", 0),
            ("style_size", 0),
        ):
            if getattr(self, name) < low:
                raise StdaError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least {low}")
        check_seed("--seed", self.seed)
        check_resize(self.resize)
        why = "each image is stylized through float32 feature maps of 64 x size x size"
        check_side("--size", self.size, MIN_SIZE, MAX_SIZE, "generated images", why, bytes_per_pixel=256)
        if not self.style_size:  # the engine's own, saved resolved in generate.yaml
            self.style_size = self.size if self.engine == "gatys" else self.arbitrary_config().style_size
        check_side(
            "--style-size", self.style_size, MIN_SIZE, MAX_SIZE, "style images", why, bytes_per_pixel=256
        )
        if not 0.0 <= self.max_failed_share <= 1.0:
            raise StdaError(f"--max-failed-share {self.max_failed_share} must be between 0 and 1")
        self.gate()  # checks the thresholds
        check_device_name(self.device)
        check_mode(self.regions)
        if self.engine == "arbitrary":
            self.arbitrary_config()  # checks strength, sizes and preserve_color

    def weights_space(self) -> str:
        """The input convention of ``weights``: the preset's values for it fill the unset settings."""
        return input_space_of(self.weights)

    def gate(self) -> QualityGate:
        """The quality gate's thresholds."""
        return QualityGate(min_style_reduction=self.min_style_reduction, min_structure=self.min_structure)

    def arbitrary_config(self) -> Any:
        """The :class:`~stda_hf.generate.arbitrary.ArbitraryConfig` of these settings."""
        from stda_hf.generate.arbitrary import ArbitraryConfig

        return ArbitraryConfig(
            strength=self.strength,
            preserve_color=self.preserve_color,
            **({"style_size": self.style_size} if self.style_size else {}),
            render_size=self.render_size,
        )

    def unused(self) -> tuple[str, ...]:
        """Settings the chosen engine ignores (left out of its ids and of the folder guard)."""
        return GATYS_ONLY if self.engine == "arbitrary" else ARBITRARY_ONLY


@dataclass(frozen=True)
class Pair:
    """One image to make: a content and a style image, its synthetic id and its noise seed."""

    id: str
    content: RealImage
    style: RealImage
    seed: int


@dataclass
class GenerateSummary:
    """What a run did (for this process under sharding)."""

    pairs: int = 0  # pairs assigned to this process
    done_before: int = 0  # already in the manifest when the run started
    done: int = 0  # made by this run
    retried: int = 0  # redone in fp32 after a NaN/inf or a rising loss in bf16
    skipped_pairs: int = 0  # pairs left out because an image could not be read
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason
    failed: dict[str, str] = field(default_factory=dict)  # synthetic id -> reason (not written)
    verdicts: dict[str, int] = field(default_factory=dict)  # quality verdict -> images made by this run
    run_verdicts: dict[str, int] = field(default_factory=dict)  # verdict -> all images of the run's pairs
    regions: dict[str, int] = field(
        default_factory=dict
    )  # region mode (none, lesion-skin, lesion) -> images made now
    engine: str = ""
    gate_features: str = ""  # the quality gate's network (vgg19-imagenet, or random-vgg16 without the extra)
    seconds: float = 0.0

    def format(self) -> str:
        """A few lines for the end of a run."""
        rate = self.done / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.pairs} pairs ({self.engine}): {self.done} made now ({rate:.2f} images/s), {self.done_before} "
            f"already done, {self.skipped_pairs} skipped, {len(self.failed)} failed, {self.retried} redone in fp32",
            f"quality gate ({self.gate_features or 'features not recorded'}), images made now: "
            + _counts(self.verdicts),
        ]
        if self.run_verdicts:
            lines.append("quality gate, all images of this run: " + _counts(self.run_verdicts))
        if set(self.regions) - {"none"}:
            made = ", ".join(f"{mode} {n}" for mode, n in sorted(self.regions.items()))
            lines.append(f"regions, images made now: {made} (none: a lesion mask was missing)")
        lines += [f"  skipped {path}: {reason}" for path, reason in sorted(self.skipped.items())]
        lines += [f"  failed {sid}: {reason}" for sid, reason in sorted(self.failed.items())]
        if self.failed:
            lines.append("  re-run the same command to retry the failed images")
        return "\n".join(lines)

    def failed_share(self) -> float:
        """Share of the run's images (all processes) whose verdict is not ``ok``."""
        total = sum(self.run_verdicts.values())
        return sum(self.run_verdicts.get(v, 0) for v in FAILED) / total if total else 0.0


def _counts(verdicts: dict[str, int]) -> str:
    return ", ".join(f"{v} {verdicts.get(v, 0)}" for v in VERDICTS)


class QualityGateFailed(StdaError):
    """More than ``max_failed_share`` of a run's images failed the quality gate (everything is written)."""

    def __init__(self, message: str, summary: GenerateSummary):
        super().__init__(message)
        self.summary = summary


# ----------------------------------------------------------------------------------------------------------------
# Pairing


def assign_styles(
    contents: Sequence[str], styles: Sequence[str], per_content: int, seed: int
) -> list[tuple[str, str]]:
    """``(content_id, style_id)`` pairs: each content gets ``per_content`` different styles, spread evenly.

    Styles are shuffled by ``seed`` and dealt round-robin, one round per style slot, so every style is used
    ``floor`` or ``ceil`` of ``len(contents) * per_content / len(styles)`` times (up to a skip when a content
    would get the same style twice), and the pairs of ``per_content=k`` are the first ``k`` rounds of any larger
    value.

    Raises
    ------
    StdaError
        When there are fewer styles than ``per_content``.
    """
    contents, styles = sorted(contents), sorted(styles)
    if per_content > len(styles):
        raise StdaError(
            f"--per-content {per_content} needs at least {per_content} malignant train images; there are "
            f"{len(styles)}. Lower --per-content"
        )
    order = [styles[i] for i in np.random.default_rng(seed).permutation(len(styles))]
    used: dict[str, set[str]] = {c: set() for c in contents}
    pairs, ptr = [], 0
    for _ in range(per_content):
        for c in contents:
            while order[ptr % len(order)] in used[c]:
                ptr += 1
            used[c].add(order[ptr % len(order)])
            pairs.append((c, order[ptr % len(order)]))
            ptr += 1
    return pairs


def params_hash(cfg: GenerateConfig, engine: dict[str, Any]) -> str:
    """Hash of every setting that changes an image's pixels, with the engine's description (weights or models).

    Not in it: batch, device, limit, per_content, the gate's thresholds, and the settings the engine ignores
    (for ``arbitrary`` every Gatys setting, the VGG weights and the seed, which only pairs images).
    """
    leave_out = {*RESUMABLE, *GATE, *cfg.unused(), *(("seed",) if cfg.engine == "arbitrary" else ())}
    leave_out |= {k for k, v in LEGACY_VALUES.items() if getattr(cfg, k) == v}  # the ids made before them
    values = {k: v for k, v in config_to_dict(cfg).items() if k not in leave_out}
    values["engine_files"] = {k: v for k, v in engine.items() if k != "name"}
    return stable_hash(values)


def make_pairs(folder: RealFolder, cfg: GenerateConfig, phash: str) -> list[Pair]:
    """Every pair of the run, in pairing order (``limit`` applied): benign train content x malignant train style."""
    contents = folder.subset("train", "benign")
    styles = folder.subset("train", "malignant")
    if not contents or not styles:
        raise StdaError(
            f"{folder.root}: the train split has {len(contents)} benign and {len(styles)} malignant images; "
            "generate needs both (check splits.csv, or re-run `stda split`)"
        )
    pairs = []
    for c, s in assign_styles(
        [im.isic_id for im in contents], [im.isic_id for im in styles], cfg.per_content, cfg.seed
    ):
        sid = "syn_" + stable_hash({"content": c, "style": s, "params": phash})
        seed = int(stable_hash({"seed": cfg.seed, "id": sid}, 8), 16)
        pairs.append(Pair(id=sid, content=folder[c], style=folder[s], seed=seed))
    return pairs[: cfg.limit] if cfg.limit else pairs


# ----------------------------------------------------------------------------------------------------------------
# Output folder: settings, provenance, manifests


def check_output(out: Path, folder: RealFolder, cfg: GenerateConfig, engine: dict[str, Any]) -> dict:
    """Refuse an output folder made from another ``splits.csv``, with other image settings or other model files;
    return source.json.

    Saved settings count only once the folder holds an image: a run that failed before its first image (bad
    weights, say) leaves a folder the corrected command may use.
    """
    source = {"real": str(folder.root.resolve()), "splits_sha256": sha256_file(folder.splits_path)}
    done_ids(out)  # every manifest record and image digest checked before anything is written
    if not _holds_images(out):
        return source
    old_source = out / "source.json"
    previous = read_json(old_source, SOURCE_FIELDS, recover=_REWRITE, default=None)
    if previous is not None:
        if previous.get("splits_sha256") != source["splits_sha256"]:
            raise StdaError(
                f"{out} was generated from another splits.csv ({previous.get('real')}); its images may come from "
                "what is now validation or test data. Use a new --out folder"
            )
    old_cfg = out / "generate.yaml"
    previous = read_settings(old_cfg)
    if previous is not None:
        previous = {**LEGACY_VALUES, **previous}  # as made before these settings existed
        now = config_to_dict(cfg)
        ignore = {*RESUMABLE, *(cfg.unused() if previous.get("engine") == cfg.engine else ())}
        changed = changed_settings(previous, now, ignore=ignore)
        if changed:
            diffs = describe_changes(previous, now, changed)
            raise StdaError(
                f"{out} was made with other settings ({diffs}); use a new --out folder, or the settings of "
                f"{old_cfg} to resume"
            )
    old_engine = out / ENGINE_FILE
    if read_json(old_engine, Fields(), recover=_REWRITE, default=engine) != engine:
        raise StdaError(
            f"{out} was made by another engine build ({old_engine}: model files, weights or execution provider "
            f"differ from {engine}); use a new --out folder"
        )
    return source


def _holds_images(out: Path) -> bool:
    """Whether ``out`` holds a finished image (a file in ``images/`` or a manifest line)."""
    images = out / "images"
    if images.is_dir() and any(not p.name.startswith(".") for p in images.iterdir()):
        return True
    return any(p.is_file() and p.stat().st_size for p in manifest_paths(out))


def manifest_paths(out: Path) -> list[Path]:
    """``manifest.jsonl`` and every rank shard ``manifest.rank<k>.jsonl`` in ``out``."""
    return [out / MANIFEST, *sorted(out.glob("manifest.rank*.jsonl"))]


SOURCE_FIELDS = Fields(required={"splits_sha256": str}, optional={"real": str})
"""The schema of ``source.json``."""

_REWRITE = "delete it: the next `stda generate` with the same settings writes it again"


def done_ids(out: Path) -> set[str]:
    """Ids recorded in any manifest of ``out`` whose image is on disk, checked against its recorded digest.

    Raises
    ------
    StdaError
        A manifest line that is not a record of generate (naming the file and line), or an image that is not
        the one its record was written for.
    """
    done = set()
    for path in manifest_paths(out):
        for record in read_manifest(path):
            if not (out / record["file"]).is_file():
                continue
            problem = image_digest_problem(out, record)
            if problem:
                raise StdaError(f"{problem}; {MANIFEST_RECOVER}")
            done.add(record["id"])
    return done


def merge_manifests(out: str | Path) -> int:
    """Merge the rank shards into ``manifest.jsonl``: sorted by id, one line per id; idempotent. Returns lines.

    The merged file replaces the old one atomically before the shards are removed, so a crash in between only
    leaves records that the next merge de-duplicates.
    """
    out = Path(out)
    records: dict[str, dict] = {}
    shards = manifest_paths(out)
    for path in shards:
        for record in read_records(path, Fields(required={"id": str}), key="id", recover=MANIFEST_RECOVER):
            records.setdefault(record["id"], record)
    lines = [json.dumps(records[k], sort_keys=True, ensure_ascii=False) + "\n" for k in sorted(records)]
    write_text(out / MANIFEST, "".join(lines))
    for path in shards[1:]:
        path.unlink(missing_ok=True)
    return len(lines)


def _remove_partial_images(out: Path) -> None:
    """Delete temporary files a killed run left in ``images/`` (never read: only finished files are renamed)."""
    for path in (out / "images").glob(".*.part"):
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Images and batches


def load_content(path: Path, size: int, resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """An image file as a (3, size, size) float tensor in [0, 1] (bicubic, resize mode ``resize`` of
    :func:`~stda_hf.data.images.fit_image`); raises BadImageError."""
    img = fit_image(load_image(path), size, resize, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit RGB image."""
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """A batch (B, 3, H, W) in [0, 1] as 8-bit RGB arrays (B, H, W, 3), the values :func:`to_pil` gives."""
    return (
        (images.detach().float().clamp(0, 1) * 255.0)
        .round()
        .byte()
        .permute(0, 2, 3, 1)
        .contiguous()
        .cpu()
        .numpy()
    )


def load_mask(path: Path, size: int, resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """A lesion mask file as a (size, size) bool tensor, in the geometry :func:`load_content` gives its image
    (nearest neighbour, padded with background; foreground above 127)."""
    with Image.open(path) as img:
        mask = fit_mask(img, size, resize)
    return torch.from_numpy(np.asarray(mask) > 127)


def make_engine(cfg: GenerateConfig, device: torch.device) -> GatysEngine | ArbitraryEngine:
    """The engine ``cfg.engine`` names, its network loaded on ``device``.

    Raises
    ------
    StdaError
        Weights that cannot be loaded; for ``arbitrary``, the optional extra missing (names the install command).
    """
    regions = cfg.regions != "none"
    if cfg.engine == "arbitrary":
        return ArbitraryEngine(cfg.arbitrary_config(), device, regions=regions)
    return GatysEngine(
        cfg, parse_weights(cfg.weights, seed=0), device, cfg.style_size or cfg.size, regions=regions
    )


def resolve_regions(cfg: GenerateConfig, folder: RealFolder) -> GenerateConfig:
    """``cfg`` with ``regions="auto"`` resolved: ``lesion-skin`` when a benign and a malignant train image have
    lesion masks, else ``none`` (saved resolved in generate.yaml; pairs lacking a mask are made whole-frame)."""
    if cfg.regions != "auto":
        return cfg
    masked = [any(im.mask_path for im in folder.subset("train", label)) for label in ("benign", "malignant")]
    return dataclasses.replace(cfg, regions="lesion-skin" if all(masked) else "none")


class _Runner:
    """The state of one process's run: engine, style states, gate, skip report, summary and output paths."""

    def __init__(
        self, out: Path, cfg: GenerateConfig, engine: GatysEngine | ArbitraryEngine, shard: str, phash: str
    ):
        self.out, self.cfg, self.engine, self.phash = out, cfg, engine, phash
        self.manifest = out / shard
        self.scorer = StyleDistance(device=engine.device)
        self.styles = StyleStates(engine, cfg.size, phash, self.scorer, max_items=max(512, 2 * cfg.batch))
        self.report = SkipReport()
        self.summary = GenerateSummary(engine=engine.name, gate_features=self.scorer.name)
        self.gate = cfg.gate()

    def _load(self, im: RealImage, size: int) -> torch.Tensor | None:
        if str(im.path) in self.report.skipped:
            return None
        try:
            return load_content(im.path, size, self.cfg.resize)
        except BadImageError as err:
            self.report.add(err.path, err.reason)
            return None

    def _targets(self, batch: list[Pair]) -> tuple[list[Pair], dict[str, torch.Tensor]]:
        """Drop pairs whose style cannot be read; the engine's style state of the rest, once per style image."""
        images = {p.style.isic_id: p.style for p in batch}

        def style_mask(style_id: str, side: int) -> torch.Tensor | None:
            path = images[style_id].mask_path
            return load_mask(path, side, self.cfg.resize) if path else None

        readable, states = self.styles.stacked(
            [p.style.isic_id for p in batch],
            lambda style_id, side: self._load(images[style_id], side),
            style_mask,
        )
        return [p for p, ok in zip(batch, readable, strict=True) if ok], states

    def run_batch(self, batch: list[Pair], done: set[str]) -> int:
        """Stylize one batch, gate, save and record its pairs not in ``done``; returns how many of those it consumed.

        A batch is always stylized whole, done pairs included, so every image sees the same batch (and hence
        the same floating-point arithmetic) in a resumed run as in an uninterrupted one.
        """
        start = time.perf_counter()
        contents = {p.id: self._load(p.content, self.cfg.size) for p in batch}
        usable = [p for p in batch if contents[p.id] is not None]
        usable, targets = self._targets(usable)
        self.summary.skipped_pairs += len(batch) - len(usable)
        todo = sum(p.id not in done for p in batch)
        if not any(p.id not in done for p in usable):
            return todo
        content = torch.stack([contents[p.id] for p in usable])
        gate_styles = pop_gate_grams(targets)
        masks = [
            load_mask(p.content.mask_path, self.cfg.size, self.cfg.resize) if p.content.mask_path else None
            for p in usable
        ]
        modes = [
            pair_mode(self.cfg.regions, bool(p.content.mask_path), bool(p.style.mask_path)) for p in usable
        ]
        weights = gate_weights(modes, masks, targets[PRESENT]) if self.cfg.regions != "none" else None
        out = self.engine.run(content, targets, [p.seed for p in usable], modes, masks)
        self.summary.retried += out.redone
        images = as_saved(out.images).cpu()
        records = assess_batch(
            content, gate_styles, images, out.finite, masks, self.scorer, self.gate, weights
        )
        pixels = to_pixels(images)  # the whole batch at once: per-image tensor ops cost more than the JPEG
        seconds = (time.perf_counter() - start) / len(usable)
        for i, p in enumerate(usable):
            if p.id in done:
                continue
            if not out.finite[i]:
                self.summary.failed[p.id] = "loss or gradient not finite (NaN/inf), in fp32 as well"
                logger.warning(
                    "%s (%s x %s) failed: non-finite loss", p.id, p.content.isic_id, p.style.isic_id
                )
                continue
            self._write(p, pixels[i], records[i], out.terms[i] if out.terms else None, seconds, modes[i])
        return todo

    def _write(
        self, p: Pair, pixels: np.ndarray, quality: dict, terms: dict | None, seconds: float, regions: str
    ) -> None:
        """Save the image (H, W, 3) uint8 atomically, then append its manifest line."""
        rel = f"images/{p.id}.jpg"
        save_image(Image.fromarray(pixels, "RGB"), self.out / rel, quality=JPEG_QUALITY)
        digest = sha256_file(self.out / rel)  # binds the record to its file: checked on reuse and packaging
        append_jsonl(
            self.manifest,
            {
                "id": p.id,
                "file": rel,
                "sha256": digest,
                "content_id": p.content.isic_id,
                "style_id": p.style.isic_id,
                "seed": p.seed,
                "params_hash": self.phash,
                "engine": self.engine.name,
                "weights": self.engine.description.get(
                    "weights"
                ),  # gatys: the VGG weights (digest); else None
                "terms": None if terms is None else {k: float(f"{v:.6g}") for k, v in terms.items()},
                "quality": quality,
                "seconds": round(seconds, 4),
                "size": self.cfg.size,
                "regions": regions,
                "content_license": p.content.copyright_license,
                "content_attribution": p.content.attribution,
                "style_license": p.style.copyright_license,
                "style_attribution": p.style.attribution,
            },
        )
        self.summary.done += 1
        self.summary.regions[regions] = self.summary.regions.get(regions, 0) + 1
        self.summary.verdicts[quality["verdict"]] = self.summary.verdicts.get(quality["verdict"], 0) + 1


# ----------------------------------------------------------------------------------------------------------------
# The stage


def generate(real_root: str | Path, out: str | Path, cfg: GenerateConfig | None = None) -> GenerateSummary:
    """Make the synthetic folder ``out`` from the train split of ``real_root`` (resumes what is there).

    Parameters
    ----------
    real_root : path
        A real-image folder with ``splits.csv`` (``stda split``).
    out : path
        The synthetic folder: ``images/``, ``manifest.jsonl``, ``generate.yaml``, ``engine.json``,
        ``source.json``, ``generate_summary.json``.
    cfg : GenerateConfig, optional
        Engine, pairing, batching and quality-gate settings.

    Returns
    -------
    GenerateSummary
        Counts for this process (made, already done, skipped with reasons, failed with reasons, verdicts).

    Raises
    ------
    QualityGateFailed
        More than ``cfg.max_failed_share`` of the run's images failed the quality gate (raised by rank 0 after
        every file is written; the exception holds the summary).
    StdaError
        No ``splits.csv``; no benign or malignant train images; ``out`` made from another split, with other
        settings or another engine build; unknown settings; weights that cannot be loaded; the ``arbitrary``
        extra not installed.
    """
    cfg = cfg or GenerateConfig()
    out = Path(out)
    check_separate(out, {"real-image folder": real_root})
    rank = world_info()[0]
    busy = f"another `stda generate` is writing to {out} (rank {rank}); wait for it to finish or use another --out"
    with exclusive(out, f".generate.rank{rank}.lock", busy):
        return _generate(real_root, out, cfg)


def _generate(real_root: str | Path, out: Path, cfg: GenerateConfig) -> GenerateSummary:
    """:func:`generate` while holding the folder's lock."""
    rank, world, local = world_info()
    folder = read_real_folder(real_root)
    if not folder.splits_path.is_file():
        raise StdaError(f"{folder.root} has no splits.csv; run `stda split {folder.root}` first")
    device = resolve_device(cfg.device, local)
    cfg = resolve_regions(cfg, folder)
    if cfg.engine == "gatys":
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    engine = make_engine(cfg, device)
    source = check_output(out, folder, cfg, engine.description)
    phash = params_hash(cfg, engine.description)
    pairs = make_pairs(folder, cfg, phash)
    created = start_group(world)
    if rank == 0:
        write_json(out / "source.json", source)
        write_json(out / ENGINE_FILE, engine.description)
        dump_config(cfg, out / "generate.yaml")
        if world == 1:
            merge_manifests(out)
            _remove_partial_images(out)
    runner = _Runner(out, cfg, engine, MANIFEST if world == 1 else f"manifest.rank{rank}.jsonl", phash)
    _run(runner, [p for p in pairs if shard_of(p.id, world) == rank], rank)
    finish_group(world, created)
    summary = runner.summary
    if rank == 0:
        merge_manifests(out)
        ids = {p.id for p in pairs}
        found = Counter(_verdict(r) for r in read_manifest(out / MANIFEST) if r["id"] in ids)
        summary.run_verdicts = {v: found[v] for v in VERDICTS if found[v]}
    suffix = "" if world == 1 else f".rank{rank}"
    write_json(out / f"generate_summary{suffix}.json", dataclasses.asdict(summary))
    if rank == 0 and summary.failed_share() > cfg.max_failed_share:
        logger.warning("%s", summary.format())
        raise QualityGateFailed(
            f"{summary.failed_share():.0%} of the run's {sum(summary.run_verdicts.values())} images failed the "
            f"quality gate ({_counts(summary.run_verdicts)}), more than --max-failed-share "
            f"{cfg.max_failed_share:g}; everything is written to {out} (see manifest.jsonl): change the engine "
            "settings and use a new --out folder, or raise --max-failed-share to accept them"
            + (_REGIONAL_ARBITRARY if cfg.engine == "arbitrary" and cfg.regions != "none" else ""),
            summary,
        )
    return summary


_REGIONAL_ARBITRARY = (
    ". Region-aware, the gate judges each lesion against the style's lesion, and the arbitrary network cannot "
    "render a region's statistics (docs/generate.md): --engine gatys transfers them, --regions none takes the "
    "style's artifacts along"
)


def _verdict(record: dict) -> str:
    """The quality verdict of a manifest line (``ok`` for lines written before the gate existed)."""
    return (record.get("quality") or {}).get("verdict", "ok")


def _run(runner: _Runner, mine: list[Pair], rank: int) -> None:
    """Make this process's pending pairs, batch by batch, with a progress bar; fills ``runner.summary``."""
    start = time.perf_counter()
    done = done_ids(runner.out)
    ordered = sorted(mine, key=lambda p: (p.style.isic_id, p.content.isic_id))  # styles' targets stay cached
    size = runner.cfg.batch
    batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    batches = [b for b in batches if any(p.id not in done for p in b)]
    todo = sum(p.id not in done for p in mine)
    summary = runner.summary
    summary.pairs, summary.done_before = len(mine), len(mine) - todo
    logger.info(
        "%d pairs for this process, %d already done, %d to make", len(mine), summary.done_before, todo
    )
    bar = progress(total=todo, desc="generate", unit="img", **({} if rank == 0 else {"disable": True}))
    with bar:
        for batch in batches:
            bar.update(runner.run_batch(batch, done))
            bar.set_postfix(
                **{v: summary.verdicts.get(v, 0) for v in VERDICTS},
                failed=len(summary.failed),
                skipped=summary.skipped_pairs,
                refresh=False,
            )
    summary.skipped = dict(runner.report.skipped)
    summary.seconds = time.perf_counter() - start
    if runner.report:
        logger.warning("%s; their pairs were left out", runner.report.summary())
