"""Do style-transfer engines copy the style image's artifacts into synthetic images? Measured on phantoms.

::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/artifact_copy.py                       # both engines, regions none
    .venv/bin/python benchmarks/artifact_copy.py --regions none lesion-skin             # once --regions exists
    .venv/bin/python benchmarks/artifact_copy.py --engines arbitrary --n 24             # a quick look
    .venv/bin/python benchmarks/artifact_copy.py --validate                             # the measure's error rates

The run renders phantoms with artifacts (``stda phantoms``: ruler, colour patch, ink and dark corners at
``--style-rate`` each on malignant images, the styles, and ``--content-rate`` on benign ones, the contents; one
image per lesion and patient), splits them (``stda split``) and runs the real ``stda generate`` for each engine
and each ``--regions`` setting (passed as ``stda generate --regions``). Each synthetic image is judged by
:mod:`stda_hf.metrics.artifact_copy` against its content and style image and their artifact label maps: per
artifact kind of the style that the content lacks, copied or not.

A placebo arm checks the measure on the engines' real outputs: the same phantoms rendered without the styles'
artifacts (same seed, the malignant rates set to 0: the same photographs, identical but where the artifacts were
and in the JPEG blocks they touch), the same ``splits.csv`` and so the same pairs; their synthetic images are
judged against the style WITH its artifacts. No artifact was there to copy, so every "copied" in the placebo arm
is a false positive of the measure on that engine's output.

Printed per engine x regions x arm: the synthetic images made and those the quality gate passed; over the n
images whose style has a measurable artifact the content lacks, the share with any style artifact copied and its
95 % Wilson interval; per kind ``copied/measurable[Wilson interval]`` (a kind is measurable when the style image
itself would be judged a copy); and ``caused``: the pairs judged copied with the style's artifacts and not in
their placebo twin (the copies the artifacts caused, net of what the engine makes up by itself). A picture grid
(content | style | synthetic with the evidence outlined in red, and the verdict) is saved to ``--figure``.

``--validate`` instead runs the measure on cases whose answer is known (phantom pairs rendered in memory): the
content itself, blurred, JPEG-compressed and colour-jittered (nothing copied), the style's artifact pixels pasted
onto the content at the same and at a shifted place, and the style image itself (copied), and a content that shows
the same artifact (not judged); it prints the false-positive and false-negative rates per case and kind.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import binary_dilation

from stda_hf.core.errors import StdaError
from stda_hf.core.utils import progress
from stda_hf.data.phantoms import PhantomConfig, plan_images, render_plan
from stda_hf.data.real import ARTIFACTS, read_real_folder
from stda_hf.metrics.artifact_copy import (
    CopyThresholds,
    KindVerdict,
    copy_evidence,
    read_labels,
    wilson_interval,
)

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("artifacts", "placebo")


def stda_command() -> list[str]:
    """The ``stda`` command of this interpreter's environment."""
    return [sys.executable, "-m", "stda_hf"]


