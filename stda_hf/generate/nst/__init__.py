"""The style-transfer engine's public face: :func:`stylize` a batch, each image on its own, by the evaluation schedule.

:func:`style_targets` turns style images into Gram targets once (a :class:`GramCache` keeps them per style
image), and :func:`stylize` optimises a batch of images, each towards its own content image and style targets.
Every image has its own optimiser state (:class:`~stda_hf.generate.nst.optimizers.BatchedLBFGS` keeps per-image curvature
pairs, step sizes and stopping), so an image's result does not depend on which other images share its batch::

    features = build_vgg_features("vgg19", cfg.layers(), weights="random")
    targets = style_targets(features, style_images, cfg)           # {layer: (B, C, C)}
    result = stylize(features, content_images, targets, cfg, seeds=[0, 1])
    result.images                                                  # (B, 3, H, W) in [0, 1]

The evaluations follow :func:`schedule`: optionally a share at half size first (Gatys et al. 2017), and in
bf16 the last share in fp32; an image that goes wrong in bf16 is redone in fp32.

The engine is four modules, one job each; this one re-exports the names callers use from the other three:
:mod:`stda_hf.generate.nst.config` (presets and :class:`NSTConfig`), :mod:`stda_hf.generate.nst.objective` (the ``gatys`` and
``inetwork`` losses, style targets, colour), :mod:`stda_hf.generate.nst.optimizers` (the per-image batched L-BFGS and Adam,
which know nothing of images) and this module (the schedule and :func:`stylize`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stda_hf.generate.nst.config import (
    COARSE_SCALE,
    COLOR_MODES,
    DEFAULT_LR,
    INITS,
    LAYER_WEIGHTINGS,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    SPACE_PRESETS,
    NSTConfig,
    inetwork_layer_weights,
    preset_settings,
)
from stda_hf.generate.nst.objective import (
    MIN_REGION_SHARE,
    PRESENT,
    Losses,
    TermsAndGrads,
    activations,
    at_least_fp32,
    coarse_key,
    content_features,
    content_loss,
    from_space,
    gram,
    inetwork_content_loss,
    inetwork_style_loss,
    inetwork_tv_loss,
    keep_color,
    layer_masks,
    loss_terms,
    luminance3,
    masked_gram,
    model_input,
    objective,
    region_key,
    region_present,
    resize,
    resolve_precision,
    rgb_to_ycbcr,
    scaled_size,
    style_loss,
    style_targets,
    to_space,
    tv_loss,
    ycbcr_to_rgb,
)
from stda_hf.generate.nst.optimizers import BatchedAdam, BatchedLBFGS
from stda_hf.models.features import VGGFeatures

__all__ = [  # the engine's names, wherever they live
    "COARSE_SCALE",
    "COLOR_MODES",
    "DEFAULT_LR",
    "INITS",
    "LAYER_WEIGHTINGS",
    "MIN_COARSE_SIDE",
    "MIN_REGION_SHARE",
    "OBJECTIVES",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESENT",
    "PRESETS",
    "SPACE_PRESETS",
    "STRAY_TOLERANCE",
    "BatchedAdam",
    "BatchedLBFGS",
    "GramCache",
    "Losses",
    "NSTConfig",
    "Stage",
    "StylizeResult",
    "TermsAndGrads",
    "activations",
    "coarse_key",
    "content_features",
    "content_loss",
    "from_space",
    "gram",
    "inetwork_content_loss",
    "inetwork_layer_weights",
    "inetwork_style_loss",
    "inetwork_tv_loss",
    "initial_images",
    "keep_color",
    "layer_masks",
    "loss_terms",
    "luminance3",
    "make_optimizer",
    "masked_gram",
    "objective",
    "preset_settings",
    "region_key",
    "region_present",
    "resize",
    "resolve_precision",
    "rgb_to_ycbcr",
    "schedule",
    "stack_targets",
    "style_loss",
    "style_targets",
    "stylize",
    "to_space",
    "tv_loss",
    "ycbcr_to_rgb",
]

logger = logging.getLogger(__name__)

MIN_COARSE_SIDE = 64
"""No coarse stage when its images would be smaller than this: at 32 px, VGG's conv4 layers are 4x4 pixels and
the coarse result lost the lesion outline on phantoms (``benchmarks/nst_figure.py --thresholds``)."""
STRAY_TOLERANCE = 1.02
"""A bf16 image whose final loss exceeds this times the lowest loss it reached is redone in fp32."""


# ----------------------------------------------------------------------------------------------------------------
# Style targets per style image


class GramCache:
    """Style targets computed once per key (style id + settings) and kept in memory, least recently used first out.

    Parameters
    ----------
    max_items : int
        Entries kept; a style's Gram matrices over all VGG16 layers take about 7 MB.
    """

    def __init__(self, max_items: int = 512):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, dict[str, Tensor]] = OrderedDict()
        self.computed = 0  # how many targets were computed (misses)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get_many(
        self, keys: Sequence[Hashable], compute: Callable[[list[Hashable]], list[dict[str, Tensor]]]
    ) -> list[dict[str, Tensor]]:
        """Targets for ``keys`` (repeats allowed); ``compute(missing_keys)`` is called once for the misses."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._items]
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                self._items[key] = value
                self.computed += 1
        for key in keys:
            self._items.move_to_end(key)
        found = [self._items[k] for k in keys]
        while len(self._items) > max(self.max_items, len(set(keys))):
            self._items.popitem(last=False)
        return found


