"""What binding manifest records to their images costs a resumed ``stda generate``: reading the manifest with and
without checking every image's SHA-256, against the time generate spends per image.

    .venv/bin/python benchmarks/manifest_digest.py --n 2000 --size 256

Builds a synthetic folder of N JPEG images (random pixels, the size generate writes) with a manifest whose
records carry their digests, then times :func:`stda_hf.generate.stage.done_ids` (schema check, unique ids and
every image's digest) and the same read of a manifest without digests (records made before they existed).
Prints both, their ratio, and the digest check's cost per image next to ``--seconds-per-image`` (the time one
image takes to generate; 0.05 s is the arbitrary engine at 256 px on a CPU, Gatys takes seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("STDA_NO_PROGRESS", "1")


def build(folder: Path, n: int, size: int, digests: bool) -> None:
    """A synthetic folder of ``n`` random ``size`` px JPEGs and its manifest (with or without digests)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        image_id = f"syn_{i:016x}"
        path = folder / "images" / f"{image_id}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
        record = {"id": image_id, "file": f"images/{image_id}.jpg", "content_id": "c", "style_id": "s"}
        if digests:
            record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(json.dumps(record) + "\n")
    (folder / "manifest.jsonl").write_text("".join(lines))


def timed(folder: Path, repeats: int) -> float:
    """The median seconds of ``done_ids(folder)`` over ``repeats`` runs (files in the page cache after the first)."""
    from stda_hf.generate.stage import done_ids

    done_ids(folder)  # warm the page cache: both arms read the same bytes from memory
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done_ids(folder)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images in the folder (default: 2000)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads per arm (default: 5)")
    parser.add_argument(
        "--seconds-per-image", type=float, default=0.05, help="generate's time per image (default: 0.05)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bound, unbound = Path(tmp) / "bound", Path(tmp) / "unbound"
        build(bound, args.n, args.size, digests=True)
        build(unbound, args.n, args.size, digests=False)
        mb = sum(p.stat().st_size for p in (bound / "images").iterdir()) / 2**20
        with_digest, without = timed(bound, args.repeats), timed(unbound, args.repeats)
    per_image = (with_digest - without) / args.n
    print(f"{args.n} images of {args.size} px ({mb:,.1f} MiB), median of {args.repeats} reads each:")
    print(f"  done_ids with digests checked: {with_digest:.3f} s")
    print(f"  done_ids without digests:      {without:.3f} s")
    print(f"  ratio (with / without):        {with_digest / without:.1f}x")
    print(
        f"  digest check per image:        {per_image * 1e3:.3f} ms = {per_image / args.seconds_per_image:.2%} of "
        f"{args.seconds_per_image} s to generate it (a resume checks twice: before writing, and when it starts)"
    )


if __name__ == "__main__":
    main()
