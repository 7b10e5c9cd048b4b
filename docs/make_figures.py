"""Regenerate the README's figures: ``OMP_NUM_THREADS=1 python docs/make_figures.py [phantoms|engines]``.

``phantoms`` writes docs/phantoms.jpg; ``engines`` writes docs/engines.jpg (the same phantom pairs through each
style-transfer engine, made by ``stda generate`` itself: Gatys's two presets on the ImageNet VGG19 of the
``imagenet`` extra, offline, and the arbitrary engine; about ten minutes on one CPU core). Other figures
(heatmaps, training curves) are written by their own scripts in ``benchmarks/`` and by ``stda demo``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from stda_hf.core.fileio import read_jsonl
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.real import read_real_folder

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


ENGINE_RUNS = {  # column title -> stda generate settings (Gatys: the imagenet extra's VGG19, offline)
    "Gatys, whole frame\n(--regions none)": {
        "engine": "gatys",
        "weights": "vgg19-imagenet",
        "iterations": 100,
        "regions": "none",
    },
    "Gatys, --regions\nlesion-skin (default)": {
        "engine": "gatys",
        "weights": "vgg19-imagenet",
        "iterations": 100,
        "regions": "lesion-skin",
    },
    "Gatys, --regions\nlesion": {
        "engine": "gatys",
        "weights": "vgg19-imagenet",
        "iterations": 100,
        "regions": "lesion",
    },
    "arbitrary, whole\nframe (--regions none)": {"engine": "arbitrary", "regions": "none"},
    "arbitrary, --regions\nlesion-skin (default)": {"engine": "arbitrary", "regions": "lesion-skin"},
}


def engine_grid(out: Path, pairs: int = 4, size: int = 128, tile: int = 160) -> list[str]:
    """One row per phantom pair (benign content, malignant style): content | style | each run of ENGINE_RUNS.

    Every run is ``stda generate`` with ``per_content=1`` and the same seed, so the rows hold the same pairs;
    returns one line per image with its quality verdict, style reduction and structure score.
    """
    from stda_hf.data.split import SplitConfig, make_splits
    from stda_hf.generate.stage import GenerateConfig, generate

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real"
        make_phantoms(real, PhantomConfig(n=60, size=224, seed=0))
        make_splits(real, SplitConfig(seed=0))
        folder = read_real_folder(real)
        results = {}
        for title, settings in ENGINE_RUNS.items():
            syn = Path(tmp) / f"syn{len(results)}"
            cfg = GenerateConfig(
                size=size, per_content=1, limit=pairs, batch=pairs, max_failed_share=1.0, **settings
            )
            generate(real, syn, cfg)
            results[title] = {
                (r["content_id"], r["style_id"]): (syn / r["file"], r["quality"])
                for r in read_jsonl(syn / "manifest.jsonl")
            }
        keys = sorted(next(iter(results.values())))
        head = 34
        grid = Image.new("RGB", ((2 + len(results)) * tile, head + len(keys) * tile), "white")
        draw = ImageDraw.Draw(grid)
        for col, title in enumerate(["content (benign)", "style (malignant)", *results]):
            draw.multiline_text((col * tile + 4, 2), title, fill="black", spacing=2)
        for row, (content_id, style_id) in enumerate(keys):
            paths = [folder[content_id].path, folder[style_id].path]
            paths += [results[t][(content_id, style_id)][0] for t in results]
            for col, path in enumerate(paths):
                grid.paste(
                    Image.open(path).convert("RGB").resize((tile, tile), Image.LANCZOS),
                    (col * tile, head + row * tile),
                )
            for title, found in results.items():
                q = found[(content_id, style_id)][1]
                lines.append(
                    f"{title.splitlines()[0]:<24} {content_id} x {style_id}: {q['verdict']:<12} style reduction "
                    f"{q['style_reduction']:.2f}, structure {q['structure']:.2f}, change {q['mean_abs_change']:.1f}"
                )
        grid.save(out, quality=88)
    return lines


if __name__ == "__main__":
    which = sys.argv[1:] or ["phantoms", "engines"]
    if "phantoms" in which:
        phantom_grid(DOCS / "phantoms.jpg")
        print(f"wrote {DOCS / 'phantoms.jpg'}")
    if "engines" in which:
        print("\n".join(engine_grid(DOCS / "engines.jpg")))
        print(f"wrote {DOCS / 'engines.jpg'}")
