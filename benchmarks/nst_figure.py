"""The README's style-transfer figure: content, style and result for a few phantom pairs, made by ``stda generate``.

    .venv/bin/python benchmarks/nst_figure.py                         # the engine's default weights (vgg19-imagenet)
    .venv/bin/python benchmarks/nst_figure.py --weights random        # or imagenet (online), or a file
    .venv/bin/python benchmarks/nst_figure.py --thresholds            # the quality gate's measures on phantoms

Runs the real stage (:func:`stda_hf.generate.stage.generate`) on a split phantom folder and lays out one row per pair
from its manifest: benign content | malignant style | result. Writes ``docs/generate_pairs.jpg``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from stda_hf.core.fileio import read_jsonl
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.real import read_real_folder
from stda_hf.data.split import SplitConfig, make_splits
from stda_hf.generate.stage import GenerateConfig, generate
from stda_hf.models.weights import default_weights

os.environ.setdefault("STDA_NO_PROGRESS", "1")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def figure(records: list[dict], real: Path, synthetic: Path, size: int) -> Image.Image:
    """Rows of content | style | result, with a header naming the columns."""
    folder = read_real_folder(real)
    header = 18
    grid = Image.new("RGB", (3 * size, header + len(records) * size), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(("content (benign)", "style (malignant)", "result")):
        draw.text((col * size + 6, 3), title, fill="black")
    for row, r in enumerate(records):
        paths = (folder[r["content_id"]].path, folder[r["style_id"]].path, synthetic / r["file"])
        for col, path in enumerate(paths):
            with Image.open(path) as img:
                tile = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
            grid.paste(tile, (col * size, header + row * size))
    return grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4, help="rows (default: 4)")
    p.add_argument("--size", type=int, default=128, help="image side (default: 128)")
    p.add_argument("--iterations", type=int, default=50, help="L-BFGS evaluations (default: 50)")
    p.add_argument(
        "--weights",
        default=default_weights(),
        help=f"vgg19-imagenet, imagenet, a file, or random (default: {default_weights()})",
    )
    p.add_argument("--out", type=Path, default=DOCS / "generate_pairs.jpg", help="figure file")
    p.add_argument("--thresholds", action="store_true", help="print the quality gate's measures instead")
    args = p.parse_args(argv)
    if args.thresholds:
        measure_gate(args.pairs * 2, 64, args.iterations)
        return
    with tempfile.TemporaryDirectory() as tmp:
        real, synthetic = Path(tmp) / "real", Path(tmp) / "synthetic"
        make_phantoms(real, PhantomConfig(n=120, size=args.size, seed=0))
        make_splits(real, SplitConfig(seed=0))
        cfg = GenerateConfig(
            weights=args.weights, size=args.size, iterations=args.iterations, per_content=1, limit=args.pairs
        )
        print(generate(real, synthetic, cfg).format())
        grid = figure(read_jsonl(synthetic / "manifest.jsonl"), real, synthetic, args.size)
        grid.save(args.out, quality=90)
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------------------
# The quality gate's thresholds (python benchmarks/nst_figure.py --thresholds)


def measure_gate(pairs: int = 8, size: int = 64, iterations: int = 50) -> None:
    """Print the gate's measures on phantom pairs for the default preset, a no-op and a wipe (random weights)."""
    import dataclasses

    import numpy as np
    import torch

    from stda_hf.generate.nst import NSTConfig, style_targets, stylize
    from stda_hf.generate.quality import StyleDistance, assess
    from stda_hf.generate.stage import load_content
    from stda_hf.models.features import build_vgg_features

    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real"
        make_phantoms(real, PhantomConfig(n=4 * pairs + 8, size=size, seed=0))
        folder = read_real_folder(real)
        benign = [im for im in folder.labelled if im.label == "benign"][:pairs]
        malignant = [im for im in folder.labelled if im.label == "malignant"][:pairs]
        content = torch.stack([load_content(im.path, size) for im in benign])
        style = torch.stack([load_content(im.path, size) for im in malignant])
        masks = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(im.mask_path).resize((size, size))) > 127)
                for im in benign
            ]
        )
    scorer = StyleDistance()
    base = NSTConfig(iterations=iterations, precision="fp32")
    features = build_vgg_features(base.arch, base.layers(), base.pooling, "random")
    runs = {
        "default preset": base,
        "wipe (content weight 0, noise start)": dataclasses.replace(base, content_weight=0.0, init="noise"),
        "wipe (content weight 0, content start)": dataclasses.replace(base, content_weight=0.0),
    }
    print(f"{pairs} phantom pairs, {size} px, random VGG weights, {iterations} evaluations")
    results = {"no-op (0 evaluations)": content.clone()}
    for name, cfg in runs.items():
        results[name] = stylize(features, content, style_targets(features, style, cfg), cfg).images
    for name, images in results.items():
        records = assess(content, style, images, scorer, mask=masks)
        cols = {
            k: [getattr(r, k) for r in records]
            for k in (
                "style_reduction",
                "lesion_contrast",
                "lesion_similarity",
                "structure",
                "mean_abs_change",
            )
        }
        text = "; ".join(
            f"{k} " + " ".join("-" if x is None else f"{x:.2f}" for x in v) for k, v in cols.items()
        )
        verdicts = {v: [r.verdict for r in records].count(v) for v in ("ok", "unchanged", "content_lost")}
        print(f"{name}: {text}; verdicts {verdicts}")


if __name__ == "__main__":
    main()