def stack_targets(per_image: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-style targets ``{layer: (C, C)}`` into batch targets ``{layer: (B, C, C)}``."""
    return {layer: torch.stack([t[layer] for t in per_image]) for layer in per_image[0]}


# ----------------------------------------------------------------------------------------------------------------
# Optimisers (per image)


def make_optimizer(x: Tensor, cfg: NSTConfig) -> BatchedLBFGS | BatchedAdam:
    """The per-image optimiser ``cfg.optimizer`` for images ``x`` (in the objective's units)."""
    project = _projection(cfg) if cfg.clamp else None
    if cfg.optimizer == "adam":
        return BatchedAdam(x, lr=cfg.lr, project=project)
    history = min(cfg.history, max(cfg.iterations - 1, 1))
    return BatchedLBFGS(x, lr=cfg.lr, history=history, restart=cfg.restart, project=project)


def _projection(cfg: NSTConfig) -> Callable[[Tensor], Tensor]:
    """Clamping to [0, 1] in RGB, expressed in the objective's units (flattened (B, 3*H*W) or (B, 3, H, W))."""

    def project(x: Tensor) -> Tensor:
        shape = x.shape
        images = x.reshape(shape[0], 3, -1)[..., None]
        return to_space(from_space(images, cfg).clamp(0, 1), cfg).reshape(shape)

    return project


# ----------------------------------------------------------------------------------------------------------------
# Stylize


def initial_images(content: Tensor, init: str, seeds: Sequence[int] | None = None) -> Tensor:
    """Start images (B, 3, H, W): a copy of ``content``, seeded uniform noise (one seed per image), or gray."""
    if init == "content":
        return at_least_fp32(content.detach().clone())
    if init == "gray":
        return at_least_fp32(torch.full_like(content, 0.5))
    seeds = list(range(len(content))) if seeds is None else list(seeds)
    noise = [torch.rand(content.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return at_least_fp32(torch.stack(noise).to(content.device, content.dtype))


@dataclass
class StylizeResult:
    """Output of :func:`stylize`: images, and per image the loss terms at the start and at the end.

    Terms are unweighted (``total`` is the weighted sum that is optimised), in the objective's units.
    """

    images: Tensor  # (B, 3, H, W) in [0, 1]
    content_loss: Tensor  # (B,) final
    style_loss: Tensor  # (B,) final
    tv_loss: Tensor  # (B,) final
    total_loss: Tensor  # (B,) final
    finite: Tensor  # (B,) bool: False where a loss or gradient became NaN/inf (in fp32 too)
    redone: Tensor  # (B,) bool: True where the bf16 run went wrong and the image was redone in fp32
    initial_content_loss: Tensor  # (B,) at the start image
    initial_style_loss: Tensor  # (B,)
    initial_tv_loss: Tensor  # (B,)
    initial_total_loss: Tensor  # (B,)
    evaluations: Tensor  # (B,) long: loss evaluations made before the image stopped (or all of them)
    rejected: Tensor  # (B,) long: trial points the L-BFGS line search rejected (0 for Adam)

    def replace_rows(self, rows: Tensor, other: StylizeResult) -> None:
        """Put the images and losses of ``other`` into ``rows`` of this result."""
        for f in dataclasses.fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)

    def terms(self, i: int) -> dict[str, float]:
        """Image ``i``'s initial and final terms as plain floats (for a manifest line or a quality record)."""
        names = ("content", "style", "tv", "total")
        out = {f"initial_{n}": float(getattr(self, f"initial_{n}_loss")[i]) for n in names}
        out.update({f"final_{n}": float(getattr(self, f"{n}_loss")[i]) for n in names})
        return out


def stylize(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: Sequence[int] | None = None,
    callback: Callable[[Tensor], None] | None = None,
    regions: Tensor | None = None,
) -> StylizeResult:
    """Neural style transfer of a batch: each image towards its content image and its style targets.

    The evaluations follow :func:`schedule`: with ``cfg.coarse_to_fine``, a share of them at half size first
    (content and style images halved; the result upsampled as the start of the full-size stage, as Gatys et
    al. 2017 do), and in bf16 the last ``cfg.fp32_finish`` share in fp32. Each stage starts a fresh optimiser.
    In bf16, an image whose loss or gradient becomes NaN/inf, or whose final loss (re-evaluated) ends more than
    2% above the lowest loss it reached, is optimised again in fp32.

    Parameters
    ----------
    features : VGGFeatures
        Extractor returning at least ``cfg.layers()``; on the device of ``content``.
    content : Tensor
        Content images (B, 3, H, W) in [0, 1].
    targets : dict of str to Tensor
        Per-image Gram targets ``{style layer: (B, C, C)}`` (see :func:`style_targets`, :func:`stack_targets`).
    cfg : NSTConfig
        Objective, optimiser, iterations and precision.
    seeds : sequence of int, optional
        One seed per image for ``init="noise"`` (default: 0, 1, ...).
    callback : callable, optional
        Called after every evaluation with the images each optimiser holds, RGB in [0, 1] (B, 3, h, w) at the
        stage's size (for loss-over-time curves; not called while images are redone in fp32).
    regions : Tensor, optional
        The content images' region masks (B, R, H, W) for region-aware transfer (:mod:`stda_hf.generate.regions`);
        ``targets`` then hold the style images' per-region targets (:func:`style_targets` given their regions).

    Returns
    -------
    StylizeResult
        Images, initial and final losses; ``finite`` is False for images that stayed NaN/inf (redo them
        elsewhere or report them), ``redone`` True for images redone in fp32.
    """
    precision = resolve_precision(cfg.precision, content.device)
    seeds = list(range(len(content))) if seeds is None else [int(s) for s in seeds]
    result, strayed = _optimise(features, content, targets, cfg, seeds, precision, callback, regions)
    rows = (~result.finite | strayed).nonzero().flatten()
    if precision == "fp32" or not len(rows):
        return result
    logger.info(
        "%d of %d image(s) went wrong in %s; redoing them in fp32", len(rows), len(content), precision
    )
    redo, _ = _optimise(
        features,
        content[rows],
        {k: v[rows] for k, v in targets.items()},
        cfg,
        [seeds[i] for i in rows.tolist()],
        "fp32",
        regions=None if regions is None else regions[rows],
    )
    redo.redone[:] = True
    result.replace_rows(rows, redo)
    return result


@dataclass(frozen=True)
class Stage:
    """One stage of an optimisation: image side relative to the output, and each loss evaluation's precision."""

    scale: float
    precisions: tuple[str, ...]


def schedule(cfg: NSTConfig, precision: str, size: Sequence[int]) -> list[Stage]:
    """The stages of optimising images of ``size`` (H, W) at ``precision``, in order.

    ``cfg.coarse_to_fine`` of the evaluations at half size (none when that side is under ``MIN_COARSE_SIDE``
    pixels), then the rest (at least one) at full size; in bf16 the last ``cfg.fp32_finish`` of them in fp32.
    """
    n = cfg.iterations
    coarse = min(round(n * cfg.coarse_to_fine), n - 1)  # at least one evaluation at full size
    coarse = coarse if min(scaled_size(size, COARSE_SCALE)) >= MIN_COARSE_SIDE else 0
    finish = min(round(n * cfg.fp32_finish), n - coarse) if precision == "bf16" else 0
    stages = [
        Stage(COARSE_SCALE, (precision,) * coarse),
        Stage(1.0, (precision,) * (n - coarse - finish) + ("fp32",) * finish),
    ]
    return [stage for stage in stages if stage.precisions]


def _optimise(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: list[int],
    precision: str,
    callback: Callable[[Tensor], None] | None = None,
    regions: Tensor | None = None,
) -> tuple[StylizeResult, Tensor]:
    """One optimisation of the batch at ``precision``; also returns which images ended >2% above their best.

    The stages of :func:`schedule` run in turn, each from the previous stage's result; the initial and final
    terms are at full size, in the last evaluation's precision.
    """
    plan = schedule(cfg, precision, content.shape[-2:])
    names = list(cfg.style_layers)
    if regions is not None:
        names += [region_key(layer) for layer in cfg.style_layers]
    full = {name: targets[name] for name in names}
    coarse = {name: targets.get(coarse_key(name), targets[name]) for name in names}
    if regions is not None:
        full[PRESENT] = coarse[PRESENT] = targets[PRESENT]
    full_start = start = initial_images(model_input(content, cfg), cfg.init, seeds)
    finite = torch.ones(len(content), dtype=torch.bool, device=content.device)
    evaluations = torch.zeros(len(content), dtype=torch.long, device=content.device)
    rejected = torch.zeros_like(evaluations)
    end = plan[-1].precisions[-1]
    initial = x = None
    if plan[0].scale != 1.0:
        with torch.no_grad():
            target = content_features(features, content, cfg, end)
            initial = objective(features, to_space(start, cfg), target, full, cfg, end, regions)
    for stage in plan:
        size = scaled_size(content.shape[-2:], stage.scale)
        if x is not None:
            upsampled = resize(from_space(x, cfg), size)
            start = _better_start(features, content, full_start, upsampled, full, cfg, end, regions)
        elif stage.scale != 1.0:
            start = initial_images(model_input(resize(content, size), cfg), cfg.init, seeds)
        stage_targets = full if stage.scale == 1.0 else coarse
        stage_regions = None if regions is None else layer_masks(regions, size)
        run = _run_stage(
            features,
            resize(content, size),
            to_space(start, cfg),
            stage_targets,
            cfg,
            stage,
            callback,
            stage_regions,
        )
        x, finite = run.x, finite & run.finite
        initial = run.first if initial is None else initial
        evaluations += run.evaluations
        rejected += run.rejected
    with torch.no_grad():
        target = content_features(features, content, cfg, end)
        final = objective(features, x, target, full, cfg, end, regions)
        result = from_space(x, cfg).clamp(0, 1)
    finite &= torch.isfinite(final.total)
    lowest = torch.minimum(run.lowest, final.total)
    strayed = final.total - lowest > (STRAY_TOLERANCE - 1) * lowest.abs()
    if cfg.preserve_color != "none":
        result = keep_color(result, content)
    return StylizeResult(
        result,
        final.content,
        final.style,
        final.tv,
        final.total,
        finite,
        torch.zeros_like(finite),
        initial.content,
        initial.style,
        initial.tv,
        initial.total,
        evaluations,
        rejected,
    ), strayed


@torch.no_grad()
def _better_start(
    features: VGGFeatures,
    content: Tensor,
    initial: Tensor,
    upsampled: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    precision: str,
    regions: Tensor | None = None,
) -> Tensor:
    """Per image, the upsampled coarse result, or the start image where that has the higher full-size loss.

    Upsampling loses the finest detail; on an image made of it (noise) the coarse result can be worse than
    the start, and the full-size stage then starts from the start image.
    """
    upsampled = upsampled.clamp(0, 1) if cfg.clamp else upsampled
    target = content_features(features, content, cfg, precision)
    losses = [
        objective(features, to_space(x, cfg), target, targets, cfg, precision, regions).total
        for x in (initial, upsampled)
    ]
    keep = losses[1] <= losses[0]
    return torch.where(keep.view(-1, 1, 1, 1), upsampled, initial)


@dataclass
class _StageRun:
    """What one stage of :func:`_optimise` ended with."""

    x: Tensor  # (B, 3, h, w) the images each optimiser holds, in the objective's units
    lowest: Tensor  # (B,) the lowest loss seen
    first: Losses  # the losses at the stage's start
    finite: Tensor  # (B,) bool: loss and gradient finite at the stage's start
    evaluations: Tensor  # (B,) long: evaluations before each image stopped
    rejected: Tensor  # (B,) long: trial points the line search rejected


def _run_stage(
    features: VGGFeatures,
    content: Tensor,
    x: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    stage: Stage,
    callback: Callable[[Tensor], None] | None,
    regions: Tensor | None = None,
) -> _StageRun:
    """The evaluations of ``stage`` from ``x`` (objective units) at ``x``'s size, with one optimiser."""
    content_target = {p: content_features(features, content, cfg, p) for p in set(stage.precisions)}
    # a contiguous copy: the optimiser writes its trial points through a flat view (content may be permuted)
    x = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    opt = make_optimizer(x, dataclasses.replace(cfg, iterations=len(stage.precisions)))
    lowest = torch.full((len(x),), float("inf"), device=x.device)
    first = finite = None
    for precision in stage.precisions:
        view = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
        losses = objective(features, view, content_target[precision], targets, cfg, precision, regions)
        (grad,) = torch.autograd.grad(losses.total.sum(), x)
        if first is None:
            first = Losses(*(getattr(losses, f.name).detach() for f in dataclasses.fields(Losses)))
            finite = torch.isfinite(losses.total) & torch.isfinite(grad).flatten(1).all(1)
        lowest = torch.minimum(lowest, torch.nan_to_num(losses.total.detach(), nan=float("inf")))
        opt.step(x, losses.total.detach(), grad, finite)
        if callback is not None:
            with torch.no_grad():
                callback(from_space(opt.best.reshape(x.shape), cfg).clamp(0, 1))
    best = opt.best.reshape(x.shape).detach()
    return _StageRun(best, lowest, first, finite, opt.evaluations.clone(), opt.rejected.clone())
