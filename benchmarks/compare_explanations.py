"""Baseline vs ST-DA explanations: the same images, side-by-side heatmaps, and the relevance numbers.

    python benchmarks/compare_explanations.py --baseline runs/baseline --stda runs/stda \\
        --dataset hub/skin-lesions --split test --out reports/explanations
    python benchmarks/compare_explanations.py --baseline runs/a --stda runs/b --images real/ --timing

Both models explain every image of the split (``--limit`` caps it) with the same method (DTD by default), and
so does an untrained copy of the baseline's architecture (``--no-reference`` drops it): the reference level of
every share (Adebayo et al. 2018's model-randomisation check; a model that learned nothing already puts
relevance on high-contrast regions). Prints, per model, accuracy, the share of positive relevance inside the
lesion mask and on artifacts, and DTD's conservation; then the paired difference of relevance-in-mask (ST-DA
minus baseline) over the images both explain, with a seeded bootstrap 95% interval and how often ST-DA puts
more relevance on the lesion.
``--timing`` adds seconds per image of each attribution method on the baseline model, as ratios to the plain
gradient, measured in this one run. Writes ``comparison.png`` (rows: image, baseline heatmap, ST-DA heatmap)
and ``comparison.json`` into ``--out``.

docs/explain.md's figures and table (64 px phantoms, a narrow VGG8, 12 epochs each, about 4 CPU minutes in all)::

    stda phantoms --out real --n 400 --size 64 --seed 0 && stda split real && stda package real --out hub
    stda phantoms --out real-patch --n 400 --size 64 --seed 2 --artifact patch=1,0
    stda split real-patch && stda package real-patch --out hub-patch
    T="--image-size 64 --epochs 12 --vgg8-widths 16 32 64 64 64 --vgg8-hidden 64 64 --lr 0.003"
    python train.py --dataset hub $T --output-dir runs/clean
    python train.py --dataset hub-patch $T --output-dir runs/patch
    stda explain --model runs/patch --images real-patch --split test --grid 8 --out ex   # docs/explain_grid.png
    python benchmarks/compare_explanations.py --baseline runs/clean --stda runs/patch --names clean shortcut \
        --images real-patch --split test --rows 6 --out cmp                              # the table, comparison.png
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stda_hf.attribution.engine import COMPOSITE_NAMES, untrained_copy
from stda_hf.attribution.heatmaps import Tile, prediction_tiles, render_grid, save_grid
from stda_hf.attribution.hook import Result, Sample, explain_samples
from stda_hf.attribution.relevance import summarize
from stda_hf.core.fileio import write_json
from stda_hf.data.images import SkipReport
from stda_hf.data.real import ARTIFACTS
from stda_hf.explain.stage import open_source
from stda_hf.models.vgg import eval_transform, load_model, model_folder

TIMED_METHODS = ("gradient", "dtd", "epsilon_plus_flat", "epsilon_gamma_box", "excitation_backprop")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="model folder trained on real images only")
    p.add_argument("--stda", type=Path, required=True, help="model folder trained with ST-DA")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="real-image folder (with masks/) or plain images")
    source.add_argument("--dataset", help="Hub dataset id or `stda package` folder")
    p.add_argument("--split", default="test", help="split to explain (default: test; all: every image)")
    p.add_argument("--limit", type=int, default=0, help="explain at most this many images (default: 0, all)")
    p.add_argument(
        "--method", default="dtd", choices=COMPOSITE_NAMES, help="attribution method (default: dtd)"
    )
    p.add_argument("--rows", type=int, default=8, help="images shown in comparison.png (default: 8)")
    p.add_argument("--names", nargs=2, default=("baseline", "ST-DA"), help="captions of the two models")
    p.add_argument("--out", type=Path, default=Path("reports/explanations"), help="output folder")
    p.add_argument("--timing", action="store_true", help="also time every attribution method")
    p.add_argument("--batch-size", type=int, default=16, help="images per pass (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also explain an untrained copy of the baseline's architecture: every share's reference level",
    )
    return p.parse_args(argv)


def load(folder: Path):
    model, pre = load_model(model_folder(folder))
    return model, pre, eval_transform(pre)


def explain_models(samples, models, method: str, batch_size: int, rows: int):
    """Explain every sample with every model, batch by batch; keep one record per model per image and the first
    ``rows`` results of the first two models (the compared pair)."""
    records: list[tuple[dict, ...]] = []
    shown: list[tuple[Result, Result]] = []
    it = iter(samples)
    while batch := list(itertools.islice(it, batch_size)):
        results = [explain_samples(m, batch, t, pre.mean, pre.std, method) for m, pre, t in models]
        records += [tuple(r.record() for r in per_image) for per_image in zip(*results, strict=True)]
        shown += list(zip(results[0], results[1], strict=True))[: max(0, rows - len(shown))]
    return records, shown


def model_numbers(records: list[dict]) -> dict:
    numbers = summarize(records)
    labelled = [r for r in records if r["label"] is not None]
    numbers["accuracy"] = (
        float(np.mean([r["predicted"] == r["label"] for r in labelled])) if labelled else None
    )
    numbers["conservation"] = float(np.mean([r["conservation"] for r in records]))
    return numbers


def paired_difference(pairs: list[tuple[dict, dict]], key: str, seed: int) -> dict:
    """Mean of ``b[key] - a[key]`` over images where both are defined, a bootstrap 95% interval, win rate."""
    diffs = np.array([b[key] - a[key] for a, b in pairs if a[key] is not None and b[key] is not None])
    if diffs.size == 0:
        return {"n": 0, "mean": None, "ci95": None, "b_higher": None}
    rng = np.random.default_rng(seed)
    boot = rng.choice(diffs, size=(2000, diffs.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "n": int(diffs.size),
        "mean": float(diffs.mean()),
        "ci95": [float(lo), float(hi)],
        "b_higher": float((diffs > 0).mean()),
    }


def comparison_figure(shown: list[tuple[Result, Result]], names: tuple[str, str], method: str):
    tiles: list[Tile] = []
    for a, b in shown:
        for i, (result, name) in enumerate(((a, names[0]), (b, names[1]))):
            share = result.numbers["relevance_in_mask"]
            note = f"{name}: in mask " + ("n/a" if np.isnan(share) else f"{share:.2f}")
            s = result.sample
            pair = prediction_tiles(
                result.input_image,
                result.pixels,
                result.predicted,
                float(result.probs.max()),
                s.label,
                s.origin,
                note,
            )
            tiles += pair if i == 0 else pair[1:]
    return render_grid(tiles, columns=3, title=f"{method}: image | {names[0]} | {names[1]}")


def time_methods(model, pre, transform, samples: list[Sample], repeats: int = 3) -> dict[str, float]:
    """Seconds per image of each method on the same batch (best of ``repeats``), after one warm-up pass."""
    seconds = {}
    for method in TIMED_METHODS:
        explain_samples(model, samples, transform, pre.mean, pre.std, method)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            explain_samples(model, samples, transform, pre.mean, pre.std, method)
            runs.append(time.perf_counter() - start)
        seconds[method] = min(runs) / len(samples)
    return seconds


def print_table(names, numbers, diff) -> None:
    keys = [
        "n_images",
        "accuracy",
        "relevance_in_mask",
        "mask_area",
        "relevance_on_artifact",
        "artifact_area",
    ]
    keys += [f"relevance_on_{k}" for k in ARTIFACTS if numbers[names[0]][f"n_with_{k}"]]
    print(f"{'':<26}" + "".join(f"{n:>12}" for n in names))
    for k in [*keys, "conservation"]:
        print(f"{k:<26}" + "".join(f"{_fmt(numbers[n].get(k)):>12}" for n in names))
    if diff["n"]:
        lo, hi = diff["ci95"]
        print(
            f"relevance_in_mask, {names[1]} - {names[0]}: {diff['mean']:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}) "
            f"over {diff['n']} images; {names[1]} higher on {diff['b_higher']:.0%}"
        )
    else:
        print("relevance_in_mask: unavailable (no lesion masks for these images)")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:d}" if isinstance(value, int) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    models = [load(args.baseline), load(args.stda)]
    if args.reference:
        model, pre, transform = models[0]
        models.append((untrained_copy(model), pre, transform))
    report = SkipReport()
    source, _ = open_source(args.images, args.dataset, args.split, report)
    if args.limit:
        source = itertools.islice(source, args.limit)
    start = time.perf_counter()
    records, shown = explain_models(source, models, args.method, args.batch_size, args.rows)
    elapsed = time.perf_counter() - start
    if not records:
        sys.exit("no images to explain in that split")
    names = tuple(args.names)
    columns = (*names, "untrained") if args.reference else names
    numbers = {n: model_numbers([r[i] for r in records]) for i, n in enumerate(columns)}
    diff = paired_difference([r[:2] for r in records], "relevance_in_mask", args.seed)
    print(f"{len(records)} images explained by {len(columns)} models with {args.method} in {elapsed:.1f} s")
    print_table(columns, numbers, diff)
    result = {
        "method": args.method,
        "split": args.split,
        "models": numbers,
        "relevance_in_mask_difference": diff,
    }
    if args.timing:
        model, pre, transform = models[0]
        batch = [r[0].sample for r in shown][: args.batch_size]
        seconds = time_methods(model, pre, transform, batch)
        result["seconds_per_image"] = seconds
        print(
            f"seconds per image on {names[0]} (batch of {len(batch)}, best of 3), ratio to the plain gradient:"
        )
        for method, s in seconds.items():
            print(f"  {method:<22}{s * 1000:8.2f} ms  x{s / seconds['gradient']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(comparison_figure(shown, names, args.method), args.out / "comparison.png")  # the compared pair
    write_json(args.out / "comparison.json", result)
    print(f"wrote {args.out / 'comparison.png'} and comparison.json")


if __name__ == "__main__":
    main()
