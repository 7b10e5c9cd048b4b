"""Training throughput of train.py's code path: images/s, and where the time goes (data loading vs compute).

    .venv/bin/python benchmarks/train_throughput.py                       # phantoms packaged on the fly
    .venv/bin/python benchmarks/train_throughput.py --dataset hub/skin-lesions --image-size 224 --workers 0 4

For each data-loader worker count it runs ``train_one_epoch`` (the function train.py runs, under Accelerate,
with augmentation) and reports images/s, the seconds spent waiting for batches and computing, and the share of
waiting. Two references, measured in the same run, bound the result: the loader alone (no model) and the model
alone on random tensors already in memory (no loader). Figures from one run only; compare ratios, not seconds
across machines.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from stda_hf.training import TrainConfig
from stda_hf.training.data import EpochSampler, ImageLabelSet, build_transforms, load_splits, make_loader
from stda_hf.training.step import train_one_epoch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset", default=None, help="Hub dataset folder or id (default: phantoms packaged now)"
    )
    p.add_argument("--n", type=int, default=200, help="phantoms to make when no --dataset is given")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--widths", type=int, nargs=5, default=(64, 128, 256, 512, 512), help="VGG8 conv widths")
    p.add_argument("--hidden", type=int, nargs=2, default=(512, 512), help="VGG8 hidden sizes")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="data-loader worker counts to compare"
    )
    p.add_argument("--epochs", type=int, default=2, help="measured epochs per setting (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def phantom_dataset(folder: Path, n: int, size: int) -> Path:
    """Phantoms -> split -> package into ``folder``: the offline dataset train.py trains on in the demo."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits
    from stda_hf.dataset.packaging import package

    make_phantoms(folder / "real", PhantomConfig(n=n, size=size, seed=0))
    make_splits(folder / "real", SplitConfig(seed=0))
    package(folder / "real", folder / "hub")
    return folder / "hub"


def time_loader(loader, epochs: int) -> float:
    """Images per second of the data loader alone (decode, augment, collate)."""
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        n += sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - start)


def time_compute(model, optimizer, accelerator, batch_size: int, size: int, steps: int) -> float:
    """Images per second of forward + backward + step on random tensors already in memory (no loader)."""
    x = torch.randn(batch_size, 3, size, size, device=accelerator.device)
    y = torch.randint(0, 2, (batch_size,), device=accelerator.device)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def measure(args, hub: Path, workers: int, accelerator) -> dict[str, float]:
    """One setting: warm-up epoch, then ``args.epochs`` timed epochs of train_one_epoch."""
    from stda_hf.models import Preprocessing, build_model

    cfg = TrainConfig(
        dataset=str(hub), image_size=args.image_size, batch_size=args.batch_size, num_workers=workers
    )
    splits = load_splits(cfg)
    data = ImageLabelSet(
        splits.train, build_transforms(cfg, Preprocessing(args.image_size), train=True), "train"
    )
    sampler = EpochSampler(data.labels, len(data), 0, balanced=False, seed=0)
    model = build_model("vgg8", "random", widths=args.widths, hidden=args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, make_loader(data, cfg, sampler))
    loss_fn = torch.nn.CrossEntropyLoss()
    train_one_epoch(model, loader, optimizer, loss_fn, accelerator, 1e-4, 0)  # warm-up (workers, allocator)
    totals = {"images": 0.0, "data_seconds": 0.0, "compute_seconds": 0.0}
    for epoch in range(1, args.epochs + 1):
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, accelerator, 1e-4, epoch)
        totals = {k: totals[k] + stats[k] for k in totals}
    seconds = totals["data_seconds"] + totals["compute_seconds"]
    return {
        "workers": workers,
        "images_per_second": totals["images"] / seconds,
        "data_share": totals["data_seconds"] / seconds,
        **totals,
        "loader_only": time_loader(loader, args.epochs),
        "compute_only": time_compute(model, optimizer, accelerator, args.batch_size, args.image_size, 10),
    }


def main(argv=None) -> None:
    from accelerate import Accelerator

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(args.dataset) if args.dataset else phantom_dataset(Path(tmp), args.n, args.image_size)
        rows = [measure(args, hub, w, accelerator) for w in args.workers]
    print(
        f"device {accelerator.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{args.image_size} px, VGG8 widths {list(args.widths)} hidden {list(args.hidden)}, "
        f"{args.epochs} epoch(s) of {int(rows[0]['images'] / args.epochs)} images per setting"
    )
    print(
        f"{'workers':>7} {'img/s':>8} {'waiting for data':>17} {'computing':>10} {'loader only':>12} {'model only':>11}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['images_per_second']:>8.1f} {r['data_seconds']:>8.2f} s ({r['data_share']:>4.0%})"
            f" {r['compute_seconds']:>8.2f} s {r['loader_only']:>8.0f} img/s {r['compute_only']:>7.1f} img/s"
        )


if __name__ == "__main__":
    main()
