"""``stda fetch`` against a local ISIC Archive API v2 (tests/isic_server.py) on 127.0.0.1, with faults."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from isic_server import LICENSES, FakeIsicArchive, corrupt, phantom_archive

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.data.real import REQUIRED_COLUMNS, read_real_folder
from stda_hf.data.split import SplitConfig, make_splits
from stda_hf.fetch.api import METADATA_MARGIN
from stda_hf.fetch.http import backoff_delay, retry_after_seconds
from stda_hf.fetch.records import FILE_COLUMNS
from stda_hf.fetch.stage import FetchConfig, IsicClient, dry_run, fetch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive_images(tmp_path_factory):
    """24 archive images made from 32 px phantoms (built once for this module)."""
    return phantom_archive(tmp_path_factory.mktemp("archive") / "phantoms")


@pytest.fixture
def archive(archive_images):
    """A fresh fake archive on 127.0.0.1, stopped after the test."""
    images = [
        dataclasses.replace(im, clinical=dict(im.clinical), acquisition=dict(im.acquisition))
        for im in archive_images
    ]
    server = FakeIsicArchive(images).start()
    yield server
    server.stop()


def config(archive: FakeIsicArchive, **overrides) -> FetchConfig:
    settings = dict(
        api_url=archive.api_url,
        workers=3,
        page_size=5,
        timeout=5.0,
        retries=3,
        backoff=0.01,
        max_backoff=0.05,
        deadline=10.0,
        file_hosts=(archive.storage,),
    )
    settings.update(overrides)
    return FetchConfig(**settings)


def expected(
    archive: FakeIsicArchive,
    licenses=LICENSES,
    image_types=("dermoscopic",),
    diagnoses=("Benign", "Malignant"),
) -> set[str]:
    return {
        im.isic_id
        for im in archive.images
        if im.copyright_license in licenses
        and im.acquisition["image_type"] in image_types
        and im.clinical["diagnosis_1"] in diagnoses
    }


def image_ids(out: Path) -> set[str]:
    return {p.stem for p in (out / "images").iterdir()} if (out / "images").is_dir() else set()


def metadata_rows(out: Path) -> list[dict]:
    with open(out / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


class RecordingSleep:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# ----------------------------------------------------------------------------------------------------------------
# The folder it writes


def test_fetched_folder_is_read_and_split_by_the_next_stages(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    folder = read_real_folder(out)
    assert {im.isic_id for im in folder.images} == expected(archive)
    for im in folder.images:
        assert im.label == archive.by_id[im.isic_id].clinical["diagnosis_1"].lower()
        assert im.path.read_bytes() == archive.served(archive.by_id[im.isic_id])
    make_splits(out, SplitConfig(seed=0))
    assert set(read_real_folder(out).splits()) == expected(archive)


def test_metadata_has_the_required_columns_first_then_the_flattened_metadata(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    with open(out / "metadata.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[: len(REQUIRED_COLUMNS)] == list(REQUIRED_COLUMNS)
    assert header[len(REQUIRED_COLUMNS) :] == sorted(
        ["age_approx", "anatom_site_general", "melanocytic", "pixels_x", "pixels_y", "sex", *FILE_COLUMNS]
    )
    rows = {r["isic_id"]: r for r in metadata_rows(out)}
    one = rows["ISIC_0000001"]
    assert (one["lesion_id"], one["patient_id"], one["image_type"]) == (
        "IL_0000001",
        "IP_0000001",
        "dermoscopic",
    )
    assert (
        one["attribution"] == 'Clínica 1, "Dermatology" Unit'
    )  # comma, quotes and newline survive as one line
    assert rows["ISIC_0000005"]["lesion_id"] == ""  # absent in the archive: unknown, not invented


def test_new_metadata_key_widens_the_header_and_keeps_earlier_rows(archive, tmp_path):
    last = max(expected(archive))
    archive.by_id[last].clinical["family_hx_mm"] = True
    out = tmp_path / "real"
    fetch(out, config(archive, workers=1))
    rows = {r["isic_id"]: r for r in metadata_rows(out)}
    assert rows[last]["family_hx_mm"] == "True"
    assert {r["family_hx_mm"] for i, r in rows.items() if i != last} == {""}
    assert len(rows) == len(expected(archive))


def test_attribution_and_licence_texts_list_every_image(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    attribution = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for isic_id in expected(archive):
        assert f"| {isic_id} | {archive.by_id[isic_id].copyright_license} |" in attribution
    assert sorted(p.name for p in (out / "LICENSES").iterdir()) == [
        "cc-by-4.0.txt",
        "cc-by-nc-4.0.txt",
        "cc0-1.0.txt",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Search and selection


def test_search_follows_the_next_cursor_page_by_page(archive, tmp_path):
    fetch(tmp_path / "real", config(archive, page_size=4))
    per_class = [len(expected(archive, diagnoses=(d,))) for d in ("Benign", "Malignant")]
    pages = sum(-(-n // 4) for n in per_class)
    assert archive.count("search") == 2 + pages  # one count request per class, then every page once
    assert image_ids(tmp_path / "real") == expected(archive)


def test_limit_caps_each_class(archive, tmp_path):
    result = fetch(tmp_path / "real", config(archive, limit=3))
    assert result.per_class == {"benign": 3, "malignant": 3}
    assert sum(archive.deliveries.values()) == 6


def test_licence_filter_leaves_out_non_commercial_images(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, licenses=("CC-0", "CC-BY")))
    assert image_ids(out) == expected(archive, licenses=("CC-0", "CC-BY"))
    assert {r["copyright_license"] for r in metadata_rows(out)} == {"CC-0", "CC-BY"}


def test_indeterminate_images_are_fetched_only_when_asked(archive, tmp_path):
    fetch(tmp_path / "default", config(archive))
    fetch(tmp_path / "asked", config(archive, include_indeterminate=True))
    assert not image_ids(tmp_path / "default") & {"ISIC_0000003", "ISIC_0000014"}
    assert image_ids(tmp_path / "asked") == expected(
        archive, diagnoses=("Benign", "Malignant", "Indeterminate")
    )
    assert read_real_folder(tmp_path / "asked")["ISIC_0000003"].label is None


def test_only_dermoscopic_images_by_default(archive, tmp_path):
    fetch(tmp_path / "default", config(archive))
    fetch(tmp_path / "any", config(archive, image_type=""))
    assert not image_ids(tmp_path / "default") & {"ISIC_0000007", "ISIC_0000020"}
    assert image_ids(tmp_path / "any") == expected(archive, image_types=("dermoscopic", "clinical: close-up"))


def test_user_query_and_collections_narrow_the_selection(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, query="sex:male", collections=(1,)))
    males_in_collection = {i for i in expected(archive) if 1 in archive.by_id[i].collections}
    assert image_ids(out) == males_in_collection


def test_query_the_archive_refuses_is_a_clear_error(archive, tmp_path):
    with pytest.raises(StdaError, match=r"HTTP 400.*--query"):
        fetch(tmp_path / "real", config(archive, query="age_approx:[30 TO"))


# ----------------------------------------------------------------------------------------------------------------
# Faults


def test_fetch_with_every_fault_ends_with_exactly_the_expected_files(archive, tmp_path):
    ids = sorted(expected(archive))
    corrupt_id, expired_id = ids[5], ids[6]
    archive.by_id[corrupt_id].data = corrupt(archive.by_id[corrupt_id].data)
    archive.by_id[expired_id].public = False
    archive.expired_ids.add(expired_id)
    archive.fault("search", "429", "500")
    archive.fault(f"file:{ids[0]}", "429")
    archive.fault(f"file:{ids[1]}", "500", "503")
    archive.fault(f"file:{ids[2]}", "slow")
    archive.fault(f"file:{ids[3]}", "truncate")
    archive.fault(f"file:{ids[4]}", "short")
    archive.extra_records.append(
        {**archive.record(archive.by_id[ids[7]], fresh=True), "isic_id": "../../evil"}
    )
    out = tmp_path / "real"

    result = fetch(out, config(archive, timeout=1.0, retries=4))

    good = set(ids) - {corrupt_id}
    assert image_ids(out) == good
    assert {r["isic_id"] for r in metadata_rows(out)} == good
    assert all(archive.deliveries[i] == 1 for i in good)
    assert set(result.skipped) == {corrupt_id, "../../evil"}
    assert json.loads((out / "fetch_skipped.json").read_text())["skipped"].keys() == {
        corrupt_id,
        "../../evil",
    }
    assert not (out / ".incoming").exists() and not list(out.rglob("*.part"))
    assert not [p for p in tmp_path.rglob("*evil*")]


def test_retry_after_is_honoured(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.retry_after = "7"
    archive.fault(f"file:{isic_id}", "429")
    sleep = RecordingSleep()
    cfg = config(archive, max_backoff=60.0)
    fetch(tmp_path / "real", cfg, client=IsicClient(cfg, sleep=sleep))
    assert sleep.calls == [7.0]
    assert archive.deliveries[isic_id] == 1


def test_retry_after_as_an_http_date_is_read_as_seconds_from_now():
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30.0
    assert retry_after_seconds("3", now=now) == 3.0
    assert retry_after_seconds("soon", now=now) is None


def test_server_errors_are_retried_with_exponential_backoff_and_jitter(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.fault(f"file:{isic_id}", "500", "500", "500")
    sleep = RecordingSleep()
    cfg = config(archive, backoff=1.0, max_backoff=60.0, retries=3)
    fetch(tmp_path / "real", cfg, client=IsicClient(cfg, sleep=sleep))
    assert len(sleep.calls) == 3
    for attempt, delay in enumerate(sleep.calls):
        assert 2**attempt / 2 <= delay <= 2**attempt
    assert archive.deliveries[isic_id] == 1


def test_backoff_never_exceeds_its_cap():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(n, 1.0, 10.0, rng) for n in range(20)]
    assert all(0.5 <= d <= 10.0 for d in delays) and max(delays) > 5.0


@pytest.mark.parametrize("fault", ["truncate", "short", "500", "503", "slow"])
def test_broken_transfer_is_retried_and_the_kept_file_is_complete(archive, tmp_path, fault):
    isic_id = sorted(expected(archive))[0]
    archive.fault(f"file:{isic_id}", fault)
    out = tmp_path / "real"
    fetch(out, config(archive, timeout=1.0))
    assert (out / "images" / f"{isic_id}.jpg").read_bytes() == archive.served(archive.by_id[isic_id])
    assert archive.count("file", isic_id) >= 2 or fault == "slow"
    assert image_ids(out) == expected(archive)


def test_file_that_keeps_failing_is_skipped_and_retried_on_the_next_run(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.fault(f"file:{isic_id}", *["500"] * 4)
    out = tmp_path / "real"
    first = fetch(out, config(archive, retries=3))
    assert isic_id in first.skipped and isic_id not in image_ids(out)
    second = fetch(out, config(archive, retries=3))
    assert second.downloaded == 1 and image_ids(out) == expected(archive)


def test_corrupt_jpeg_is_skipped_reported_and_not_kept(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.by_id[isic_id].data = corrupt(archive.by_id[isic_id].data)
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert "not a usable image" in result.skipped[isic_id]
    assert isic_id not in image_ids(out)
    assert isic_id not in {r["isic_id"] for r in metadata_rows(out)}
    assert not list((out / "images").glob(f"*{isic_id}*")) and not (out / ".incoming").exists()


def test_expired_url_of_a_private_image_is_refreshed_from_the_image_record(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.by_id[isic_id].public = False
    archive.expired_ids.add(isic_id)
    fetch(tmp_path / "real", config(archive))
    assert archive.count("file", isic_id, status=403) == 1
    assert archive.count("image", isic_id) == 1
    assert archive.deliveries[isic_id] == 1


@pytest.mark.parametrize(
    "bad_id", ["../../evil", "ISIC_0000001/../../evil", "ISIC_1234567\n", "ISIC_123456", "<absolute>", None]
)
def test_malicious_id_is_refused_before_any_path_is_built(archive, tmp_path, bad_id):
    if bad_id == "<absolute>":
        bad_id = str(tmp_path / "outside" / "evil")
    victim = sorted(expected(archive))[0]
    archive.extra_records.append({**archive.record(archive.by_id[victim], fresh=True), "isic_id": bad_id})
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert "not 'ISIC_' plus seven digits" in result.skipped[str(bad_id)]
    assert archive.deliveries[victim] == 1  # only its own, legitimate record was downloaded
    assert image_ids(out) == expected(archive)
    assert not [p for p in tmp_path.rglob("*evil*")]


def test_signed_urls_never_reach_files_or_logs(archive, tmp_path, caplog):
    caplog.set_level("DEBUG")
    caplog.set_level("DEBUG", logger="urllib3")  # an in-process `stda train` earlier may have quietened it
    isic_id = sorted(expected(archive))[0]
    archive.by_id[isic_id].public = False
    archive.expired_ids.add(isic_id)
    archive.fault(f"file:{isic_id}", "500")
    out = tmp_path / "real"
    fetch(out, config(archive))
    assert "/s3/" in caplog.text  # the requests were logged, without their query strings
    for secret in ("Signature", "SIG", "AKIATESTKEY", "Expires="):
        assert secret not in caplog.text
        assert not [p for p in all_files(out) if secret.encode() in p.read_bytes()]


def test_unreachable_api_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = FetchConfig(api_url=f"http://127.0.0.1:{port}/api/v2/", retries=1, backoff=0.0, max_backoff=0.0)
    with pytest.raises(StdaError, match=r"could not reach the ISIC Archive.*re-run"):
        fetch(tmp_path / "real", cfg)


# ----------------------------------------------------------------------------------------------------------------
# Resume


CHILD_FETCH = (
    "import sys; from stda_hf.fetch.stage import FetchConfig, fetch; "
    "fetch(sys.argv[1], FetchConfig(api_url=sys.argv[2], workers=2, page_size=5, backoff=0.01, max_backoff=0.05, "
    "file_hosts=(sys.argv[3],)))"
)


def start_fetch_process(
    archive: FakeIsicArchive, out: Path, *cli_flags: str, cli: bool = False
) -> subprocess.Popen:
    """A fetch in a child process (``stda fetch`` with ``cli``, else the stage function, which starts faster),
    with the four first benign images free and every other file held."""
    oldest_first = sorted(archive.images, key=lambda im: im.created)
    order = [im.isic_id for im in oldest_first if im.isic_id in expected(archive, diagnoses=("Benign",))]
    for isic_id in expected(archive) - set(order[:4]):
        archive.fault(f"file:{isic_id}", "hold")
    if cli:
        cmd = [sys.executable, "-m", "stda_hf.cli", "fetch", "--out", str(out), "--api-url", archive.api_url]
        cmd += ["--file-hosts", archive.storage]
        cmd += [
            "--workers",
            "2",
            "--page-size",
            "5",
            "--backoff",
            "0.01",
            "--max-backoff",
            "0.05",
            *cli_flags,
        ]
    else:
        cmd = [sys.executable, "-c", CHILD_FETCH, str(out), archive.api_url, archive.storage]
    env = {**os.environ, "STDA_NO_PROGRESS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(out: Path, n: int, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (
        (out / "metadata.csv").exists() and len(metadata_rows(out)) >= n
    ):
        time.sleep(0.05)
    return len(metadata_rows(out)) if (out / "metadata.csv").exists() else 0


def test_killed_fetch_resumes_without_fetching_anything_twice(archive, tmp_path):
    out = tmp_path / "real"
    proc = start_fetch_process(archive, out)
    try:
        assert wait_for_rows(out, 4) == 4, "the first run should finish the four images that are not held"
    finally:
        proc.kill()
        proc.communicate()
    archive.faults.clear()
    archive.release.set()

    result = fetch(out, config(archive))

    assert image_ids(out) == expected(archive)
    assert sorted(r["isic_id"] for r in metadata_rows(out)) == sorted(expected(archive))
    assert all(archive.deliveries[i] == 1 for i in expected(archive))
    assert result.downloaded + result.adopted == len(expected(archive)) - 4


@pytest.mark.slow  # ~8 s idle, ~20 s on a loaded machine: `stda` imports every stage (torch) before parsing
def test_ctrl_c_exits_130_and_leaves_a_usable_folder(archive, tmp_path):
    out = tmp_path / "real"
    # held files time out after 2 s and are retried (up to 100 times, stopped by the Ctrl-C), so the fetch cannot
    # finish on its own before the signal, however slowly the first four rows come on a busy machine
    proc = start_fetch_process(archive, out, "--timeout", "2", "--retries", "100", cli=True)
    try:
        assert wait_for_rows(out, 4) == 4
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        archive.release.set()
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    finished = {im.isic_id for im in read_real_folder(out).images}
    assert len(finished) == 4
    assert all(f"| {i} |" in (out / "ATTRIBUTION.md").read_text(encoding="utf-8") for i in finished)


def test_torn_last_row_is_repaired_and_its_image_kept_without_download(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    text = (out / "metadata.csv").read_text(encoding="utf-8")
    (out / "metadata.csv").write_text(text[: text.rstrip("\n").rfind("\n") + 20], encoding="utf-8")

    result = fetch(out, config(archive))

    assert result.adopted == 1 and result.downloaded == 0
    assert sorted(r["isic_id"] for r in metadata_rows(out)) == sorted(expected(archive))
    assert all(archive.deliveries[i] == 1 for i in expected(archive))


def test_row_whose_image_was_deleted_is_fetched_again_once(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    isic_id = sorted(expected(archive))[0]
    (out / "images" / f"{isic_id}.jpg").unlink()

    result = fetch(out, config(archive))

    assert result.downloaded == 1 and archive.deliveries[isic_id] == 2
    assert [r["isic_id"] for r in metadata_rows(out)].count(isic_id) == 1


def test_raising_the_limit_downloads_only_the_new_images(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, limit=2))
    result = fetch(out, config(archive, limit=4))
    assert result.per_class == {"benign": 4, "malignant": 4} and result.downloaded == 4
    assert sum(archive.deliveries.values()) == 8 and set(archive.deliveries.values()) == {1}


def test_another_selection_in_the_same_folder_is_refused(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, limit=1))
    with pytest.raises(StdaError, match=r"another selection \(licenses"):
        fetch(out, config(archive, limit=1, licenses=("CC-0",)))


def test_folder_another_tool_wrote_is_refused(archive, phantom_real):
    with pytest.raises(StdaError, match="did not write"):
        fetch(phantom_real, config(archive))


def test_second_fetch_into_the_same_folder_at_once_is_refused(archive, tmp_path):
    import fcntl

    out = tmp_path / "real"
    out.mkdir()
    with open(out / ".fetch.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StdaError, match="another `stda fetch` is writing"):
            fetch(out, config(archive))


# ----------------------------------------------------------------------------------------------------------------
# Dry run, settings and the command line


@pytest.mark.parametrize("facets", [True, False], ids=["facets", "paging"])
def test_dry_run_counts_per_class_and_licence_without_downloading(archive, facets, monkeypatch):
    monkeypatch.setattr("stda_hf.fetch.stage.DRY_RUN_PAGING_MAX", 0)  # a large class: facets when offered
    archive.facets_enabled = facets
    report = dry_run(config(archive))
    for name in ("benign", "malignant"):
        ids = expected(archive, diagnoses=(name.capitalize(),))
        want = {lic: sum(archive.by_id[i].copyright_license == lic for i in ids) for lic in LICENSES}
        assert report.counts[name] == {k: v for k, v in want.items() if v}
        assert report.totals[name] == len(ids)
    assert report.method == ("facets" if facets else "paging")
    assert archive.count("file") == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("page_size", 101),
        ("licenses", ("CC-BY-SA",)),
        ("api_url", "ftp://example.org/"),
        ("workers", 0),
        ("limit", -1),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(setting, value):
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(StdaError, match=flag):
        FetchConfig(**{setting: value})


def test_cli_fetch_then_dry_run(archive, tmp_path, capsys):
    out = tmp_path / "real"
    common = ["--api-url", archive.api_url, "--page-size", "5", "--backoff", "0.01", "--max-backoff", "0.05"]
    common += ["--file-hosts", archive.storage]
    assert main(["fetch", "--out", str(out), "--limit", "2", *common]) == 0
    assert "benign 2, malignant 2 images on disk" in capsys.readouterr().out
    before = (out / "metadata.csv").read_bytes()
    assert main(["fetch", "--dry-run", "--out", str(out), "--limit", "3", *common]) == 0
    assert (out / "metadata.csv").read_bytes() == before
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["class", *LICENSES, "total", "to", "fetch"]
    assert table.splitlines()[1].split()[-1] == "1"  # limit 3 with 2 on disk: one benign image to fetch
    assert len(image_ids(out)) == 4


def test_dry_run_on_a_folder_of_another_selection_says_so_instead_of_subtracting(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, limit=2))
    report = dry_run(config(archive, licenses=("CC-0",)), out=out)
    assert report.on_disk == {} and "holds another selection (licenses" in report.format()
    assert dry_run(config(archive), out=out).on_disk == {"benign": 2, "malignant": 2}


def test_cli_fetch_without_out_says_what_is_missing(archive, capsys):
    assert main(["fetch", "--api-url", archive.api_url]) == 2
    assert "--out is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The real archive's behaviour


def test_served_jpeg_larger_than_its_stated_size_is_kept_with_both_sizes_recorded(archive, tmp_path):
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert not result.skipped
    for row in metadata_rows(out):
        im = archive.by_id[row["isic_id"]]
        assert int(row["file_size"]) > int(row["stated_size"]) == len(im.data)  # the embedded IPTC/XMP
        assert (out / "images" / f"{im.isic_id}.jpg").read_bytes() == archive.served(im)


def test_public_file_urls_are_unsigned_permanent_and_on_the_storage_host(archive):
    url = archive.record(archive.images[0], fresh=False)["files"]["full"]["url"]
    assert "?" not in url and url.startswith(f"{archive.storage}/images/") and archive.storage != archive.base


def test_orphan_file_whose_digest_was_not_journalled_is_downloaded_again(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    text = (out / "metadata.csv").read_text(encoding="utf-8")
    last = text.rstrip("\n").rsplit("\n", 1)[1].split(",", 1)[0]
    (out / "metadata.csv").write_text(text.rstrip("\n").rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    (out / ".fetch_digests.jsonl").write_text("", encoding="utf-8")

    result = fetch(out, config(archive))

    assert result.adopted == 0 and result.downloaded == 1 and archive.deliveries[last] == 2


def test_limit_takes_the_oldest_images_of_each_class(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, limit=3))
    oldest = set()
    for diagnosis in ("Benign", "Malignant"):
        ids = sorted(expected(archive, diagnoses=(diagnosis,)), key=lambda i: archive.by_id[i].created)
        oldest |= set(ids[:3])
    lowest_ids = {i for d in ("Benign", "Malignant") for i in sorted(expected(archive, diagnoses=(d,)))[:3]}
    assert image_ids(out) == oldest != lowest_ids


def test_random_sample_is_seeded_and_a_larger_limit_keeps_the_smaller_sample(archive, tmp_path):
    fetch(tmp_path / "a", config(archive, limit=2, sample="random", seed=1))
    fetch(tmp_path / "b", config(archive, limit=2, sample="random", seed=1))
    fetch(tmp_path / "c", config(archive, limit=2, sample="random", seed=2))
    assert image_ids(tmp_path / "a") == image_ids(tmp_path / "b") != image_ids(tmp_path / "c")
    small = image_ids(tmp_path / "a")
    fetch(tmp_path / "a", config(archive, limit=4, sample="random", seed=1))
    assert small < image_ids(tmp_path / "a") and len(image_ids(tmp_path / "a")) == 8


@pytest.mark.parametrize("collection", [99, 2], ids=["unknown", "private"])
def test_collection_the_archive_does_not_show_is_a_clear_error_naming_it(archive, tmp_path, collection):
    with pytest.raises(StdaError, match=rf"--collections {collection}: .*no public collection"):
        fetch(tmp_path / "real", config(archive, collections=(1, collection)))
    assert archive.count("file") == 0


def test_search_with_only_a_private_collection_silently_matches_nothing(archive):
    assert IsicClient(config(archive, collections=(2,))).count("") == 0


def test_query_grammar_of_the_archive(archive, tmp_path):
    out = tmp_path / "real"
    fetch(
        out,
        config(
            archive, query='age_approx:[40 TO *] sex:m* OR (anatom_site_general:"posterior torso" -sex:*)'
        ),
    )
    want = {
        i for i in expected(archive) if archive.by_id[i].clinical["age_approx"] >= 40 and i[-1] in "02468"
    }
    assert image_ids(out) == want


@pytest.mark.parametrize("query", ["NOT sex:male", "lesion_colour:red", "age_approx:[30 TO", "-(sex:male)"])
def test_query_the_archive_cannot_parse_is_a_clear_error(archive, tmp_path, query):
    with pytest.raises(StdaError, match=r"HTTP 400.*Could not parse search query.*--query"):
        fetch(tmp_path / "real", config(archive, query=query))


def test_later_search_pages_carry_no_count(archive):
    import requests

    first = requests.get(archive.api_url + "images/search/", params={"limit": 5}, timeout=5).json()
    second = requests.get(first["next"], timeout=5).json()
    assert first["count"] == len(archive.images) and second["count"] is None and len(second["results"]) == 5


def test_fetch_refuses_when_the_disk_lacks_the_space(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "stda_hf.fetch.stage.shutil.disk_usage", lambda path: type("Usage", (), {"free": 10_000})()
    )
    with pytest.raises(StdaError, match=r"need about .* only 10.0 KB is free"):
        fetch(tmp_path / "real", config(archive))
    assert archive.count("size") >= 1 and archive.count("file") == 0


def test_embedded_credit_is_the_attribution(archive, tmp_path):
    ids = sorted(expected(archive))
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    rows = {r["isic_id"]: r for r in metadata_rows(out)}
    credited = [i for i in ids if archive.by_id[i].credit]
    assert credited and result.credit_differs == len(credited)
    attribution = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for i in credited:
        assert rows[i]["attribution"] == rows[i]["embedded_credit"] == archive.by_id[i].credit
        assert rows[i]["api_attribution"] == archive.by_id[i].attribution
        assert archive.by_id[i].credit in attribution


def test_licences_folder_holds_a_title_and_url_per_licence(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive))
    text = (out / "LICENSES" / "cc-by-4.0.txt").read_text(encoding="utf-8")
    assert "Creative Commons Attribution 4.0 International" in text
    assert "https://creativecommons.org/licenses/by/4.0/legalcode" in text


def test_dry_run_counts_the_images_without_a_diagnosis(archive):
    for isic_id in ("ISIC_0000001", "ISIC_0000002"):
        del archive.by_id[isic_id].clinical["diagnosis_1"]
    assert dry_run(config(archive, licenses=tuple(LICENSES))).no_diagnosis == 2


def test_refused_ids_are_permanent_not_counted_and_not_re_run(archive, tmp_path):
    victim = sorted(expected(archive, diagnoses=("Benign",)))[0]
    archive.extra_records.append({**archive.record(archive.by_id[victim], fresh=True), "isic_id": "../evil"})
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert result.refused == {"../evil"} and "re-run the same command" not in result.format()
    assert "refused for good" in result.format()
    report = dry_run(config(archive), out=out)
    assert report.totals["benign"] == len(expected(archive, diagnoses=("Benign",)))
    archive.facets_enabled = False
    assert dry_run(config(archive)).totals["benign"] == len(expected(archive, diagnoses=("Benign",)))


# ----------------------------------------------------------------------------------------------------------------
# A hostile network: every misbehaviour ends in bounded time, skips only its file, keeps nothing wrong


def fetch_cli(archive: FakeIsicArchive, out: Path, capsys, *flags: str) -> tuple[int, str, str]:
    """``stda fetch`` in this process with the test settings; (exit status, stdout, stderr)."""
    capsys.readouterr()
    argv = ["fetch", "--out", str(out), "--api-url", archive.api_url, "--file-hosts", archive.storage]
    argv += ["--workers", "3", "--page-size", "5", "--timeout", "2", "--deadline", "5", "--retries", "3"]
    argv += ["--backoff", "0.01", "--max-backoff", "0.05", *flags]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def skipped_only(result, isic_id: str, kind: str, archive: FakeIsicArchive, out: Path) -> None:
    """``isic_id`` alone was skipped, for ``kind``; every other selected image is on disk, nothing else kept."""
    assert set(result.skipped) == {isic_id} and result.kinds == {kind: 1}
    assert image_ids(out) == expected(archive) - {isic_id}
    assert isic_id not in {r["isic_id"] for r in metadata_rows(out)}
    assert not (out / ".incoming").exists() and not list(out.rglob("*.part"))
    assert not result.complete and result.missing == 1


def test_faulted_archive_gives_the_whole_set_in_one_run_and_exit_0(archive, tmp_path, capsys):
    ids = sorted(expected(archive))
    archive.fault("search", "429", "500")
    faults = ["429", "500", "truncate", "short", "garble", "swap", "gzip", "redirect-self", "503", "html"]
    for isic_id, fault in zip(ids[: len(faults)], faults, strict=True):
        archive.fault(f"file:{isic_id}", fault)
    out = tmp_path / "real"
    code, printed, err = fetch_cli(archive, out, capsys)
    assert code == 0, err
    assert image_ids(out) == expected(archive)
    assert all((out / "images" / f"{i}.jpg").read_bytes() == archive.served(archive.by_id[i]) for i in ids)
    assert "incomplete" not in printed


def test_missing_images_exit_3_with_the_count_and_the_reasons_by_kind(archive, tmp_path, capsys):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "500")
    out = tmp_path / "real"
    code, printed, err = fetch_cli(archive, out, capsys)
    assert code == 3
    assert "1 selected image(s) are not on disk" in err and "1 transfer" in err and len(err.splitlines()) == 1
    assert "skipped by kind: 1 downloads that failed every try" in printed
    assert "bad or unreadable" not in printed + err


def test_fetch_help_documents_the_exit_codes(capsys):
    from stda_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(only="fetch").parse_args(["fetch", "--help"])
    text = capsys.readouterr().out
    for line in (
        "0    every selected image is on disk",
        "2    bad input",
        "3    incomplete",
        "130  interrupted",
    ):
        assert line in text


def test_failed_first_run_does_not_block_the_corrected_command(archive, tmp_path):
    out = tmp_path / "real"
    for wrong in (dict(query="age_approx:[30 TO"), dict(collections=(2,)), dict(licenses=("CC-0",))):
        if "licenses" in wrong:
            archive.always("search", "500")  # the archive is down: nothing was fetched
        with pytest.raises(StdaError):
            fetch(out, config(archive, retries=0, **wrong))
        archive.persistent.clear()
    result = fetch(out, config(archive))
    assert result.complete and image_ids(out) == expected(archive)


def test_another_selection_says_how_to_start_over(archive, tmp_path):
    out = tmp_path / "real"
    fetch(out, config(archive, limit=1))
    with pytest.raises(StdaError, match=r"start over in another --out \(or after deleting"):
        fetch(out, config(archive, limit=1, query="sex:male"))


def test_garbled_transfer_is_retried_in_the_same_run(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.fault(f"file:{isic_id}", "garble", "garble")
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert result.complete and archive.count("file", isic_id) == 3
    assert (out / "images" / f"{isic_id}.jpg").read_bytes() == archive.served(archive.by_id[isic_id])


def test_file_with_another_images_bytes_every_time_is_skipped_as_content(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "swap")
    out = tmp_path / "real"
    result = fetch(out, config(archive, retries=2))
    skipped_only(result, isic_id, "content", archive, out)
    assert "another image's bytes" in result.skipped[isic_id] and archive.count("file", isic_id) == 3


def test_file_whose_pixels_differ_from_its_record_is_skipped(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.by_id[isic_id].acquisition["pixels_x"] = 64
    out = tmp_path / "real"
    result = fetch(out, config(archive, retries=1))
    skipped_only(result, isic_id, "content", archive, out)
    assert "the file is 32x32 pixels, the record states 64x32" in result.skipped[isic_id]


def test_png_without_embedded_metadata_is_kept_at_its_stated_size(archive, tmp_path):
    import io

    from PIL import Image

    isic_id = sorted(expected(archive))[0]
    im = archive.by_id[isic_id]
    buffer = io.BytesIO()
    Image.open(io.BytesIO(im.data)).save(buffer, "PNG")
    im.data = buffer.getvalue()
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert result.complete and (out / "images" / f"{isic_id}.png").read_bytes() == im.data
    row = {r["isic_id"]: r for r in metadata_rows(out)}[isic_id]
    assert row["file_size"] == row["stated_size"] and row["embedded_license"] == ""


def test_more_restrictive_embedded_licence_wins_in_metadata_and_attribution(archive, tmp_path):
    isic_id = next(i for i in sorted(expected(archive)) if archive.by_id[i].copyright_license == "CC-BY")
    archive.by_id[isic_id].embedded_license = "CC-BY-NC"
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    row = {r["isic_id"]: r for r in metadata_rows(out)}[isic_id]
    assert (row["copyright_license"], row["api_license"], row["embedded_license"]) == (
        "CC-BY-NC",
        "CC-BY",
        "CC-BY-NC",
    )
    assert f"| {isic_id} | CC-BY-NC |" in (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert list(result.license_differs) == [isic_id] and "'CC-BY-NC' applies" in result.format()


def test_embedded_licence_outside_the_selection_refuses_the_file_for_good(archive, tmp_path):
    isic_id = next(i for i in sorted(expected(archive)) if archive.by_id[i].copyright_license == "CC-BY")
    archive.by_id[isic_id].embedded_license = "CC-BY-NC"
    out = tmp_path / "real"
    result = fetch(out, config(archive, licenses=("CC-0", "CC-BY")))
    assert result.refused == {isic_id} and result.kinds == {"licence": 1}
    assert isic_id not in image_ids(out) and result.complete
    assert "more restrictive than the API's 'CC-BY'" in result.skipped[isic_id]


def test_gzip_answer_is_inflated_under_the_cap_and_identity_was_asked(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.fault(f"file:{isic_id}", "gzip")
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    assert result.complete and archive.count("file", isic_id) == 1
    assert (out / "images" / f"{isic_id}.jpg").read_bytes() == archive.served(archive.by_id[isic_id])
    assert set(archive.encodings) == {"identity"}


def test_gzip_bomb_is_cut_at_the_cap_while_inflating(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "gzip-bomb")
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    skipped_only(result, isic_id, "too large", archive, out)
    assert archive.count("file", isic_id) == 1  # not retried


def test_huge_content_length_is_refused_before_reading(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "huge")
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    skipped_only(result, isic_id, "too large", archive, out)
    assert "announces 1000000000000000 bytes" in result.skipped[isic_id]
    assert archive.count("file", isic_id) == 1  # not retried


def test_endless_body_is_cut_at_the_cap_and_nothing_is_kept(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "endless")
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    skipped_only(result, isic_id, "too large", archive, out)
    assert f"cap of {len(archive.by_id[isic_id].data) + METADATA_MARGIN} bytes" in result.skipped[isic_id]


def test_longest_credit_the_archive_allows_fits_under_the_cap(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    im = archive.by_id[isic_id]
    im.credit = "\U0001f52c" * 200  # 200 characters (the archive's maximum), 800 bytes in UTF-8
    served = len(archive.served(im))
    assert served - len(im.data) == 3149 + 800 < METADATA_MARGIN  # the measured embedding, worst case
    out = tmp_path / "real"
    assert fetch(out, config(archive)).complete
    assert (out / "images" / f"{isic_id}.jpg").stat().st_size == served


def test_file_past_the_cap_is_skipped_as_too_large(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.by_id[isic_id].credit = "x" * METADATA_MARGIN  # the embedding alone now exceeds the margin
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    skipped_only(result, isic_id, "too large", archive, out)


def test_dripping_file_is_skipped_at_its_deadline(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "drip")
    out = tmp_path / "real"
    start = time.monotonic()
    result = fetch(out, config(archive, deadline=0.5, retries=1))
    assert time.monotonic() - start < 8
    skipped_only(result, isic_id, "transfer", archive, out)
    assert "longer than the 0.5 s deadline" in result.skipped[isic_id]


def test_stalled_body_is_skipped_after_the_read_timeout(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", "stall-body")
    out = tmp_path / "real"
    start = time.monotonic()
    result = fetch(out, config(archive, timeout=0.3, retries=1))
    assert time.monotonic() - start < 8
    skipped_only(result, isic_id, "transfer", archive, out)


def test_api_that_never_answers_is_an_error_after_timeout_times_tries(archive, tmp_path, caplog):
    archive.always("search", "stall")
    start = time.monotonic()
    with pytest.raises(StdaError, match="could not reach the ISIC Archive"):
        fetch(tmp_path / "real", config(archive, timeout=0.3, retries=2))
    assert time.monotonic() - start < 5
    assert "try 2 of 3" in caplog.text  # each retry is said, not silent


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("redirect-file", "file:///etc/passwd' is not an http(s) URL"),
        ("redirect-loop", "more than 5 redirects"),
        ("redirect-foreign", "a redirect to http://127.0.0.1:"),
        ("redirect-malformed", "Invalid IPv6 URL"),
    ],
)
def test_bad_redirect_skips_only_its_file(archive, tmp_path, fault, reason):
    isic_id = sorted(expected(archive))[0]
    archive.always(f"file:{isic_id}", fault)
    out = tmp_path / "real"
    result = fetch(out, config(archive))
    kind = "protocol" if fault in ("redirect-loop", "redirect-malformed") else "host"
    skipped_only(result, isic_id, kind, archive, out)
    assert reason in result.skipped[isic_id]
    assert archive.hosts["foreign"] == 0  # the other origin was never asked


def test_file_url_off_the_accepted_hosts_is_never_requested(archive, tmp_path):
    isic_id = sorted(expected(archive))[0]
    out = tmp_path / "real"
    result = fetch(out, config(archive, file_hosts=()))  # the storage host is no longer accepted
    assert isic_id in result.skipped and result.kinds == {"host": len(expected(archive))}
    assert archive.hosts["storage"] == 0 and not image_ids(out)


def test_the_archive_bucket_is_accepted_over_https_only(archive):
    client = IsicClient(config(archive))
    for url in ("https://isic-archive.s3.amazonaws.com/images/ISIC_0000001.jpg",
                "https://isic-archive.s3.us-east-1.amazonaws.com/images/ISIC_0000001.jpg"):  # fmt: skip
        assert client.accepts_file_url(url) is None
    for url in ("http://isic-archive.s3.amazonaws.com/images/x.jpg", "https://isic-archive.s3.evil.com/x.jpg",
                "https://evil-isic-archive.s3.amazonaws.com/x.jpg", archive.foreign + "/images/x.jpg"):  # fmt: skip
        assert client.accepts_file_url(url) is not None


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("int-next", r"'next' is int '12345', not a link or null"),
        ("foreign-next", r"'next' link .* leaves the search endpoint"),
        ("deep", r"nested too deep"),
        ("html", r"HTTP 200 with something that is not JSON \(<html>"),
        ("bad-cursor-next", r"refused its own next-page cursor \(HTTP 422"),
    ],
)
def test_bad_search_page_is_a_one_line_error(archive, tmp_path, fault, message):
    archive.fault("search", "ok", "ok", fault)  # the two count requests pass; the first page is bad
    with pytest.raises(StdaError, match=message) as err:
        fetch(tmp_path / "real", config(archive))
    assert "\n" not in str(err.value)
    assert archive.hosts["foreign"] == 0  # not followed
    assert archive.count("search") == 3 + (fault == "bad-cursor-next")  # the 422 is not retried


def test_search_ending_before_its_count_is_reported_and_incomplete(archive, tmp_path, capsys):
    archive.count_surplus = 1
    out = tmp_path / "real"
    code, printed, err = fetch_cli(archive, out, capsys)
    assert code == 3 and image_ids(out) == expected(archive)
    assert "2 selected image(s) are not on disk" in err
    assert "benign: the archive counted" in printed and "but its search listed only" in printed


def test_query_the_archive_refuses_names_the_query_sent(archive, tmp_path):
    with pytest.raises(StdaError, match=r"the query sent was .*age_approx:\[30 TO"):
        fetch(tmp_path / "real", config(archive, query="age_approx:[30 TO"))


def test_dry_run_prints_the_size_estimate_of_the_disk_check(archive):
    from stda_hf.fetch.stage import space_needed

    report = dry_run(config(archive))
    stated = sum(len(archive.by_id[i].data) for i in expected(archive))
    assert report.approx_bytes == stated + len(expected(archive)) * METADATA_MARGIN
    assert "to download (approximate" in report.format()
    with IsicClient(config(archive)) as client:
        todo = {"Benign": (1, 1)}
        assert space_needed(client, config(archive), todo) > 0


def test_dry_run_on_a_fresh_folder_counts_only_acceptable_records(archive, tmp_path):
    victim = sorted(expected(archive, diagnoses=("Benign",)))[0]
    archive.extra_records.append({**archive.record(archive.by_id[victim], fresh=True), "isic_id": "../evil"})
    report = dry_run(config(archive), out=tmp_path / "fresh")
    assert report.totals["benign"] == len(expected(archive, diagnoses=("Benign",)))
    assert report.refused["benign"] == 1


# ----------------------------------------------------------------------------------------------------------------
# The test server behaves as the real archive does where the client depends on it


def test_served_jpeg_grows_by_the_measured_embedding(archive):
    im = archive.by_id["ISIC_0000006"]  # one with a credit of its own
    assert len(archive.served(im)) - len(im.data) == 3149 + len(im.credit.encode("utf-8"))


def test_bad_cursor_is_422_as_the_archive_answers(archive):
    import requests

    answer = requests.get(archive.api_url + "images/search/", params={"cursor": "%%%"}, timeout=5)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_search_limit_is_clamped_as_the_archive_does(archive):
    import requests

    def page(limit: str) -> list:
        return requests.get(archive.api_url + "images/search/", params={"limit": limit}, timeout=5).json()[
            "results"
        ]

    assert len(page("0")) == len(archive.images) == len(page("500")) and page("-3") == []


@pytest.mark.slow  # a `stda fetch` child process: a few seconds to start
@pytest.mark.parametrize("stuck", ["file", "search"], ids=["dripping-files", "silent-api"])
def test_ctrl_c_ends_a_stuck_run_within_2_s(archive, tmp_path, stuck):
    if stuck == "file":
        for isic_id in expected(archive):
            archive.always(f"file:{isic_id}", "drip")  # one byte every 0.2 s: never a read timeout
    else:
        archive.fault("search", "ok", "ok")  # the counts come, then the first page never does
        archive.always("search", "stall")
    out = tmp_path / "real"
    cmd = [sys.executable, "-m", "stda_hf.cli", "fetch", "--out", str(out), "--api-url", archive.api_url]
    cmd += ["--file-hosts", archive.storage, "--workers", "2", "--timeout", "60", "--deadline", "600"]
    env = {**os.environ, "STDA_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        stuck_requests = 2 if stuck == "file" else 3  # both workers dripping; or the counts, then the page
        while archive.count(stuck) < stuck_requests and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the stuck reads
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    assert took < 2.0
    assert not image_ids(out)


def test_dry_run_total_is_what_the_pages_deliver_when_the_count_runs_ahead(archive):
    archive.count_surplus = 1
    report = dry_run(config(archive))
    assert report.totals["benign"] == len(expected(archive, diagnoses=("Benign",)))
