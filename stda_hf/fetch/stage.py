"""``stda fetch``: download benign and malignant images from the ISIC Archive into the real-image folder.

    stda fetch --out real/ --limit 500                            # the 500 oldest benign + 500 malignant
    stda fetch --out real/ --limit 500 --sample random --seed 1   # 500 per class sampled across the archive
    stda fetch --out real/ --licenses CC-0 CC-BY --dry-run        # counts per class and licence, no download

The stage: hold the folder's lock, check that a resumed fetch keeps its selection, check the collections, the
counts and the free disk space, record the selection (``fetch.yaml``, only once the archive accepted it), fetch
each class, then write ``ATTRIBUTION.md``, ``LICENSES/`` and ``fetch_skipped.json`` and summarise the run
(:class:`FetchResult`, whose :attr:`~FetchResult.complete` says whether every selected image is on disk);
``--dry-run`` counts instead (:func:`dry_run`). Its parts:
:mod:`stda_hf.fetch.api` (the settings, the archive query, the client, the records),
:mod:`stda_hf.fetch.downloads` (the worker pool: stream, verify, journal, rename into ``images/``) and
:mod:`stda_hf.fetch.records` (``metadata.csv``, the digest journal, the credit and licence each file embeds).
An interrupted run leaves a usable folder, and re-running the same command continues where it stopped.
URLs are never stored or logged, only ISIC ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

from stda_hf.core.config import changed_settings, config_to_dict, dump_config, read_settings
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import exclusive, write_json
from stda_hf.core.utils import progress
from stda_hf.data.licenses import write_attribution
from stda_hf.fetch.api import (
    METADATA_MARGIN,
    SKIP_KINDS,
    FetchConfig,
    IsicClient,
    SkipImage,
    build_query,
    parse_record,
)
from stda_hf.fetch.downloads import STAGING_DIR, DownloadRun, WorkerPool, fetch_class, human_bytes
from stda_hf.fetch.records import DigestJournal, MetadataLog, count_on_disk

logger = logging.getLogger(__name__)

INTERRUPT_WAIT = 0.5
"""Seconds an interrupted run waits for its workers to notice (a transfer stuck in a read is abandoned)."""
DRY_RUN_PAGING_MAX = 5000
"""A dry run pages through at most this many records per class (50 requests) to count only the acceptable
ones; above it, it takes the archive's facets (one request) and says that refused records are not known."""
SELECTION = (
    "api_url",
    "query",
    "collections",
    "image_type",
    "licenses",
    "include_indeterminate",
    "sample",
    "seed",
)
"""Settings that decide which images a folder holds; a resumed fetch must keep them."""
SETTINGS_FILE = "fetch.yaml"
SKIPPED_FILE = "fetch_skipped.json"


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class FetchResult:
    """What one ``stda fetch`` run did."""

    out: Path
    per_class: dict[str, int]  # images on disk per class after the run
    downloaded: int  # files downloaded by this run
    adopted: int  # verified files a killed run left without a row, kept without downloading again
    bytes: int  # bytes downloaded by this run
    skipped: dict[str, str]  # id -> why it was not fetched
    refused: set[str] = field(
        default_factory=set
    )  # skipped ids a re-run cannot fetch (unsafe, outside selection)
    credit_differs: int = 0  # images whose embedded credit is not the API's cohort attribution (expected)
    license_differs: dict[str, str] = field(default_factory=dict)  # id -> "embedded X, API Y: Z applies"
    wanted: dict[str, int] = field(default_factory=dict)  # class -> images selected (count - refused, limit)
    kinds: dict[str, int] = field(default_factory=dict)  # skip kind -> images skipped this run
    short: dict[str, tuple[int, int]] = field(default_factory=dict)  # class -> (count, records that came)

    @property
    def missing(self) -> int:
        """Selected images not on disk: skipped ones, and those a search that ended early never listed."""
        return sum(max(0, want - self.per_class.get(name, 0)) for name, want in self.wanted.items())

    @property
    def complete(self) -> bool:
        """Whether every selected image is on disk (what exit status 0 means)."""
        return self.missing == 0

    def format(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"{self.out}: " + ", ".join(f"{k} {v}" for k, v in self.per_class.items()) + " images on disk",
            f"  this run: {self.downloaded} downloaded ({human_bytes(self.bytes)}), {self.adopted} kept from "
            f"an interrupted run, {len(self.skipped)} skipped",
        ]
        lines += [f"    skipped {k}: {v}" for k, v in sorted(self.skipped.items())[:20]]
        if len(self.skipped) > 20:
            lines.append(f"    ... and {len(self.skipped) - 20} more, see {self.out / SKIPPED_FILE}")
        if self.kinds:
            lines.append(
                "  skipped by kind: "
                + ", ".join(f"{n} {SKIP_KINDS.get(k, k)}" for k, n in sorted(self.kinds.items()))
            )
        for name, (count, came) in self.short.items():
            lines.append(
                f"  {name}: the archive counted {count} matching images but its search listed only {came}; "
                "re-run later to fetch the rest"
            )
        retry = len(set(self.skipped) - self.refused)
        if retry:
            lines.append(f"  re-run the same command to retry the {retry} failed download(s)")
        if self.refused:
            lines.append(f"  {len(self.refused)} record(s) refused for good (a re-run will not fetch them)")
        if self.missing:
            lines.append(f"  incomplete: {self.missing} selected image(s) are not on disk")
        if self.credit_differs:
            lines.append(
                f"  {self.credit_differs} image(s) embed a credit other than the API's cohort attribution; "
                "ATTRIBUTION.md uses the file's (api_attribution in metadata.csv keeps the API's)"
            )
        for isic_id, what in sorted(self.license_differs.items())[:20]:
            lines.append(f"  licence disagreement {isic_id}: {what}")
        return "\n".join(lines)


