"""The ``stda`` command line: parse arguments, build a stage's config, call the stage, print the outcome.

Each subcommand is one ``_add_<name>`` function that declares its arguments and sets ``func`` to a small
runner. Settings of a stage's ``@dataclass`` config become flags automatically (:func:`add_config_flags`), with
the field's comment as help, and every command takes ``--config FILE.yaml`` for the same settings.
Errors on user input (:class:`~stda_hf.core.errors.StdaError`) print one line and exit with status 2; ``--debug``
shows the traceback instead. Usage errors (a bad flag or value) are one line with status 2 as well, and no
output folder may be, or lie inside, a folder the command reads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stda_hf import __version__
from stda_hf.core.config import OneLineParser, add_config_flags, config_from_args, field_comments
from stda_hf.core.errors import StdaError, run_reporting_errors

__all__ = ["add_config_flags", "build_parser", "config_from_args", "field_comments", "main"]

logger = logging.getLogger("stda_hf")


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _path(text: str) -> Path:
    """A path argument; an empty one is refused (``Path("")`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder name (use . for the current folder)")
    return Path(text)


# ----------------------------------------------------------------------------------------------------------------
# Commands

SUMMARIES = {
    "fetch": "download benign and malignant images from the ISIC Archive (resumable, licence-aware)",
    "phantoms": "write procedural phantom lesions in the real-image layout (offline data)",
    "import": "bring in an ISIC challenge folder (2016-2020), an isic-cli export or HAM10000 as downloaded",
    "split": "assign real images to train/validation/test without leakage",
    "inspect": "summarise a real-image folder: classes, licences, splits, sizes, bad files",
    "generate": "restyle benign train images with malignant train styles (neural style transfer)",
    "label": "pseudo-label synthetic images with a teacher trained on real images",
    "package": "write the Hub dataset repo on disk: Parquet shards, card, attribution",
    "push": "upload a packaged dataset to the Hugging Face Hub",
    "train": "train a benign/malignant classifier on a Hub dataset (train.py; accelerate launch works too)",
    "explain": "explain a trained model: DTD heatmaps and how much relevance lies in the lesion / on artifacts",
    "benchmark": "baseline vs ST-DA over grouped folds x seeds: runs, statistics and a Markdown report",
    "demo": "run the whole flow on phantoms, offline, with small sizes",
}
"""One line per subcommand: ``stda --help`` lists these without importing the stages."""


def _add_fetch(sub) -> None:
    from stda_hf.fetch import FetchConfig

    p = sub.add_parser(
        "fetch",
        help=SUMMARIES["fetch"],
        description="Download images and metadata from the ISIC Archive API v2 into the real-image layout. "
        "Re-running the same command resumes; --dry-run only counts. See docs/fetch.md.",
        epilog=FETCH_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=_path, default=None, help="output folder (the real-image layout)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print how many images match per class and licence; download nothing",
    )
    add_config_flags(p, FetchConfig)
    p.set_defaults(func=_run_fetch)


FETCH_EXIT_CODES = """exit status:
  0    every selected image is on disk (or --dry-run counted)
  2    bad input, or the archive refused the selection or stayed unreachable (one line on stderr)
  3    incomplete: some selected images are not on disk (skipped, or the search listed fewer than it
       counted); the summary gives the count and the reasons by kind, fetch_skipped.json each reason;
       re-running the same command retries them
  130  interrupted (Ctrl-C); re-running the same command resumes"""


def _run_fetch(args) -> None:
    from stda_hf.core.errors import IncompleteError
    from stda_hf.fetch import FetchConfig, dry_run, fetch

    cfg = config_from_args(FetchConfig, args)
    if args.dry_run:
        print(dry_run(cfg, out=args.out).format())
    elif args.out is None:
        raise StdaError("--out is required to fetch (only --dry-run works without it)")
    else:
        result = fetch(args.out, cfg)
        print(result.format())
        if not result.complete:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(result.kinds.items())) or "none skipped"
            raise IncompleteError(
                f"{args.out}: {result.missing} selected image(s) are not on disk (skipped this run: {kinds}; "
                f"each reason in {args.out / 'fetch_skipped.json'}); re-run the same command to retry them"
            )


def _add_phantoms(sub) -> None:
    from stda_hf.data.phantoms import PhantomConfig

    p = sub.add_parser(
        "phantoms",
        help=SUMMARIES["phantoms"],
        description="Write procedural, dermoscopy-like phantom lesions with masks and metadata.",
    )
    p.add_argument("--out", type=_path, required=True, help="output folder (the real-image layout)")
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="NAME=B[,M]",
        help="artifact rate for benign[,malignant] images, e.g. patch=0.5,0 plants a shortcut; "
        "names: ruler, patch, ink, dark_corners (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a folder made with other settings")
    add_config_flags(p, PhantomConfig)
    p.set_defaults(func=_run_phantoms)


def _run_phantoms(args) -> None:
    from stda_hf.data.phantoms import (
        DEFAULT_ARTIFACT_RATES,
        PhantomConfig,
        make_phantoms,
        parse_artifact_rates,
    )

    artifacts = {**DEFAULT_ARTIFACT_RATES, **parse_artifact_rates(args.artifact)} if args.artifact else None
    cfg = config_from_args(PhantomConfig, args, artifacts=artifacts)
    meta = make_phantoms(args.out, cfg, overwrite=args.overwrite)
    shape = (
        f"{cfg.size}px"
        if cfg.aspect == ("1:1",)
        else f"{cfg.size}px longer side, aspect {' '.join(cfg.aspect)}"
    )
    print(f"wrote {cfg.n} phantom images ({shape}) to {args.out}; metadata in {meta}")


def _add_import(sub) -> None:
    from stda_hf.data.importers import ImportConfig

    p = sub.add_parser(
        "import",
        help=SUMMARIES["import"],
        description="Read a downloaded ISIC challenge folder (images, ground-truth CSV, optional "
        "<id>_segmentation.png masks), an ISIC Archive export (isic-cli's metadata.csv) or HAM10000 "
        "(HAM10000_metadata with lesion_id) into the real-image layout. Prints the diagnosis map "
        "(override codes with --dx-map) and lists every source file it did not use; see docs/data.md.",
    )
    p.add_argument("source", type=_path, help="the downloaded folder (zips unpacked)")
    p.add_argument("--out", type=_path, required=True, help="output folder (the real-image layout)")
    add_config_flags(p, ImportConfig)
    p.set_defaults(func=_run_import)


def _run_import(args) -> None:
    from stda_hf.data.importers import ImportConfig, import_folder

    print(import_folder(args.source, args.out, config_from_args(ImportConfig, args)).format())


def _add_split(sub) -> None:
    from stda_hf.data.split import SplitConfig

    p = sub.add_parser(
        "split",
        help=SUMMARIES["split"],
        description="Group images by lesion, patient and near-duplicate hash; split groups "
        "stratified by class; write splits.csv into the folder.",
    )
    p.add_argument("real", type=_path, help="real-image folder")
    add_config_flags(p, SplitConfig)
    p.set_defaults(func=_run_split)


def _run_split(args) -> None:
    from stda_hf.data.real import small_classes
    from stda_hf.data.split import SplitConfig, make_splits

    cfg = config_from_args(SplitConfig, args)
    summary = make_splits(args.real, cfg)
    for split, counts in summary.items():
        print(
            f"{split:<11} benign {counts['benign']:>6}  malignant {counts['malignant']:>6}  groups {counts['groups']:>6}"
        )
    for line in small_classes(summary, cfg.min_per_class):
        print(f"too few: {line} (--min-per-class); metrics of that class on it are coarse")
    print(f"wrote {args.real / 'splits.csv'}")


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help=SUMMARIES["inspect"],
        description="Count images per class, licence and split; report sizes and unreadable files.",
    )
    p.add_argument("real", type=_path, help="real-image folder")
    p.add_argument(
        "--no-decode", action="store_true", help="read image headers only (fast; misses truncated files)"
    )
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> None:
    from stda_hf.data.inspect import inspect_folder

    print(inspect_folder(args.real, decode=not args.no_decode).format())


def _add_generate(sub) -> None:
    from stda_hf.generate import GenerateConfig

    p = sub.add_parser(
        "generate",
        help=SUMMARIES["generate"],
        description="Batched, resumable style transfer (Gatys, or the pretrained arbitrary network): benign train "
        "images (content) x malignant train images (style) -> images/ + manifest.jsonl, each judged by the quality "
        "gate (docs/gate.md). Re-run the same command to resume; run it under torchrun "
        "or accelerate launch to split the work between processes.",
    )
    p.add_argument("real", type=_path, help="real-image folder with splits.csv")
    p.add_argument("--out", type=_path, required=True, help="synthetic folder to write (or resume)")
    add_config_flags(p, GenerateConfig)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> None:
    from stda_hf.generate import GenerateConfig, generate

    summary = generate(args.real, args.out, config_from_args(GenerateConfig, args))
    print(summary.format())
    print(f"wrote {args.out / 'manifest.jsonl'}")


def _add_label(sub) -> None:
    from stda_hf.label import LabelConfig

    p = sub.add_parser(
        "label",
        help=SUMMARIES["label"],
        description="Label every synthetic image with a teacher's class probabilities, confidence "
        "and entropy; optionally calibrate it (Platt scale and bias) on the real validation split "
        "first. Resumable: re-running skips labelled images.",
    )
    p.add_argument("synthetic", type=_path, help="synthetic folder written by `stda generate`")
    add_config_flags(p, LabelConfig)
    p.set_defaults(func=_run_label)


def _run_label(args) -> None:
    from stda_hf.label import LabelConfig, label_synthetic

    s = label_synthetic(args.synthetic, config_from_args(LabelConfig, args))
    labels = ", ".join(f"{k} {v}" for k, v in s.labels.items())
    print(f"labelled {s.images} images with {s.teacher}: {labels}")
    c = s.calibration
    if c and c.get("method") == "platt":
        print(
            f"Platt scale {c['scale']:.3f}, bias {c['bias']:+.3f}: ECE on real validation {c['ece_before']:.4f} "
            f"{_interval(c.get('ece_before_ci'))}-> {c['ece_after']:.4f} {_interval(c.get('ece_after_ci'))}"
            f"(after: on {c['ece_after_on']}); a perfectly calibrated teacher would read about "
            f"{c.get('ece_after_if_calibrated', float('nan')):.4f} at this size"
        )
    elif c:
        print(f"not calibrated: {c.get('reason', 'fallback')}; labelled with the teacher's own probabilities")
    if s.flipped_by_calibration:
        flips = ", ".join(f"{k} {v}" for k, v in s.flipped_by_calibration.items())
        print(f"calibration turned {sum(s.flipped_by_calibration.values())} pseudo-label(s) round ({flips})")
    print(f"kept at confidence >= {s.min_confidence:g}: {s.kept} ({s.kept_labels})")
    if s.skipped:
        print(f"skipped {len(s.skipped)} unreadable image(s); see {args.synthetic / 'labels_summary.json'}")
    _print_left_out(s.left_out_failed, "labelled")


def _interval(ci: list[float] | None) -> str:
    """``"(95 % CI 0.012-0.087) "`` for a bootstrap interval, or nothing when there is none."""
    return f"(95 % CI {ci[0]:.4f}-{ci[1]:.4f}) " if ci else ""


def _add_package(sub) -> None:
    from stda_hf.dataset import PackageConfig

    p = sub.add_parser(
        "package",
        help=SUMMARIES["package"],
        description="Stream real (and pseudo-labelled synthetic) images into data/<split>-NNNNN-of-NNNNN.parquet "
        "with a dataset card; refuses leakage; resumable and byte-identical on re-runs.",
    )
    p.add_argument("real", type=_path, help="real-image folder with splits.csv")
    p.add_argument(
        "--synthetic", type=_path, default=None, help="synthetic folder with labels.jsonl (optional)"
    )
    p.add_argument(
        "--out", type=_path, required=True, help="repository folder to write, e.g. hub/skin-lesions"
    )
    add_config_flags(p, PackageConfig)
    p.set_defaults(func=_run_package)


def _run_package(args) -> None:
    from stda_hf.dataset import PackageConfig, package

    result = package(args.real, args.out, synthetic=args.synthetic, cfg=config_from_args(PackageConfig, args))
    for split, counts in result.counts.items():
        print(f"{split:<11} benign {counts['benign']:>6}  malignant {counts['malignant']:>6}")
    print(f"licence {result.license}; wrote {len(result.files)} files to {args.out}")
    for path, reason in sorted(result.skipped.items()):
        print(f"skipped {path}: {reason}")
    _print_left_out(result.left_out_failed, "packaged")


def _print_left_out(left_out: dict[str, int], what: str) -> None:
    """One line for the synthetic images that failed generate's quality gate and were left out."""
    if left_out:
        counts = ", ".join(f"{n} {verdict}" for verdict, n in left_out.items())
        print(f"not {what}: {sum(left_out.values())} synthetic image(s) that failed the quality gate ({counts}); "
              "--keep-failed keeps them")  # fmt: skip


def _add_push(sub) -> None:
    from stda_hf.dataset import PushConfig

    p = sub.add_parser(
        "push",
        help=SUMMARIES["push"],
        description="Create the dataset repo if needed and upload the folder (token from HF_TOKEN or "
        "`hf auth login`; never printed). --dry-run lists what would be uploaded.",
    )
    p.add_argument("folder", type=_path, help="packaged dataset folder (stda package --out)")
    add_config_flags(p, PushConfig)
    p.set_defaults(func=_run_push)


def _run_push(args) -> None:
    from stda_hf.dataset import PushConfig, push

    result = push(args.folder, config_from_args(PushConfig, args))
    for path, size in result.files:
        print(f"{size:>14,d}  {path}")
    total = f"{len(result.files)} files, {result.total_bytes:,d} bytes"
    if result.dry_run:
        print(f"dry run: would upload {total} to datasets/{result.repo_id} ({result.revision})")
    else:
        print(f"uploaded {total} to datasets/{result.repo_id} ({result.revision}): {result.commit_url}")


def _add_train(sub) -> None:
    from stda_hf.training import TrainConfig

    p = sub.add_parser(
        "train",
        help=SUMMARIES["train"],
        description="Train VGG8 (or a torchvision VGG, or a transformers model) on real and synthetic "
        "skin-lesion images, as the repository's train.py does; several processes: "
        "`accelerate launch -m stda_hf.training ...`.",
    )
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=_run_train)


def _run_train(args) -> None:
    from stda_hf.training import quiet_loggers, train_from_args

    quiet_loggers(args.verbose)
    train_from_args(args)


def _add_explain(sub) -> None:
    from stda_hf.explain import COMPOSITE_NAMES, ExplainConfig

    p = sub.add_parser(
        "explain",
        help=SUMMARIES["explain"],
        description="Deep Taylor Decomposition (or a baseline: "
        + ", ".join(COMPOSITE_NAMES[1:])
        + ") for the "
        "images of a folder or a dataset split: heatmap and overlay PNGs, grid.png, relevance.csv/.jsonl and "
        "summary.json. Resumable: re-running skips images already explained.",
    )
    p.add_argument(
        "--model", type=_path, required=True, help="train.py run folder (runs/<run>) or its model/"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", type=_path, help="real-image folder (masks/, splits.csv used) or plain images"
    )
    source.add_argument("--dataset", help="Hub dataset id or a folder written by `stda package`")
    p.add_argument("--out", type=_path, required=True, help="output folder, e.g. heatmaps/")
    p.add_argument("--overwrite", action="store_true", help="replace results of other settings in --out")
    add_config_flags(p, ExplainConfig)
    p.set_defaults(func=_run_explain)


def _run_explain(args) -> None:
    from stda_hf.explain import ExplainConfig, run_explain

    cfg = config_from_args(ExplainConfig, args)
    s = run_explain(
        args.model, args.out, cfg, images=args.images, dataset=args.dataset, overwrite=args.overwrite
    )
    print(s.format())


def _add_benchmark(sub) -> None:
    from stda_hf.benchmark import BenchmarkConfig

    p = sub.add_parser(
        "benchmark",
        help=SUMMARIES["benchmark"],
        description="Every arm (baseline, ST-DA mix, ST-DA pretrain, ...) trained on the same grouped folds and "
        "seeds; statistics and a Markdown report with plots. Re-running resumes; adding seeds or arms to the "
        "config adds runs. Give the benchmark YAML with --config (benchmarks/configs/*.yaml).",
    )
    p.add_argument("--report-only", action="store_true", help="only re-render the report from recorded runs")
    add_config_flags(p, BenchmarkConfig)
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args) -> None:
    from stda_hf.benchmark import BenchmarkConfig, run_benchmark

    cfg = config_from_args(BenchmarkConfig, args)
    print(f"report: {run_benchmark(cfg, str(args.config or ''), report_only=args.report_only)}")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help=SUMMARIES["demo"],
        description="Phantoms -> split -> inspect -> ... in a few minutes on two CPU cores.",
    )
    p.add_argument("--out", type=_path, default=Path("demo"), help="output folder (default: demo)")
    p.add_argument("--n", type=int, default=400, help="number of phantom images (default: 400)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    p.add_argument(
        "--engine",
        choices=("arbitrary", "gatys"),
        default="arbitrary",
        help="style transfer: arbitrary (pretrained network, seconds) or gatys (the paper's optimisation on the "
        "imagenet extra's VGG19, minutes) (default: arbitrary)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from stda_hf.demo import run_demo

    run_demo(args.out, n=args.n, size=args.size, seed=args.seed, engine=args.engine)


COMMANDS: list[Callable] = [
    _add_fetch, _add_phantoms, _add_import, _add_split, _add_inspect, _add_generate, _add_label, _add_package,
    _add_push, _add_train, _add_explain, _add_benchmark, _add_demo,
]  # fmt: skip
"""Subcommands in the order ``stda --help`` lists them (the order of the flow)."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``stda`` argument parser.

    With ``only``, that subcommand gets its full arguments and the others a one-line stub, so running one
    stage imports only that stage (``stda phantoms`` never loads torch). Without it, every subcommand is built.
    """
    parser = OneLineParser(
        prog="stda",
        description="Style-transfer data augmentation for skin-lesion images: "
        "fetch/phantoms -> split -> generate -> label -> package -> push; then train.py.",
    )
    parser.add_argument("--version", action="version", version=f"stda-hf {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=_path, default=None, help="YAML file with settings (flags override it)"
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        parser_class=lambda **kw: OneLineParser(parents=[common], **kw),
    )
    for add in COMMANDS:
        name = add.__name__.removeprefix("_add_")
        if only is None or only == name:
            add(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name])
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stda``; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    from stda_hf.core.utils import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser(only=command if command in SUMMARIES else "")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_reporting_errors(f"stda {args.command}", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
