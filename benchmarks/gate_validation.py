"""Validation of the quality gate: its verdicts on cases whose right answer is known, as rates per case.

::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gate_validation.py                 # 32 phantom pairs, 224 px
    .venv/bin/python benchmarks/gate_validation.py --pairs 8 --gatys-pairs 0         # a quick look
    .venv/bin/python benchmarks/gate_validation.py --figure docs/gate_verdicts.jpg   # and one picture per verdict

Phantom pairs (benign content with its lesion mask, malignant style) at ``--size``; every case is a result the
gate judges against the content image and the style image, on its 8-bit pixels as ``stda generate`` saves them:

- ``identity``, ``blur 0.5/1/2`` (Gaussian, sigma in pixels), ``jpeg q30``, ``jitter`` (per-channel gain
  within 6 %, brightness within 0.03), ``noise`` (Gaussian, sigma 0.04): no style applied, so never ``ok``;
- ``wipe (arbitrary)``: the arbitrary engine applied to uniform noise (the style only, nothing of the content),
  ``wipe (gatys)``: Gatys with content weight 0 from noise; ``lesion erased``: the lesion (mask grown by 3 % of
  the side) inpainted with the surrounding skin and its grain: always ``content_lost``;
- ``arbitrary``: the arbitrary engine's outputs (``content_lost`` at most 5 %), ``gatys``: the Gatys engine's
  default preset on ``vgg19-imagenet`` (``--gatys-size``, ``--gatys-iterations``; reported, no requirement).

The script prints the verdict rates per case and whether each requirement holds, and exits 1 when one does
not. ``tests/test_gate_validation.py`` runs a reduced form. ``--figure`` draws, per verdict, content, style and
result of one arbitrary-engine output with that verdict where there is one (else of a perturbation), with
its measures.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.real import read_real_folder
from stda_hf.generate.engines import as_saved
from stda_hf.generate.quality import VERDICTS, QualityGate, QualityRecord, StyleDistance, assess
from stda_hf.generate.stage import load_content, load_mask

logger = logging.getLogger(__name__)

NEVER_OK = "never ok"
ALWAYS_LOST = "always content_lost"
LOST_AT_MOST_5 = "content_lost <= 5%"


@dataclass
class Pairs:
    """Phantom pairs: content images, their lesion masks and style images, (B, 3, S, S) / (B, S, S) each."""

    content: torch.Tensor
    mask: torch.Tensor
    style: torch.Tensor


def phantom_pairs(root: Path, pairs: int, size: int, seed: int = 0) -> Pairs:
    """``pairs`` benign content images (with masks) and malignant style images of a fresh phantom folder."""
    make_phantoms(root, PhantomConfig(n=4 * pairs + 8, size=size, seed=seed))
    folder = read_real_folder(root)
    benign = [im for im in folder.labelled if im.label == "benign"][:pairs]
    malignant = [im for im in folder.labelled if im.label == "malignant"][:pairs]
    n = min(len(benign), len(malignant))
    return Pairs(
        content=torch.stack([load_content(im.path, size) for im in benign[:n]]),
        mask=torch.stack([load_mask(im.mask_path, size) for im in benign[:n]]),
        style=torch.stack([load_content(im.path, size) for im in malignant[:n]]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Perturbations: results whose right verdict is known


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, reflect padding, kernel of 3 sigma each side."""
    radius = max(1, round(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    c = images.shape[1]
    out = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="reflect"),
        g.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through a JPEG encoder at ``quality`` and back."""
    out = []
    for image in images:
        buf = io.BytesIO()
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()
        out.append(torch.from_numpy(decoded).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def colour_jitter(
    images: torch.Tensor, gen: torch.Generator, gain: float = 0.06, shift: float = 0.03
) -> torch.Tensor:
    """A small colour change: per-image, per-channel gain within ``1 +- gain``, brightness within ``+- shift``."""
    b = len(images)
    gains = 1 + gain * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)
    shifts = shift * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    return images * gains + shifts


def erase_lesion(images: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The lesion inpainted with skin: the mask grown by 3 % of the side, filled with the mean of the skin around
    it, smoothed into that skin by diffusion, plus grain with the skin's own fine-scale spread."""
    grow = max(1, round(0.03 * images.shape[-1]))
    hole = F.max_pool2d(mask[:, None].float(), 2 * grow + 1, 1, grow) > 0
    known = ~hole
    ring = (F.max_pool2d(hole.float(), 2 * grow + 1, 1, grow) > 0) & known
    mean = torch.stack([img[:, r[0]].mean(1) for img, r in zip(images, ring, strict=True)]).view(-1, 3, 1, 1)
    fill = torch.where(known, images, mean)
    for _ in range(images.shape[-1] // 2):  # smooths the start (the skin's mean) into the skin around it
        fill = torch.where(known, images, F.avg_pool2d(F.pad(fill, (1, 1, 1, 1), mode="replicate"), 3, 1))
    fine = images - gaussian_blur(images, 2.0)
    spread = torch.stack([f[:, r[0]].std(1) for f, r in zip(fine, ring, strict=True)]).view(-1, 3, 1, 1)
    grain = gaussian_blur(torch.randn(images.shape, generator=gen), 0.7)
    grain = grain / grain.std((1, 2, 3), keepdim=True) * spread
    return torch.where(known, images, fill + grain)


def arbitrary_results(contents: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """The arbitrary engine's outputs (default settings), batches of 8."""
    from stda_hf.generate import arbitrary

    models, cfg = arbitrary.load_models("cpu"), arbitrary.ArbitraryConfig()
    out = []
    for i in range(0, len(contents), 8):
        vectors = arbitrary.style_vectors(models, styles[i : i + 8], cfg)
        out.append(arbitrary.stylize(models, contents[i : i + 8], vectors, cfg).images)
    return torch.cat(out)


def gatys_results(
    contents: torch.Tensor, styles: torch.Tensor, size: int, iterations: int, **settings
) -> torch.Tensor:
    """The Gatys engine (default preset, ``vgg19-imagenet``) at ``size``, resized back to the pairs' side."""
    from stda_hf.generate.engines import GatysEngine
    from stda_hf.generate.nst import NSTConfig, stack_targets
    from stda_hf.models.weights import parse_weights

    side = contents.shape[-1]
    down = F.interpolate(contents, size=(size, size), mode="area") if size != side else contents
    style_down = F.interpolate(styles, size=(size, size), mode="area") if size != side else styles
    cfg = NSTConfig(iterations=iterations, precision="fp32", **settings)
    engine = GatysEngine(cfg, parse_weights("vgg19-imagenet"), torch.device("cpu"), size)
    states = stack_targets([engine.style_state(s) for s in style_down])
    images = engine.run(down, states, list(range(len(contents)))).images.clamp(0, 1)
    return F.interpolate(images, size=(side, side), mode="bicubic").clamp(0, 1) if size != side else images


def perturbations(pairs: Pairs, seed: int = 0) -> dict[str, torch.Tensor]:
    """The cases that need no engine, as 8-bit results (:func:`as_saved`)."""
    gen = torch.Generator().manual_seed(seed)
    c = pairs.content
    cases = {
        "identity": c.clone(),
        "blur 0.5": gaussian_blur(c, 0.5),
        "blur 1": gaussian_blur(c, 1.0),
        "blur 2": gaussian_blur(c, 2.0),
        "jpeg q30": jpeg(c, 30),
        "jitter": colour_jitter(c, gen),
        "noise": c + 0.04 * torch.randn(c.shape, generator=gen),
        "lesion erased": erase_lesion(c, pairs.mask, gen),
    }
    return {name: as_saved(images) for name, images in cases.items()}


REQUIREMENTS = {
    "identity": NEVER_OK,
    "blur 0.5": NEVER_OK,
    "blur 1": NEVER_OK,
    "blur 2": NEVER_OK,
    "jpeg q30": NEVER_OK,
    "jitter": NEVER_OK,
    "noise": NEVER_OK,
    "wipe (arbitrary)": ALWAYS_LOST,
    "wipe (gatys)": ALWAYS_LOST,
    "lesion erased": ALWAYS_LOST,
    "arbitrary": LOST_AT_MOST_5,
}
"""What the issue requires of each case (cases not named here are reported only)."""


def meets(requirement: str | None, rates: dict[str, float]) -> bool | None:
    """Whether verdict rates meet a requirement (None: no requirement)."""
    if requirement == NEVER_OK:
        return rates["ok"] == 0
    if requirement == ALWAYS_LOST:
        return rates["content_lost"] == 1
    if requirement == LOST_AT_MOST_5:
        return rates["content_lost"] <= 0.05
    return None


def rates_of(records: list[QualityRecord]) -> dict[str, float]:
    """Share of each verdict among ``records``."""
    counts = Counter(r.verdict for r in records)
    return {v: counts[v] / len(records) for v in VERDICTS}


def judge(
    pairs: Pairs, cases: dict[str, torch.Tensor], scorer: StyleDistance, gate: QualityGate | None = None
) -> dict[str, list[QualityRecord]]:
    """The gate's records of every case (style Gram matrices computed once)."""
    grams = scorer.grams(pairs.style)
    return {
        name: assess(pairs.content, grams, images, scorer, mask=pairs.mask, gate=gate)
        for name, images in cases.items()
    }


def table(records: dict[str, list[QualityRecord]]) -> tuple[str, bool]:
    """The rates table (Markdown) and whether every requirement holds."""
    lines = [
        "| case | n | ok | unchanged | content_lost | style reduction (median) | structure (min-max) | required | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_met = True
    for name, recs in records.items():
        rates = rates_of(recs)
        need = REQUIREMENTS.get(name)
        met = meets(need, rates)
        all_met &= met is not False
        reduction = float(np.median([r.style_reduction for r in recs]))
        structure = [r.structure for r in recs]
        lines.append(
            f"| {name} | {len(recs)} | {rates['ok']:.0%} | {rates['unchanged']:.0%} | {rates['content_lost']:.0%} "
            f"| {reduction:.2f} | {min(structure):.2f}-{max(structure):.2f} | {need or '-'} "
            f"| {'-' if met is None else ('yes' if met else 'NO')} |"
        )
    return "\n".join(lines), all_met


# ----------------------------------------------------------------------------------------------------------------
# The figure: one picture per verdict


def _tile(image: torch.Tensor, side: int) -> Image.Image:
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)


def figure(
    pairs: Pairs, cases: dict[str, torch.Tensor], records: dict[str, list[QualityRecord]], out: Path
) -> None:
    """One row per verdict (content with its mask outline, style, result, measures), from the cases that show it
    best: an arbitrary-engine output that is ``ok`` (the one with the median style reduction), a blur (``unchanged``),
    an erased lesion and a wipe (``content_lost``)."""
    side, text_w, head = 160, 300, 22
    rows = []
    for wanted, name in (
        ("ok", "arbitrary"),
        ("unchanged", "blur 1"),
        *[("content_lost", n) for n in ("lesion erased", "wipe (arbitrary)")],
    ):
        found = sorted(
            (r.style_reduction, i) for i, r in enumerate(records.get(name, [])) if r.verdict == wanted
        )
        if found:
            rows.append((wanted, name, found[len(found) // 2][1]))
    sheet = Image.new("RGB", (3 * side + text_w, head + len(rows) * (side + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("content (green: lesion mask)", "style", "result", "the gate's measures")):
        draw.text((col * side + 6, 5), title, fill="black")
    for row, (wanted, name, i) in enumerate(rows):
        y = head + row * (side + 8)
        content = _tile(pairs.content[i], side)
        edge = pairs.mask[i][None, None].float()
        outline = (F.max_pool2d(edge, 3, 1, 1) - edge)[0, 0] > 0
        outline = F.interpolate(outline[None, None].float(), size=(side, side), mode="nearest")[0, 0] > 0
        pixels = np.asarray(content).copy()
        pixels[outline.numpy()] = (0, 255, 0)
        sheet.paste(Image.fromarray(pixels), (0, y))
        sheet.paste(_tile(pairs.style[i], side), (side, y))
        sheet.paste(_tile(cases[name][i], side), (2 * side, y))
        r = records[name][i]
        text = (
            f"verdict: {wanted}\ncase: {name}\nstyle reduction {r.style_reduction:.2f}\n"
            f"lesion contrast kept {r.lesion_contrast:.2f}\nlesion similarity {r.lesion_similarity:.2f}\n"
            f"skin similarity {r.skin_similarity:.2f}\nstructure {r.structure:.2f}"
        )
        draw.multiline_text((3 * side + 10, y + 10), text, fill="black", spacing=4)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=88)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32, help="phantom pairs (default: 32)")
    parser.add_argument("--size", type=int, default=224, help="side of the images in pixels (default: 224)")
    parser.add_argument(
        "--gatys-pairs", type=int, default=4, help="pairs run through Gatys (default: 4; 0: none)"
    )
    parser.add_argument("--gatys-size", type=int, default=96, help="side Gatys runs at (default: 96)")
    parser.add_argument("--gatys-iterations", type=int, default=30, help="Gatys evaluations (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="phantoms and perturbations (default: 0)")
    parser.add_argument("--figure", type=Path, help="also draw one picture per verdict to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = phantom_pairs(Path(tmp) / "real", args.pairs, args.size, args.seed)
    cases = perturbations(pairs, args.seed)
    cases["arbitrary"] = as_saved(arbitrary_results(pairs.content, pairs.style))
    noise = torch.rand(pairs.content.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    cases["wipe (arbitrary)"] = as_saved(arbitrary_results(noise, pairs.style))
    scorer = StyleDistance()
    records = judge(pairs, cases, scorer)
    k = min(args.gatys_pairs, len(pairs.content))
    if k:
        small = Pairs(pairs.content[:k], pairs.mask[:k], pairs.style[:k])
        gatys = {
            "gatys": as_saved(
                gatys_results(small.content, small.style, args.gatys_size, args.gatys_iterations)
            ),
            "wipe (gatys)": as_saved(
                gatys_results(
                    small.content,
                    small.style,
                    args.gatys_size,
                    args.gatys_iterations,
                    content_weight=0.0,
                    init="noise",
                )
            ),
        }
        records.update(judge(small, gatys, scorer))
        cases.update(gatys)
    text, ok = table(records)
    print(
        f"quality gate on {len(pairs.content)} phantom pairs at {args.size} px, features {scorer.name}, gate "
        f"{QualityGate()}; Gatys on {k} pairs at {args.gatys_size} px, {args.gatys_iterations} evaluations"
    )
    print(text)
    print(f"every requirement met: {'yes' if ok else 'NO'} ({time.perf_counter() - start:.0f} s)")
    if args.figure:
        figure(pairs, cases, records, args.figure)
        print(f"figure: {args.figure}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