def run_stda(args: list[str]) -> None:
    """Run ``stda ARGS``; a failure stops the benchmark with the command's own last lines."""
    done = subprocess.run([*stda_command(), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise SystemExit(f"stda {' '.join(args)} failed (exit {done.returncode}):\n{tail}")


def generate_has_regions() -> bool:
    """Whether this checkout's ``stda generate`` takes ``--regions``."""
    done = subprocess.run(
        [*stda_command(), "generate", "--help"], capture_output=True, text=True, check=False
    )
    return "--regions" in done.stdout


# ----------------------------------------------------------------------------------------------------------------
# The run: phantoms, split, generate, judge.


def artifact_flags(content_rate: float, style_rate: float) -> list[str]:
    """``stda phantoms --artifact`` flags: each kind at ``content_rate`` on benign, ``style_rate`` on malignant."""
    return [f for a in ARTIFACTS for f in ("--artifact", f"{a}={content_rate},{style_rate}")]


def make_folders(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The phantom folder with artifacts and its placebo twin (styles without artifacts, same splits)."""
    common = ["--n", str(args.n), "--size", str(args.size), "--seed", str(args.seed), "--overwrite"]
    common += ["--max-lesions-per-patient", "1", "--max-images-per-lesion", "1"]  # every pair: two lesions
    folders = {"artifacts": work / "real", "placebo": work / "real_placebo"}
    run_stda(
        [
            "phantoms",
            "--out",
            str(folders["artifacts"]),
            *common,
            *artifact_flags(args.content_rate, args.style_rate),
        ]
    )
    split = [
        "--min-per-class",
        "0",
        "--floor-per-class",
        "0",
        "--phash-distance",
        "-1",
        "--seed",
        str(args.seed),
    ]
    run_stda(["split", str(folders["artifacts"]), *split])
    if args.placebo:
        run_stda(
            ["phantoms", "--out", str(folders["placebo"]), *common, *artifact_flags(args.content_rate, 0.0)]
        )
        shutil.copyfile(folders["artifacts"] / "splits.csv", folders["placebo"] / "splits.csv")
    else:
        del folders["placebo"]
    return folders


def generate(
    real: Path, out: Path, engine: str, regions: str, args: argparse.Namespace, regions_flag: bool
) -> Path:
    """``stda generate`` of ``real`` into ``out`` with ``engine`` and ``regions``."""
    cmd = ["generate", str(real), "--out", str(out), "--engine", engine, "--size", str(args.size)]
    cmd += ["--per-content", str(args.per_content), "--seed", str(args.seed), "--max-failed-share", "1"]
    cmd += ["--device", "cpu"]
    if engine == "gatys":
        cmd += ["--weights", args.weights, "--iterations", str(args.gatys_iterations)]
    if regions_flag:
        cmd += ["--regions", regions]
    elif regions != "none":
        raise SystemExit(
            f"--regions {regions}: this checkout's stda generate has no --regions flag yet; use none"
        )
    run_stda(cmd)
    return out


@dataclass
class Judged:
    """One synthetic image and its verdicts."""

    pair: tuple[str, str]  # content id, style id: the same pair in both arms
    content: Path
    style: Path
    synthetic: Path
    gate: str
    verdicts: dict[str, KindVerdict]
    evidence: dict[str, np.ndarray]


def load_rgb(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        return np.asarray(img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC))


def judge_folder(
    real: Path, reference: Path, synthetic: Path, size: int, thresholds: CopyThresholds
) -> list[Judged]:
    """Judge every synthetic image of ``synthetic`` (made from ``real``) against the styles of ``reference``.

    ``reference`` is the folder whose style images carry the artifacts (the same folder, or the artifact twin of a
    placebo folder): the signature comes from its style image and label map.
    """
    made = {im.isic_id: im for im in read_real_folder(real).images}
    ref = {im.isic_id: im for im in read_real_folder(reference).images}
    lines = [json.loads(x) for x in (synthetic / "manifest.jsonl").read_text().splitlines() if x.strip()]
    judged = []
    for row in progress(lines, desc=f"judge {synthetic.name}", unit="img"):
        file = synthetic / row["file"]
        if not file.is_file():
            continue
        content, style = made[row["content_id"]], ref[row["style_id"]]
        syn = load_rgb(file, size)
        shape = syn.shape[:2]
        verdicts, evidence = copy_evidence(
            load_rgb(content.path, size),
            load_rgb(style.path, size),
            syn,
            read_labels(style.artifact_path, shape),
            read_labels(content.artifact_path, shape),
            thresholds,
        )
        gate = (row.get("quality") or {}).get("verdict", "")
        shown = made[
            row["style_id"]
        ].path  # the style image the engine was given (placebo: without artifacts)
        pair = (row["content_id"], row["style_id"])
        judged.append(Judged(pair, content.path, shown, file, gate, verdicts, evidence))
    return judged


def summary_row(engine: str, regions: str, arm: str, judged: list[Judged]) -> dict[str, str]:
    """One table row: the synthetic images, those the gate passed, the any-copied share over those with a
    measurable style artifact (n) with its 95 % Wilson interval, and per kind ``copied/measurable[lo,hi]``."""
    with_kind = [j for j in judged if any(v.measurable for v in j.verdicts.values())]
    k = sum(any(v.copied for v in j.verdicts.values()) for j in with_kind)
    lo, hi = wilson_interval(k, len(with_kind))
    row = {"engine": engine, "regions": regions, "arm": arm, "images": str(len(judged))}
    row["gate_ok"] = str(sum(j.gate == "ok" for j in judged))
    row["n"] = str(len(with_kind))
    row["any_copied"] = f"{k / max(len(with_kind), 1):.2f}[{lo:.2f},{hi:.2f}]"
    for kind in ARTIFACTS:
        judged_kind = [j.verdicts[kind] for j in judged if kind in j.verdicts and j.verdicts[kind].measurable]
        copied = sum(v.copied for v in judged_kind)
        lo, hi = wilson_interval(copied, len(judged_kind))
        row[kind] = f"{copied}/{len(judged_kind)}[{lo:.2f},{hi:.2f}]"
    return row


def caused(with_artifacts: list[Judged], placebo: list[Judged] | None) -> str:
    """The share of pairs copied with the style's artifacts and not without them (the placebo twin), with its
    Wilson interval, over the pairs with a measurable style artifact present in both arms; "-" without placebo."""
    if placebo is None:
        return "-"
    twin = {j.pair: j for j in placebo}
    pairs = [
        (j, twin[j.pair])
        for j in with_artifacts
        if j.pair in twin and any(v.measurable for v in j.verdicts.values())
    ]
    k = sum(
        any(v.copied for v in a.verdicts.values()) and not any(v.copied for v in b.verdicts.values())
        for a, b in pairs
    )
    lo, hi = wilson_interval(k, len(pairs))
    return f"{k}/{len(pairs)}[{lo:.2f},{hi:.2f}]"


def print_table(rows: list[dict[str, str]]) -> None:
    """The rows as whitespace-separated columns under a header line (one token per cell)."""
    header = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(r[h].ljust(w) for h, w in zip(header, widths, strict=True)))


# ----------------------------------------------------------------------------------------------------------------
# The picture grid.


def outlined(synthetic: np.ndarray, evidence: dict[str, np.ndarray], scale: int) -> Image.Image:
    """The synthetic image enlarged ``scale`` times with the outline of its evidence pixels in red."""
    img = Image.fromarray(synthetic).resize(
        (synthetic.shape[1] * scale, synthetic.shape[0] * scale), Image.NEAREST
    )
    hit = np.zeros(synthetic.shape[:2], bool)
    for m in evidence.values():
        hit |= m
    if hit.any():
        big = np.kron(hit, np.ones((scale, scale), bool))
        edge = binary_dilation(big, iterations=1) & ~big
        arr = np.asarray(img).copy()
        arr[edge] = (255, 0, 0)
        img = Image.fromarray(arr)
    return img


def verdict_text(j: Judged) -> str:
    copied = [k for k, v in j.verdicts.items() if v.copied]
    missed = [k for k, v in j.verdicts.items() if v.measurable and not v.copied]
    if copied:
        return "COPIED " + ",".join(copied)
    return ("clean: " + ",".join(missed)) if missed else "no style artifact"


def draw_grid(panels: list[tuple[str, list[Judged]]], size: int, path: Path, per_panel: int = 6) -> Path:
    """One column per panel: rows of content | style | synthetic (evidence outlined) with the verdict below."""
    scale, label_h, gap = max(1, 128 // size), 14, 16
    side = size * scale
    col_w = 3 * side + 2 * 4
    grid = Image.new(
        "RGB", (len(panels) * (col_w + gap) + 8, label_h + per_panel * (side + label_h) + 8), "white"
    )
    draw = ImageDraw.Draw(grid)
    for p, (title, judged) in enumerate(panels):
        x, y = 4 + p * (col_w + gap), 4
        draw.text((x, y), title, fill=(0, 0, 0))
        y += label_h
        for j in _showcase(judged, per_panel):
            images = [load_rgb(j.content, size), load_rgb(j.style, size)]
            for i, a in enumerate(images):
                grid.paste(Image.fromarray(a).resize((side, side), Image.NEAREST), (x + i * (side + 4), y))
            grid.paste(outlined(load_rgb(j.synthetic, size), j.evidence, scale), (x + 2 * (side + 4), y))
            text = verdict_text(j)
            colour = (160, 0, 0) if text.startswith("COPIED") else (0, 90, 0)
            draw.text((x, y + side + 1), f"{text}  (gate {j.gate})", fill=colour)
            y += side + label_h
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _showcase(judged: list[Judged], n: int) -> list[Judged]:
    """Up to ``n`` images: copied ones and clean ones with a measurable style artifact, alternating."""
    copied = [j for j in judged if any(v.copied for v in j.verdicts.values())]
    clean = [j for j in judged if j not in copied and any(v.measurable for v in j.verdicts.values())]
    out = []
    for a, b in zip(copied + [None] * n, clean + [None] * n, strict=False):
        out += [x for x in (a, b) if x is not None]
        if len(out) >= n or (a is None and b is None):
            break
    return out[:n]


# ----------------------------------------------------------------------------------------------------------------
# --validate: cases whose answer is known.


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _paste(content: np.ndarray, style: np.ndarray, where: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    out = content.copy()
    moved = np.roll(where, shift, (0, 1))
    out[moved] = np.roll(style, shift, (0, 1))[moved]
    return out


def validation_cases(pairs: int, size: int, seed: int):
    """Yield ``(case, kind, expected copied, content, style, synthetic, style labels, content labels)``.

    Pair ``i`` takes a benign-or-malignant phantom as the content (no artifact) and another as the style, rendered
    with one artifact kind (cycling through the kinds) or, every fifth pair, with all of them. Images pass through
    JPEG quality 95 as ``stda generate`` saves them.
    """
    cfg = PhantomConfig(n=2 * pairs, size=size, seed=seed)
    plans = plan_images(cfg)
    rng = np.random.default_rng(seed)
    for i in range(pairs):
        kinds = ARTIFACTS if i % 5 == 4 else (ARTIFACTS[i % len(ARTIFACTS)],)
        c_view = render_plan(cfg, plans[2 * i], ())
        s_view = render_plan(cfg, plans[2 * i + 1], kinds)
        content, style = _jpeg(np.asarray(c_view.image), 95), _jpeg(np.asarray(s_view.image), 95)
        labels, none = s_view.labels, np.zeros_like(s_view.labels)
        gain = rng.uniform(0.94, 1.06, 3)
        negatives = {
            "identity": content,
            "blur 1px": np.asarray(Image.fromarray(content).filter(ImageFilter.GaussianBlur(1.0))),
            "jpeg q30": _jpeg(content, 30),
            "jitter 6%": np.clip(content * gain + rng.uniform(-8, 8), 0, 255).astype(np.uint8),
        }
        for case, syn in negatives.items():
            for kind in kinds:
                yield case, kind, False, content, style, syn, labels, none
        shift = (size // 4 + 1, size // 3 + 1)
        for kind in kinds:
            where = labels == ARTIFACTS.index(kind) + 1
            for case, s in (("paste same place", (0, 0)), ("paste shifted", shift)):
                yield (
                    case,
                    kind,
                    True,
                    content,
                    style,
                    _jpeg(_paste(content, style, where, s), 95),
                    labels,
                    none,
                )
            yield "synthetic = style", kind, True, content, style, style, labels, none
        same = render_plan(cfg, plans[2 * i], kinds)
        same_img = _jpeg(np.asarray(same.image), 95)
        for kind in kinds:
            yield "content has it", kind, None, same_img, style, style, labels, same.labels


def validate(
    pairs: int, size: int, seed: int, thresholds: CopyThresholds
) -> dict[tuple[str, str], list[int]]:
    """Run the measure on :func:`validation_cases`; print and return ``{(case, kind): [n, wrong, unmeasurable,
    most evidence pixels]}``."""
    tally: dict[tuple[str, str], list[int]] = {}
    for case, kind, expected, content, style, syn, labels, c_labels in progress(
        validation_cases(pairs, size, seed), desc="validate", unit="case"
    ):
        verdicts, _ = copy_evidence(content, style, syn, labels, c_labels, thresholds)
        t = tally.setdefault((case, kind), [0, 0, 0, 0])
        if expected is None:  # the content shows the kind: it must not be judged at all
            t[0] += 1
            t[1] += kind in verdicts
            continue
        v = verdicts[kind]
        t[3] = max(t[3], v.pixels)
        if not v.measurable:
            t[2] += 1
            continue
        t[0] += 1
        t[1] += v.copied != expected
    print(f"validation: {pairs} phantom pairs at {size} px, seed {seed}; thresholds {thresholds}")
    need = max(thresholds.min_pixels, int(np.ceil(thresholds.min_fraction * size * size)))
    print(f"a kind counts as copied at {need} or more evidence pixels (of {size * size})")
    print(
        "case               expect  kind          n    wrong  rate  [95% CI]      not_measurable  most_evidence_px"
    )
    totals = {"FP": [0, 0], "FN": [0, 0]}
    for (case, kind), (n, wrong, unmeasurable, most) in tally.items():
        expect = (
            "judged"
            if case == "content has it"
            else ("copied" if case.startswith(("paste", "synthetic")) else "clean")
        )
        lo, hi = wilson_interval(wrong, n)
        print(
            f"{case:18s} {expect:7s} {kind:12s} {n:4d} {wrong:6d}  {wrong / max(n, 1):.2f}  [{lo:.2f}, {hi:.2f}]  {unmeasurable:14d}  {most}"
        )
        key = "FN" if expect == "copied" else "FP"
        totals[key][0] += n
        totals[key][1] += wrong
    for key, (n, wrong) in totals.items():
        lo, hi = wilson_interval(wrong, n)
        what = (
            "false-positive rate (clean or content's own kind judged copied)"
            if key == "FP"
            else "false-negative rate (a copy missed)"
        )
        print(f"{what}: {wrong}/{n} = {wrong / max(n, 1):.3f} [{lo:.3f}, {hi:.3f}]")
    return tally


# ----------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--engines",
        nargs="+",
        default=["arbitrary", "gatys"],
        choices=["arbitrary", "gatys"],
        help="engines to run",
    )
    p.add_argument(
        "--regions",
        nargs="+",
        default=["none", "lesion-skin", "lesion"],
        help="stda generate --regions settings to compare",
    )
    p.add_argument("--n", type=int, default=96, help="phantom images (benign contents and malignant styles)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="phantoms, split and pairing seed")
    p.add_argument(
        "--style-rate", type=float, default=0.5, help="rate of each artifact kind on malignant (style) images"
    )
    p.add_argument(
        "--content-rate",
        type=float,
        default=0.05,
        help="rate of each artifact kind on benign (content) images",
    )
    p.add_argument("--per-content", type=int, default=1, help="styles per content image")
    p.add_argument("--weights", default="vgg19-imagenet", help="gatys VGG weights")
    p.add_argument("--gatys-iterations", type=int, default=30, help="gatys optimiser evaluations per image")
    p.add_argument(
        "--placebo", action=argparse.BooleanOptionalAction, default=True, help="also run the placebo arm"
    )
    p.add_argument(
        "--work", type=Path, default=None, help="working folder (default: a temporary one, removed)"
    )
    p.add_argument(
        "--figure",
        type=Path,
        default=ROOT / "reports" / "tmp" / "artifact_copy.jpg",
        help="picture grid to write",
    )
    p.add_argument("--validate", action="store_true", help="run the measure's known-answer cases instead")
    p.add_argument("--pairs", type=int, default=100, help="--validate: phantom pairs")
    p.add_argument(
        "--distinct", type=float, default=CopyThresholds.distinct, help="measure: feature distance (Delta E)"
    )
    p.add_argument(
        "--min-fraction", type=float, default=CopyThresholds.min_fraction, help="measure: evidence share"
    )
    return p


def run(args: argparse.Namespace) -> None:
    thresholds = CopyThresholds(distinct=args.distinct, min_fraction=args.min_fraction)
    if args.validate:
        validate(args.pairs, args.size, args.seed, thresholds)
        return
    regions_flag = generate_has_regions()
    with tempfile.TemporaryDirectory(prefix="artifact_copy_") as tmp:
        work = args.work or Path(tmp)
        folders = make_folders(work, args)
        rows, panels = [], []
        for engine in args.engines:
            for regions in args.regions:
                arms = {}
                for arm, real in folders.items():
                    out = generate(
                        real, work / f"syn_{engine}_{regions}_{arm}", engine, regions, args, regions_flag
                    )
                    arms[arm] = judge_folder(real, folders["artifacts"], out, args.size, thresholds)
                    panels.append((f"{engine}, regions {regions}, {arm} arm", arms[arm]))
                for arm, judged in arms.items():
                    rows.append(summary_row(engine, regions, arm, judged))
                    rows[-1]["caused"] = caused(judged, arms.get("placebo")) if arm == "artifacts" else "-"
        weights = (
            f"gatys weights {args.weights}, {args.gatys_iterations} iterations; "
            if "gatys" in args.engines
            else ""
        )
        print(
            f"figure: {args.n} phantoms at {args.size} px (seed {args.seed}), each artifact kind on "
            f"{args.style_rate:.0%} of styles and {args.content_rate:.0%} of contents, {args.per_content} style(s) "
            f"per content; {weights}measure {thresholds}"
        )
        print_table(rows)
        print(f"picture grid: {draw_grid(panels, args.size, args.figure)}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = get_args_parser().parse_args(argv)
    if args.validate and args.pairs < 1:
        raise SystemExit(f"--pairs {args.pairs}: need at least one phantom pair")
    try:
        run(args)
    except StdaError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
