"""Peak memory of ``stda package`` for N and 10N phantom images: it should stay flat as the dataset grows.

    .venv/bin/python benchmarks/package_memory.py --n 100 --size 256

Each build runs in a fresh Python process, twice: once for the resident set size (peak RSS above what the
imports take, read before ``package`` starts) and once under ``tracemalloc`` (peak Python heap during
``package``). Prints both figures for N and 10N images and their ratio; a streaming packager keeps the ratio
near 1, one that holds a split in memory grows it towards 10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("STDA_NO_PROGRESS", "1")

MEASURE = """
import json, os, resource, sys, time, tracemalloc
from stda_hf.dataset.packaging import package

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

real, out, mode = sys.argv[1:4]
base = rss()
if mode == "tracemalloc":
    tracemalloc.start()
start = time.perf_counter()
package(real, out)
seconds = time.perf_counter() - start
peak_heap = tracemalloc.get_traced_memory()[1] if mode == "tracemalloc" else None
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base_rss": base, "peak_rss": peak_rss, "peak_heap": peak_heap, "seconds": seconds}))
"""


def make_real(root: Path, n: int, size: int, seed: int) -> Path:
    """A split phantom folder of ``n`` images."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits

    make_phantoms(root, PhantomConfig(n=n, size=size, seed=seed))
    make_splits(root, SplitConfig(seed=seed))
    return root


def measure(real: Path, out: Path, mode: str) -> dict:
    """Package ``real`` into ``out`` in a fresh process and return its memory figures."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(real), str(out), mode], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="images of the small build (default: 100)")
    parser.add_argument("--factor", type=int, default=10, help="the large build has n x factor images")
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels (default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, args.n * args.factor):
            start = time.perf_counter()
            real = make_real(Path(tmp) / f"real-{n}", n, args.size, args.seed)
            made = time.perf_counter() - start
            rss = measure(real, Path(tmp) / f"hub-rss-{n}", "rss")
            heap = measure(real, Path(tmp) / f"hub-heap-{n}", "tracemalloc")
            data = folder_bytes(Path(tmp) / f"hub-rss-{n}" / "data")
            rows.append({"n": n, "rss": rss, "heap": heap, "data": data, "phantoms_s": made})
    mib = 1024**2
    print(f"stda package memory, phantoms at {args.size}px ({os.cpu_count()} CPUs)")
    print(
        f"{'images':>8} {'parquet MiB':>12} {'peak RSS MiB':>13} {'RSS over imports':>17} {'peak heap MiB':>14} {'package s':>10}"
    )
    for r in rows:
        over = r["rss"]["peak_rss"] - r["rss"]["base_rss"]
        print(
            f"{r['n']:>8} {r['data'] / mib:>12.1f} {r['rss']['peak_rss'] / mib:>13.1f} {over / mib:>17.1f} "
            f"{r['heap']['peak_heap'] / mib:>14.2f} {r['rss']['seconds']:>10.1f}"
        )
    small, large = rows
    over = [r["rss"]["peak_rss"] - r["rss"]["base_rss"] for r in rows]
    print(
        f"ratio {large['n']}/{small['n']} images: data x{large['data'] / small['data']:.1f}, "
        f"peak RSS x{large['rss']['peak_rss'] / small['rss']['peak_rss']:.2f}, "
        f"RSS over imports x{over[1] / max(over[0], 1):.2f}, "
        f"peak heap x{large['heap']['peak_heap'] / small['heap']['peak_heap']:.2f}"
    )


if __name__ == "__main__":
    main()
