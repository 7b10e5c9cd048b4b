"""The README's style-transfer figure: content, style and result for a few phantom pairs, made by ``stda generate``.

    .venv/bin/python benchmarks/nst_figure.py                         # offline: random VGG weights
    .venv/bin/python benchmarks/nst_figure.py --weights imagenet      # online (or --weights vgg19.safetensors)

Runs the real stage (:func:`stda_hf.generate.generate`) on a split phantom folder and lays out one row per pair
from its manifest: benign content | malignant style | result. Writes ``docs/generate_pairs.jpg``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from stda_hf.fileio import read_jsonl
from stda_hf.generate import GenerateConfig, generate
from stda_hf.phantoms import PhantomConfig, make_phantoms
from stda_hf.real import read_real_folder
from stda_hf.split import SplitConfig, make_splits

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
    p.add_argument("--weights", default="random", help="imagenet, a file, or random (default: random)")
    p.add_argument("--out", type=Path, default=DOCS / "generate_pairs.jpg", help="figure file")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