def fetch(out: str | Path, cfg: FetchConfig | None = None, client: IsicClient | None = None) -> FetchResult:
    """Download the images ``cfg`` selects into the real-image folder ``out``; resume what is there.

    Parameters
    ----------
    out : path
        Output folder: ``images/<isic_id>.<ext>``, ``metadata.csv`` (appended as images finish),
        ``ATTRIBUTION.md``, ``LICENSES/``, ``fetch.yaml`` (settings) and ``fetch_skipped.json``.
    cfg : FetchConfig, optional
        Selection, concurrency and retry settings.
    client : IsicClient, optional
        A client to use (tests pass one with a recording ``sleep``); closed at the end.

    Returns
    -------
    FetchResult
        Counts of this run and of the folder.

    Raises
    ------
    StdaError
        The folder holds another selection or another kind of data, another fetch is writing to it, a
        collection id is unknown, the API refused the query or stayed unreachable, or the disk lacks the
        space. Finished images are kept in every case.
    """
    cfg = cfg or FetchConfig()
    root = Path(out)
    with _exclusive(root):
        _check_selection(root, cfg)
        _clear_staging(root)
        log = MetadataLog(root)
        refused = refused_before(root)
        with client or IsicClient(cfg) as cl:
            check_collections(cl, cfg)
            counts = {d: cl.count(build_query(cfg, d)) for d in cfg.diagnoses.values()}
            todo = {d: _todo(cfg, log, d, n, refused) for d, n in counts.items()}
            check_space(cl, cfg, root, todo)
            dump_config(cfg, root / SETTINGS_FILE)  # the archive accepted the selection: record it
            bar = progress(total=sum(t for _, t in todo.values()), desc="fetch", unit="img")
            pool = WorkerPool(cfg.workers, "stda-fetch")
            run = DownloadRun(cfg, root, cl, log, DigestJournal(root), pool, bar, refused, counts)
            try:
                for diagnosis in cfg.diagnoses.values():
                    fetch_class(run, diagnosis)
                pool.shutdown()
            except BaseException:
                cl.stop.set()
                pool.shutdown(timeout=INTERRUPT_WAIT)
                raise
            finally:
                bar.close()
                _finish_folder(run)
    credit_differs, license_differs = log.disagreements()
    names = {d: name for name, d in cfg.diagnoses.items()}
    wanted = {}
    for name, diagnosis in cfg.diagnoses.items():
        selectable = max(0, counts[diagnosis] - len(run.refused.get(diagnosis, ())))
        wanted[name] = min(selectable, cfg.limit) if cfg.limit else selectable
    return FetchResult(
        out=root,
        per_class={name: log.count(d) for name, d in cfg.diagnoses.items()},
        downloaded=run.downloaded,
        adopted=run.adopted,
        bytes=run.bytes,
        skipped=dict(run.report.skipped),
        refused=set(run.report.skipped) & set().union(*run.refused.values()),
        credit_differs=credit_differs,
        license_differs=license_differs,
        wanted=wanted,
        kinds=dict(run.kinds),
        short={names[d]: v for d, v in run.short.items()},
    )


