"""The benchmark's figures: metric box plots, learning curves and a side-by-side of heatmap grids."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from stda_hf.benchmark.config import RunKey
from stda_hf.benchmark.report import _title
from stda_hf.benchmark.stats import values_by_pair

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arm_colors(arms: list[str]) -> dict[str, Any]:
    cmap = _pyplot().get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_boxplots(rows: list[dict[str, Any]], arms: list[str], metrics: list[str], path: Path) -> Path:
    """One box plot per metric, a box per arm, every run drawn as a point (jittered); written to ``path``."""
    plt = _pyplot()
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    rng = np.random.default_rng(0)
    colors = _arm_colors(arms)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        data = [list(values_by_pair(rows, a, metric).values()) for a in arms]
        ax.boxplot(data, showfliers=False, widths=0.5)
        for i, (arm, values) in enumerate(zip(arms, data, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=colors[arm], zorder=3)
        # long arm names (mix_clean_content) collide when many arms share an axis: slant them, anchored right
        slant = (
            {"rotation": 40, "ha": "right", "rotation_mode": "anchor"} if len(arms) > 4 else {"rotation": 20}
        )
        ax.set_xticks(range(1, len(arms) + 1), arms, fontsize=8, **slant)
        ax.set_title(_title(metric), fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    return _save_figure(fig, path)


def plot_learning_curves(
    logs: dict[RunKey, list[dict[str, float]]], arms: list[str], metric: str, path: Path
) -> Path:
    """Training loss and validation ``metric`` per epoch: a thin line per run, coloured by arm."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    colors = _arm_colors(arms)
    for key, records in sorted(logs.items()):
        for ax, column in zip(axes, ("train_loss", f"val_{metric}"), strict=True):
            points = [(r["epoch"], r[column]) for r in records if _finite(r.get(column)) and "epoch" in r]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, color=colors.get(key.arm, "gray"), alpha=0.6, lw=1)
    for ax, title in zip(axes, ("training loss", f"validation {_title(metric)}"), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in arms]
    axes[1].legend(handles=handles, fontsize=7, frameon=False)
    return _save_figure(fig, path)


def plot_heatmaps(images: dict[str, Path], path: Path, caption: str = "") -> Path:
    """The arms' heatmap grids of the same fold, seed and images, one above the other, each under its arm's name.

    Composed at the grids' own resolution (no resampling), so every pixel of the heatmaps stays readable.
    """
    from PIL import Image, ImageDraw, ImageFont

    from stda_hf.data.images import load_image, save_image

    grids = {arm: load_image(p) for arm, p in images.items()}
    font = ImageFont.load_default(size=14)
    bar = 24
    width = max(g.width for g in grids.values())
    height = bar * (len(grids) + bool(caption)) + sum(g.height for g in grids.values())
    canvas = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    if caption:
        draw.text((6, y + 4), caption, fill="black", font=font)
        y += bar
    for arm, grid in grids.items():
        draw.text((6, y + 4), arm, fill="black", font=font)
        canvas.paste(grid, (0, y + bar))
        y += bar + grid.height
    save_image(canvas, path)
    return path


def _save_figure(fig, path: Path) -> Path:
    from stda_hf.core.fileio import atomic_write

    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    _pyplot().close(fig)
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
