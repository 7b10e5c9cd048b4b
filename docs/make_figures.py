"""Regenerate the README's data figures: ``python docs/make_figures.py`` (writes docs/phantoms.jpg).

Figures of later stages (style transfer, heatmaps, training curves) are written by their own scripts in
``benchmarks/`` and by ``stda demo``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from stda_hf.phantoms import PhantomConfig, make_phantoms
from stda_hf.real import read_real_folder

DOCS = Path(__file__).resolve().parent


def phantom_grid(out: Path, per_row: int = 8, size: int = 160) -> None:
    """Benign phantoms on the top row, malignant on the bottom, at ``size`` px."""
    with tempfile.TemporaryDirectory() as tmp:
        make_phantoms(tmp, PhantomConfig(n=60, size=224, seed=0))
        folder = read_real_folder(tmp)
        grid = Image.new("RGB", (per_row * size, 2 * size), "white")
        for row, label in enumerate(("benign", "malignant")):
            for col, im in enumerate([im for im in folder.images if im.label == label][:per_row]):
                grid.paste(Image.open(im.path).resize((size, size), Image.LANCZOS), (col * size, row * size))
        grid.save(out, quality=88)


if __name__ == "__main__":
    phantom_grid(DOCS / "phantoms.jpg")
    print(f"wrote {DOCS / 'phantoms.jpg'}")