def check_collections(client: IsicClient, cfg: FetchConfig) -> None:
    """Refuse a collection id the archive does not show: a search would silently filter everything out.

    Raises
    ------
    StdaError
        Naming the first unknown (or private) id.
    """
    for collection_id in cfg.collections:
        if client.collection(collection_id) is None:
            raise StdaError(
                f"--collections {collection_id}: the ISIC Archive has no public collection with this id "
                f"(GET {urljoin(cfg.api_url, f'collections/{collection_id}/')} answered 404); pick ids from "
                f"{urljoin(cfg.api_url, 'collections/')}"
            )


def _todo(
    cfg: FetchConfig, log: MetadataLog, diagnosis: str, count: int, refused: dict[str, set[str]]
) -> tuple[int, int]:
    """(matches, images still to fetch) of one class from the archive's ``count``; records refused for good
    are not counted."""
    matches = max(0, count - len(refused.get(diagnosis, ())))
    want = min(matches, cfg.limit) if cfg.limit else matches
    return matches, max(0, want - log.count(diagnosis))


def space_needed(client: IsicClient, cfg: FetchConfig, todo: dict[str, tuple[int, int]]) -> int | None:
    """Approximate bytes the images left to fetch need: the archive's ``images/search/size/`` (the stated,
    pre-embedding sizes) scaled to the images left, plus :data:`METADATA_MARGIN` each (an upper bound of what
    the archive embeds). None where the archive does not report sizes. ``todo``: diagnosis -> (matches, left).
    """
    need = 0
    for diagnosis, (matches, left) in todo.items():
        if not left or not matches:
            continue
        stated = client.total_size(build_query(cfg, diagnosis))
        if stated is None:
            return None
        need += math.ceil(stated * left / matches) + left * METADATA_MARGIN
    return need


def check_space(client: IsicClient, cfg: FetchConfig, root: Path, todo: dict[str, tuple[int, int]]) -> None:
    """Refuse to start when ``root``'s disk cannot hold what is left to fetch (:func:`space_needed`).

    Raises
    ------
    StdaError
        Saying how much is needed and how much is free.
    """
    need = space_needed(client, cfg, todo)
    if need is None:
        logger.info("the archive does not report selection sizes; not checking free disk space")
        return
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        images = sum(left for _, left in todo.values())
        raise StdaError(
            f"{root}: the {images} images left to fetch need about {human_bytes(need)} (the archive's stated "
            f"sizes plus {METADATA_MARGIN} bytes each for the metadata it embeds), but only "
            f"{human_bytes(free)} is free; free some space, use another --out, or lower --limit"
        )


