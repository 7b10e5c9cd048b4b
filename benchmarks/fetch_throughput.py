"""Throughput of ``stda fetch`` against the local test archive, by number of download workers.

    python benchmarks/fetch_throughput.py --n 200 --size 64 --latency 0.05

Serves ``n`` phantom images from tests/isic_server.py on 127.0.0.1 with ``latency`` seconds before each file
answer (a network round trip; the real archive serves files from S3/CloudFront), fetches them with 1, 4, 8 and
16 workers into fresh folders, then re-runs the finished fetch (resume cost) and fetches once more with a 500
injected into every tenth file (retry cost), once with every tenth file garbled once (the in-run retry of a file
that does not decode), and once with every tenth file dripping until its deadline (the cost of a hostile server:
those files are skipped). Prints images/s and the speed-up over one worker, all measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from isic_server import FakeIsicArchive, phantom_archive  # noqa: E402

from stda_hf.fetch.stage import FetchConfig, fetch  # noqa: E402


def timed_fetch(archive: FakeIsicArchive, out: Path, workers: int, deadline: float = 300.0) -> float:
    cfg = FetchConfig(
        api_url=archive.api_url,
        workers=workers,
        image_type="",
        include_indeterminate=True,
        file_hosts=(archive.storage,),
        deadline=deadline,
        retries=1,
        backoff=0.05,
    )
    start = time.perf_counter()
    fetch(out, cfg)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images in the archive (default: 200)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument(
        "--latency", type=float, default=0.05, help="seconds before each file answer (default: 0.05)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("STDA_NO_PROGRESS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    images = phantom_archive(tmp / "phantoms", n=args.n, size=args.size)
    archive = FakeIsicArchive(images, file_latency=args.latency).start()
    try:
        print(
            f"{args.n} images of {args.size}px, {args.latency * 1000:.0f} ms per file answer, {os.cpu_count()} CPUs"
        )
        base = None
        for workers in (1, 4, 8, 16):
            seconds = timed_fetch(archive, tmp / f"w{workers}", workers)
            base = base or seconds
            print(
                f"  workers {workers:>2}: {seconds:6.2f} s  {args.n / seconds:7.1f} img/s  x{base / seconds:.1f}"
            )
        print(
            f"  resume of a finished fetch (8 workers): {timed_fetch(archive, tmp / 'w8', 8):.2f} s, 0 files"
        )
        for im in images[::10]:
            archive.fault(f"file:{im.isic_id}", "500")
        seconds = timed_fetch(archive, tmp / "faults", 8)
        print(f"  8 workers, a 500 on every tenth file: {seconds:.2f} s ({args.n / seconds:.1f} img/s)")
        for im in images[::10]:
            archive.fault(f"file:{im.isic_id}", "garble")
        seconds = timed_fetch(archive, tmp / "garbled", 8)
        print(f"  8 workers, every tenth file garbled once: {seconds:.2f} s ({args.n / seconds:.1f} img/s)")
        for im in images[::10]:
            archive.always(f"file:{im.isic_id}", "drip")
        seconds = timed_fetch(archive, tmp / "drip", 8, deadline=1.0)
        print(
            f"  8 workers, every tenth file dripping (1 s deadline, 2 tries, then skipped): {seconds:.2f} s "
            f"({args.n / seconds:.1f} img/s)"
        )
    finally:
        archive.stop()


if __name__ == "__main__":
    main()
