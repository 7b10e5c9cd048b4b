"""Licences and attribution that travel with every real or derived image.

ISIC images carry one of three Creative Commons licences; each image's licence and attribution are kept per
row in ``metadata.csv`` and listed again in ``ATTRIBUTION.md`` beside the data, with the licence notices in
``LICENSES/``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stda_hf.core.fileio import write_text


@dataclass(frozen=True)
class License:
    """A licence as ISIC names it, with its Hub (SPDX-style) id and canonical deed."""

    isic_name: str  # the value in ISIC's ``copyright_license`` column
    hub_id: str  # the id the Hub's dataset-card ``license`` field uses
    title: str
    url: str
    restrictiveness: int  # higher is more restrictive; the card's licence is the most restrictive present


LICENSES = {
    lic.isic_name: lic
    for lic in (
        License(
            "CC-0",
            "cc0-1.0",
            "CC0 1.0 Universal (Public Domain Dedication)",
            "https://creativecommons.org/publicdomain/zero/1.0/legalcode",
            0,
        ),
        License(
            "CC-BY",
            "cc-by-4.0",
            "Creative Commons Attribution 4.0 International",
            "https://creativecommons.org/licenses/by/4.0/legalcode",
            1,
        ),
        License(
            "CC-BY-NC",
            "cc-by-nc-4.0",
            "Creative Commons Attribution-NonCommercial 4.0 International",
            "https://creativecommons.org/licenses/by-nc/4.0/legalcode",
            2,
        ),
    )
}
UNKNOWN_LICENSE = License("unknown", "other", "Unknown licence: ask the image's owner before reuse", "", 3)


def get_license(name: str) -> License:
    """The :class:`License` for an ISIC licence name; unknown names map to :data:`UNKNOWN_LICENSE`."""
    return LICENSES.get(name, UNKNOWN_LICENSE)


def most_restrictive(names: Iterable[str]) -> License:
    """The most restrictive licence among ``names`` (what a dataset mixing them must be published under)."""
    present = [get_license(n) for n in set(names)]
    if not present:
        raise ValueError("no licences given")
    return max(present, key=lambda lic: lic.restrictiveness)


def write_attribution(root: str | Path, rows: Iterable[dict], title: str = "Attribution") -> None:
    """Write ``ATTRIBUTION.md`` (every image id with its licence and attribution) and ``LICENSES/*.txt``.

    Parameters
    ----------
    root : path
        Folder to write into.
    rows : iterable of dict
        Each with ``isic_id``, ``copyright_license`` and ``attribution``.
    """
    root = Path(root)
    rows = sorted(rows, key=lambda r: r["isic_id"])
    counts = Counter(r["copyright_license"] for r in rows)
    lines = [f"# {title}", "", "Every image keeps its licence and attribution. Licences present:", ""]
    lines += [
        f"- {name}: {n} image(s) ({get_license(name).title}) {get_license(name).url}"
        for name, n in sorted(counts.items())
    ]
    lines += ["", "| id | licence | attribution |", "|---|---|---|"]
    lines += [f"| {r['isic_id']} | {r['copyright_license']} | {_cell(r['attribution'])} |" for r in rows]
    write_text(root / "ATTRIBUTION.md", "\n".join(lines) + "\n")
    for name in sorted(counts):
        lic = get_license(name)
        write_text(
            root / "LICENSES" / f"{lic.hub_id}.txt",
            f"{lic.title}\n\nApplies to the images listed with licence {name!r} in ATTRIBUTION.md.\n"
            f"Full legal code: {lic.url or 'not known; contact the rights holder.'}\n",
        )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
