"""Training runs as subprocesses: the command, GPU slots, scheduling, and reading back what a run wrote.

A failing run is recorded in the table, not fatal; Ctrl-C stops the running process groups."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from queue import Queue
from typing import Any

from stda_hf.benchmark.config import (
    EXPLAIN_DIR,
    RUN_METRICS,
    BenchmarkConfig,
    RunKey,
    dataset_key,
    train_settings,
)
from stda_hf.benchmark.table import RunTable
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_text

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The command and the devices


def default_train_command(gpus: int = 1) -> list[str]:
    """``python -m stda_hf.training`` (train.py's command, installed with the package), or under
    ``accelerate launch --multi_gpu`` when one run spans several GPUs."""
    if gpus == 1:
        return [sys.executable, "-m", "stda_hf.training"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus)]
    return [*launch, "-m", "stda_hf.training"]


def train_argv(cfg: BenchmarkConfig, settings: dict[str, Any], run_dir: Path, mode: str) -> list[str]:
    """The command line of one training run: the settings go in a YAML beside the run folder.

    ``mode`` is ``resume`` (continue an interrupted run, fresh start if none) or ``overwrite`` (start again).
    """
    import yaml

    config = run_dir.parent / f"{run_dir.name}.yaml"
    write_text(config, yaml.safe_dump({**settings, "output_dir": str(run_dir)}, sort_keys=True))
    base = [sys.executable if c == "{python}" else c for c in cfg.train_command]
    return [*(base or default_train_command(cfg.gpus_per_run)), "--config", str(config), f"--{mode}"]


def run_command(
    argv: list[str], log: Path, devices: str | None, timeout: float, threads: int = 0
) -> tuple[bool, str, float]:
    """Run one training command with its output in ``log``; return (ok, error, seconds).

    The command runs in its own process group, so a timeout or Ctrl-C stops it and every worker it started.
    ``devices`` sets ``CUDA_VISIBLE_DEVICES`` (None: the CPU, or whatever the environment says); ``threads``
    (if positive) caps its CPU threads.
    """
    env = {**os.environ, "STDA_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if threads > 0:
        env.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"), str(threads)))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _ACTIVE.add(proc.pid)
        if _STOPPING.is_set():  # Ctrl-C came while this command was starting: execute_runs did not see it
            stop_group(proc.pid)
        try:
            code = proc.wait(timeout=timeout or None)
        except BaseException as err:  # timeout, Ctrl-C: stop the whole group, then report or re-raise
            stop_group(proc.pid)
            proc.wait()
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            return False, f"stopped after {timeout:g} s (run_timeout); log: {log}", time.monotonic() - start
        finally:
            _ACTIVE.discard(proc.pid)
    seconds = time.monotonic() - start
    if code != 0:
        return False, f"exit status {code}: {last_error_line(log)} (log: {log})", seconds
    return True, "", seconds


def stop_group(pgid: int) -> None:
    """Kill a training command's process group (it may already be gone)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_error_line(log: Path) -> str:
    """The most telling line at the end of a log: the last line naming an error, else the last line."""
    lines = [
        ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    for line in reversed(lines[-60:]):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def device_slots(devices: str, gpus_per_run: int, cpu_slots: int = 1) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` values of the parallel run slots; ``cpu_slots`` slots of ``None`` on the CPU.

    Raises
    ------
    StdaError
        A bad ``devices`` value, or fewer GPUs than one run needs.
    """
    if devices == "cpu":
        return [None] * cpu_slots
    if devices == "auto":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    else:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not all(d.isdigit() for d in ids):
            raise StdaError(f"devices {devices!r}: use auto, cpu, or GPU ids like 0,1,2")
    if not ids:
        return [None] * cpu_slots
    if len(ids) < gpus_per_run:
        raise StdaError(
            f"gpus_per_run {gpus_per_run} but only {len(ids)} GPU(s) ({','.join(ids)}) are available"
        )
    return [",".join(ids[i : i + gpus_per_run]) for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


# ----------------------------------------------------------------------------------------------------------------
# What a run wrote


def read_run_metrics(run_dir: Path) -> dict[str, float]:
    """Test metrics of a finished run (:data:`RUN_METRICS` from ``metrics/test.json``, ``evaluate.save``'s file).

    Explanation numbers the trainer may log there are left out: the benchmark explains every run itself, on
    the same images for every arm (:func:`explain_run`).

    Raises
    ------
    StdaError
        When the run wrote no test metrics.
    """
    from stda_hf.core.statefile import Fields, read_json

    path = run_dir / "metrics" / "test.json"
    if not path.is_file():
        raise StdaError(f"{run_dir} finished without test metrics ({path} missing)")
    raw = read_json(
        path, Fields(), recover=f"delete the run folder {run_dir}: the next benchmark run redoes it"
    )
    return {k: float(raw[k]) for k in RUN_METRICS if isinstance(raw.get(k), (int, float))}


def read_run_log(run_dir: Path) -> list[dict[str, float]]:
    """Per-epoch records of a run's JSON-lines log as ``{epoch, train_loss, val_<metric>...}``."""
    from stda_hf.core.fileio import read_jsonl

    records = []
    for r in read_jsonl(run_dir / "log.jsonl"):
        if not isinstance(r.get("epoch"), int) or "train/loss" not in r:
            continue
        rec = {"epoch": r["epoch"], "train_loss": r["train/loss"]}
        rec.update({f"val_{k.split('/', 1)[1]}": v for k, v in r.items() if k.startswith("validation/")})
        records.append(rec)
    return records


def find_heatmap(run_dir: Path) -> Path | None:
    """The heatmap grid the benchmark's explanation of a run wrote (``explain/grid.png``), or None."""
    grid = run_dir / EXPLAIN_DIR / "grid.png"
    return grid if grid.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# Scheduling


_ACTIVE: set[int] = set()  # process groups of running training commands, stopped on Ctrl-C
# Set on Ctrl-C before _ACTIVE is read, and read by run_command after it adds a process: a command starting at
# that moment is either in _ACTIVE when it is read, or sees the flag and stops itself.
_STOPPING = threading.Event()


def run_one(cfg: BenchmarkConfig, key: RunKey, dataset: Path, slot: str | None, mode: str) -> dict[str, Any]:
    """Train one run and return its table row values (status, seconds, run_dir, metrics, error)."""
    run_dir = cfg.work_dir / "runs" / key.name
    log = run_dir.parent / f"{run_dir.name}.log"
    if mode == "overwrite":
        log.unlink(missing_ok=True)
        shutil.rmtree(run_dir / EXPLAIN_DIR, ignore_errors=True)
    settings = {**cfg.train, **train_settings(cfg.arms[key.arm]), "seed": key.seed, "dataset": str(dataset)}
    argv = train_argv(cfg, settings, run_dir, mode)
    ok, error, seconds = run_command(argv, log, slot, cfg.run_timeout, cfg.cpu_threads)
    metrics: dict[str, float] = {}
    if ok:
        try:
            metrics = read_run_metrics(run_dir)
        except StdaError as err:
            ok, error = False, str(err)
    values = {
        "seconds": round(seconds, 1),
        "run_dir": str(Path("runs") / key.name),
        **metrics,
        "error": error,
    }
    return {"status": "done" if ok else "failed", **values}


def dataset_of(cfg: BenchmarkConfig, datasets: dict[tuple[int, int], Any], key: RunKey) -> Path | str:
    """The dataset folder a run trains on (its fold's, with its arm's synthetic set), or why there is none."""
    found = datasets.get((key.repeat, key.fold), "fold not prepared")
    if isinstance(found, str):
        return found
    return found.get(dataset_key(cfg, key.arm), f"no dataset for arm {key.arm} in fold {key.fold}")


def execute_runs(
    cfg: BenchmarkConfig, table: RunTable, todo: list[RunKey], datasets: dict[tuple[int, int], Any]
) -> None:
    """Run ``todo`` (``cpu_slots`` at once on the CPU, one run per GPU slot otherwise), recording each as it ends.

    ``datasets`` is :func:`~.stages.prepare_folds`'s ``{(repeat, fold): {recipe: folder} or error}``."""
    from stda_hf.core.utils import progress

    lock = threading.Lock()
    _STOPPING.clear()
    chosen = {k: dataset_of(cfg, datasets, k) for k in todo}
    for key in (k for k in todo if not isinstance(chosen[k], Path)):
        table.record(key, "failed", error=chosen[key])
    ready = [k for k in todo if isinstance(chosen[k], Path)]
    slots = device_slots(cfg.devices, cfg.gpus_per_run, cfg.cpu_slots)
    free: Queue = Queue()
    for slot in slots:
        free.put(slot)

    def work(key: RunKey) -> dict[str, Any]:
        slot = free.get()
        try:
            with lock:
                mode = "resume" if table.status(key) == "running" else "overwrite"
                table.record(key, "running", run_dir=str(Path("runs") / key.name))
            return run_one(cfg, key, chosen[key], slot, mode)
        finally:
            free.put(slot)

    bar = progress(total=len(ready), desc="benchmark runs", unit="run")
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = {pool.submit(work, key): key for key in ready}
        try:
            for future in as_completed(futures):
                key, row = futures[future], future.result()
                with lock:
                    table.record(key, **row)
                bar.set_postfix_str(f"{key.name}: {row['status']}")
                bar.update()
        except BaseException:  # Ctrl-C: stop every run; their rows stay "running" and resume next time
            _STOPPING.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for pgid in list(_ACTIVE):
                stop_group(pgid)
            raise
        finally:
            bar.close()
