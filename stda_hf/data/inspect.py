"""``stda inspect``: what a real-image folder holds (counts per class, licence and split, sizes, masks) and what is wrong with it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stda_hf import SPLITS
from stda_hf.core.errors import BadImageError
from stda_hf.core.utils import progress
from stda_hf.data.images import SkipReport, load_image
from stda_hf.data.real import MIN_PER_CLASS, read_real_folder, small_classes


@dataclass
class InspectReport:
    """What ``stda inspect`` prints: counts, licences, splits, sizes and bad files."""

    root: Path
    layout: str
    per_class: dict[str, int]
    per_license: dict[str, int]
    per_split: dict[str, dict[str, int]]  # split -> class -> count; empty before `stda split`
    sizes: dict[str, int]  # min/median/max width and height
    masks: int
    bad: dict[str, str]
    left_out: dict[str, str] = field(
        default_factory=dict
    )  # files of the folder that are not among its images
    unsplit: int = 0  # labelled images splits.csv does not assign (added after `stda split`)
    below_minimum: list[str] = field(default_factory=list)  # validation/test classes with too few images

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"{self.root} ({self.layout} layout): {sum(self.per_class.values())} images"]
        lines.append("  per class:   " + ", ".join(f"{k} {v}" for k, v in self.per_class.items()))
        lines.append("  per licence: " + ", ".join(f"{k} {v}" for k, v in self.per_license.items()))
        if self.per_split:
            for split, counts in self.per_split.items():
                lines.append(f"  {split:<11}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        else:
            lines.append("  splits:      none yet (run `stda split`)")
        lines += [f"  too few:     {line}" for line in self.below_minimum]
        s = self.sizes
        if s:
            lines.append(
                f"  sizes:       width {s['width_min']}-{s['width_max']} (median {s['width_median']}), "
                f"height {s['height_min']}-{s['height_max']} (median {s['height_median']})"
            )
        lines.append(f"  masks:       {self.masks}")
        lines.append(f"  bad files:   {len(self.bad)}")
        lines += [f"    {path}: {reason}" for path, reason in sorted(self.bad.items())]
        lines.append(f"  left out:    {len(self.left_out)}")
        lines += [f"    {path}: {reason}" for path, reason in sorted(self.left_out.items())]
        if self.unsplit:
            lines.append(f"  in no split: {self.unsplit} labelled image(s); run `stda split` again")
        return "\n".join(lines)


def inspect_folder(root: str | Path, decode: bool = True) -> InspectReport:
    """Summarise a real-image folder; with ``decode`` every image is fully decoded to find bad files."""
    folder = read_real_folder(root)
    report = SkipReport()
    widths, heights = [], []
    for im in progress(folder.images, desc="inspect", unit="img"):
        try:
            if decode:
                w, h = load_image(im.path).size
            else:
                with Image.open(im.path) as img:
                    w, h = img.size
        except (BadImageError, OSError) as err:
            report.add(im.path, getattr(err, "reason", str(err)))
            continue
        widths.append(w)
        heights.append(h)
    per_split: dict[str, dict[str, int]] = {}
    if folder.splits_path.is_file():
        assignment = folder.splits()
        for split in SPLITS:
            per_split[split] = dict(
                sorted(
                    Counter(
                        im.label or "indeterminate"
                        for im in folder.images
                        if assignment.get(im.isic_id) == split
                    ).items()
                )
            )
    return InspectReport(
        root=folder.root,
        layout=folder.layout,
        per_class=dict(sorted(Counter(im.label or "indeterminate" for im in folder.images).items())),
        per_license=dict(sorted(Counter(im.copyright_license for im in folder.images).items())),
        per_split=per_split,
        sizes=_size_stats(widths, heights),
        masks=sum(im.mask_path is not None for im in folder.images),
        bad=report.skipped,
        left_out=folder.left_out,
        unsplit=len(folder.unsplit()) if per_split else 0,
        below_minimum=small_classes(per_split, _min_per_class(folder.root)) if per_split else [],
    )


def _min_per_class(root: Path) -> int:
    """The ``min_per_class`` that ``stda split`` used (``split_summary.json``), else :data:`MIN_PER_CLASS`."""
    try:
        config = json.loads((root / "split_summary.json").read_text(encoding="utf-8"))["config"]
        return int(config.get("min_per_class", MIN_PER_CLASS))
    except (OSError, ValueError, KeyError, TypeError):
        return MIN_PER_CLASS


def _size_stats(widths: list[int], heights: list[int]) -> dict[str, int]:
    if not widths:
        return {}
    ws, hs = sorted(widths), sorted(heights)
    return {
        "width_min": ws[0],
        "width_median": ws[len(ws) // 2],
        "width_max": ws[-1],
        "height_min": hs[0],
        "height_median": hs[len(hs) // 2],
        "height_max": hs[-1],
    }