def refused_before(root: Path) -> dict[str, set[str]]:
    """``diagnosis_1`` -> ids of the records an earlier run refused for good (from ``fetch_skipped.json``)."""
    path = Path(root) / SKIPPED_FILE
    try:
        refused = json.loads(path.read_text(encoding="utf-8")).get("refused", {})
        return {str(d): {str(i) for i in ids} for d, ids in refused.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _finish_folder(run: DownloadRun) -> None:
    """Attribution, licence texts and the skip report: written at the end of every run, interrupted or not."""
    if len(run.log):
        write_attribution(
            run.root, run.log.attribution_rows(), title="Attribution: images from the ISIC Archive"
        )
    write_json(
        run.root / SKIPPED_FILE,
        {
            "skipped": dict(sorted(run.report.skipped.items())),
            "refused": {d: sorted(ids) for d, ids in sorted(run.refused.items())},
        },
    )
    with contextlib.suppress(OSError):
        (run.root / STAGING_DIR).rmdir()
    if (run.root / "splits.csv").exists() and run.downloaded + run.adopted:
        logger.warning("%s: new images arrived after `stda split`; run it again", run.root)


def _exclusive(root: Path) -> contextlib.AbstractContextManager[Path]:
    """Hold ``root``'s fetch lock (the shared :func:`~stda_hf.core.fileio.exclusive`): one fetch per folder."""
    busy = f"another `stda fetch` is writing to {root}; wait for it to finish or use another --out"
    return exclusive(root, ".fetch.lock", busy)


def _check_selection(root: Path, cfg: FetchConfig) -> None:
    """Refuse to mix selections in one folder, or to write into a folder another tool made."""
    settings = root / SETTINGS_FILE
    if not settings.exists():
        if (root / "metadata.csv").exists():
            raise StdaError(
                f"{root} holds a real-image folder that `stda fetch` did not write; use another --out"
            )
        return
    if not _holds_images(root):
        return  # an earlier run fetched nothing: the folder is fresh, whatever it tried to select
    change = selection_change(root, cfg)
    if change:
        raise StdaError(
            f"{root} was fetched with another selection ({change}); re-run with the same settings to resume, "
            f"or start over in another --out (or after deleting {root})"
        )


def _holds_images(root: Path) -> bool:
    """Whether ``root`` has a ``metadata.csv`` row or a file in ``images/``."""
    images = root / "images"
    return (root / "metadata.csv").exists() or (images.is_dir() and any(images.iterdir()))


def selection_change(root: str | Path, cfg: FetchConfig) -> str | None:
    """How ``cfg`` selects other images than the fetch that wrote ``root`` (None: same selection, or none yet)."""
    before = read_settings(Path(root) / SETTINGS_FILE)
    if before is None:
        return None
    now = config_to_dict(cfg)
    changed = changed_settings(before, now, keys=SELECTION, missing_is_change=False)
    return "; ".join(f"{k}: {before[k]!r} before, {now[k]!r} now" for k in changed) or None


def _clear_staging(root: Path) -> None:
    staging = root / STAGING_DIR
    if staging.is_dir():
        for p in staging.iterdir():
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Dry run


@dataclass
class DryRun:
    """How many images a fetch would select, per class and licence."""

    queries: dict[str, str]  # class -> archive query
    counts: dict[str, dict[str, int]]  # class -> licence -> matching images
    totals: dict[str, int]  # class -> matching images a fetch can take (records refused for good left out)
    on_disk: dict[str, int]  # class -> images already in the output folder
    limit: int
    method: str  # "facets" (one request per class) or "paging" (metadata only, no files)
    note: str = ""  # e.g. that the output folder holds another selection
    no_diagnosis: int = 0  # images matching every other filter but without any diagnosis_1 (never fetched)
    refused: dict[str, int] = field(
        default_factory=dict
    )  # class -> records refused for good (unsafe id, ...)
    approx_bytes: int | None = None  # what the images to fetch need on disk (the disk check's estimate)

    def format(self) -> str:
        """A table: class, matches per licence, total, what a fetch would download."""
        licenses = sorted({lic for c in self.counts.values() for lic in c})
        head = f"{'class':<14}" + "".join(f"{lic:>10}" for lic in licenses) + f"{'total':>10}{'to fetch':>10}"
        lines = [head]
        for name, total in self.totals.items():
            want = min(total, self.limit) if self.limit else total
            lines.append(
                f"{name:<14}"
                + "".join(f"{self.counts[name].get(lic, 0):>10}" for lic in licenses)
                + f"{total:>10}{max(0, want - self.on_disk.get(name, 0)):>10}"
            )
        if self.approx_bytes is not None:
            lines.append(
                f"about {human_bytes(self.approx_bytes)} to download (approximate: the archive's stated sizes "
                f"plus up to {METADATA_MARGIN} bytes each for the metadata it embeds)"
            )
        else:
            lines.append("size unknown: the archive does not report selection sizes")
        lines.append(f"{self.no_diagnosis} matching image(s) have no diagnosis_1 and are never fetched")
        for name, n in self.refused.items():
            if n:
                lines.append(
                    f"{n} {name} record(s) refused for good (unsafe id or outside the selection): not counted"
                )
        lines.append(f"(counted by {self.method}; queries:)")
        lines += [f"  {name}: {q}" for name, q in self.queries.items()]
        return "\n".join(lines + ([self.note] if self.note else []))


def dry_run(cfg: FetchConfig | None = None, out: str | Path | None = None) -> DryRun:
    """Count what ``cfg`` selects per class and licence without downloading any image file.

    Pages through the search results (metadata only, leaving out records a fetch would refuse) when a class has
    at most :data:`DRY_RUN_PAGING_MAX` matches or the archive offers no facets; otherwise takes the facets.
    Records an earlier fetch into ``out`` refused for good are not counted either. The size is the disk check's
    estimate (:func:`space_needed`).

    Raises
    ------
    StdaError
        A collection id is unknown, or the API refused the query or stayed unreachable.
    """
    cfg = cfg or FetchConfig()
    on_disk, note, refused_ids = {}, "", {}
    if out is not None:
        change = selection_change(out, cfg) if _holds_images(Path(out)) else None
        if change:
            note = f"{out} holds another selection ({change}): a fetch into it would be refused"
        else:
            on_disk = count_on_disk(out, cfg.diagnoses)
            refused_ids = refused_before(Path(out))
    queries = {name: build_query(cfg, d) for name, d in cfg.diagnoses.items()}
    counts, totals, methods, refused = {}, {}, set(), {}
    with IsicClient(cfg) as client:
        check_collections(client, cfg)
        for name, query in queries.items():
            diagnosis = cfg.diagnoses[name]
            total = client.count(query)
            counts[name], method, unsafe = _license_counts(client, query, total, diagnosis, cfg.licenses)
            refused[name] = unsafe if method == "paging" else len(refused_ids.get(diagnosis, ()))
            # paged: what the pages delivered and a fetch would take (the count may run ahead of them)
            totals[name] = sum(counts[name].values()) if method == "paging" else total - refused[name]
            methods.add(method)
        no_diagnosis = client.count(build_query(cfg, None))
        todo = {}
        for name, diagnosis in cfg.diagnoses.items():
            want = min(totals[name], cfg.limit) if cfg.limit else totals[name]
            todo[diagnosis] = (totals[name], max(0, want - on_disk.get(name, 0)))
        approx = space_needed(client, cfg, todo)
    return DryRun(
        queries,
        counts,
        totals,
        on_disk,
        cfg.limit,
        "+".join(sorted(methods)),
        note,
        no_diagnosis,
        refused,
        approx,
    )


def _license_counts(
    client: IsicClient, query: str, total: int, diagnosis: str, licenses: tuple[str, ...]
) -> tuple[dict[str, int], str, int]:
    """(licence -> images, method, records refused for good): by paging the metadata up to
    :data:`DRY_RUN_PAGING_MAX` matches, by facets above it (when the archive offers them)."""
    facets = client.facets(query) if total > DRY_RUN_PAGING_MAX else None
    buckets = ((facets or {}).get("copyright_license") or {}).get("buckets")
    if isinstance(buckets, list) and all(isinstance(b, dict) and "key" in b for b in buckets):
        return {str(b["key"]): int(b.get("doc_count", 0)) for b in buckets if b.get("doc_count")}, "facets", 0
    counts: Counter = Counter()
    refused = 0
    for record in progress(client.search(query), total=total, desc="count", unit="img"):
        try:
            item = parse_record(record, diagnosis, licenses)
        except SkipImage:
            refused += 1
            continue
        counts[item.row["copyright_license"]] += 1
    return dict(sorted(counts.items())), "paging", refused
