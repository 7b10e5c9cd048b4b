"""Crash-safe writing: atomic replace, JSON lines that survive torn appends, disk-full errors."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from stda_hf.core import fileio, statefile
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import append_jsonl, atomic_write, read_jsonl, write_json, write_text


def test_atomic_write_keeps_old_file_when_block_fails(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write("new but unfinished")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_atomic_write_creates_parent_folders(tmp_path):
    write_text(tmp_path / "x" / "y" / "z.txt", "hello")
    assert (tmp_path / "x" / "y" / "z.txt").read_text() == "hello"


def test_write_json_is_byte_identical_for_equal_objects(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_disk_full_is_a_clear_error_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    write_text(target, "old")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(StdaError, match=r"no space left.*re-run the same command"):
        write_text(target, "new")
    assert target.read_text() == "old"


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "manifest.jsonl"
    for i in range(3):
        append_jsonl(path, {"id": i})
    assert read_jsonl(path) == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_torn_last_line_is_ignored_and_repaired_by_next_append(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_jsonl(path, {"id": 1})
    with open(path, "a") as fh:
        fh.write('{"id": 2, "fi')  # a crash mid-append
    assert read_jsonl(path) == [{"id": 1}]
    append_jsonl(path, {"id": 3})
    assert read_jsonl(path) == [{"id": 1}, {"id": 3}]
    assert path.read_text().count("\n") == 2


def test_corrupt_middle_line_names_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(StdaError, match="line 2"):
        read_jsonl(path)


def test_append_is_durable_line_by_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": "é"})
    assert path.read_bytes().endswith(b"\n")
    assert os.path.getsize(path) > 0


def test_atomic_files_get_the_usual_permissions(tmp_path):
    write_text(tmp_path / "card.md", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_csv_text_keeps_the_given_columns_in_order_and_leaves_missing_cells_empty():
    from stda_hf.core.fileio import csv_text

    rows = [{"b": 1, "a": "x,y"}, {"a": "z", "extra": "dropped"}]
    assert csv_text(rows, ("a", "b")) == 'a,b\n"x,y",1\nz,\n'
    assert csv_text(rows, ("a",), header=False) == '"x,y"\nz\n'
    assert csv_text(rows).splitlines()[0] == "b,a,extra"  # default: every key, in order of first appearance


def test_read_text_drops_a_bom_and_refuses_other_encodings(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfisic_id\n")
    assert fileio.read_text(tmp_path / "bom.txt") == "isic_id\n"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(StdaError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at position 3\)"):
        fileio.read_text(tmp_path / "latin1.txt")


def test_open_csv_reads_a_bom_header_and_refuses_latin1_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbfisic_id,x\na,1\n")
    with fileio.open_csv(path) as reader:
        assert [row["isic_id"] for row in reader] == ["a"]
    path.write_bytes(b"isic_id,x\na,caf\xe9\n")
    with pytest.raises(StdaError, match=r"m\.csv is not UTF-8 text"), fileio.open_csv(path) as reader:
        list(reader)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("real", "is \\(inside\\) the input"),
        ("real/images", "is \\(inside\\) the input"),
        (".", "holds the input"),
    ],
)
def test_check_separate_refuses_an_output_overlapping_an_input(tmp_path, out, message):
    (tmp_path / "real" / "images").mkdir(parents=True)
    with pytest.raises(StdaError, match=message):
        fileio.check_separate(tmp_path / out, {"input": tmp_path / "real"})
    fileio.check_separate(tmp_path / "synthetic", {"input": tmp_path / "real", "unused": None})


def test_make_dir_under_a_file_names_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StdaError, match="is a file, not a folder"):
        fileio.make_dir(tmp_path / "f")
    with pytest.raises(StdaError, match="f/sub"):
        fileio.make_dir(tmp_path / "f" / "sub")


def test_exclusive_refuses_a_second_holder_and_frees_the_folder_after(tmp_path):
    with fileio.exclusive(tmp_path / "out", ".x.lock", "busy: try later"):
        with (
            pytest.raises(StdaError, match="busy: try later"),
            fileio.exclusive(tmp_path / "out", ".x.lock", "busy: try later"),
        ):
            pass
    with fileio.exclusive(tmp_path / "out", ".x.lock", "busy"):
        pass


def test_a_read_only_file_system_is_one_clear_error(tmp_path, monkeypatch):
    """In-process (root ignores chmod): mkstemp fails as on a read-only mount."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    with pytest.raises(StdaError, match="the file system is read-only"):
        write_text(tmp_path / "x.txt", "x")
    with pytest.raises(StdaError, match="read-only"):
        fileio.check_writable(tmp_path)


def test_exclusive_removes_its_lock_file_and_an_output_folder_it_made_that_stayed_empty(tmp_path):
    with fileio.exclusive(tmp_path / "out", ".x.lock", "busy"):
        assert (tmp_path / "out" / ".x.lock").is_file()
    assert not (tmp_path / "out").exists()
    with fileio.exclusive(tmp_path / "out", ".x.lock", "busy") as out:
        (out / "result.txt").write_text("done")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result.txt"]


# ----------------------------------------------------------------------------------------------------------------
# Reading state files back (core/statefile)

RECORD = statefile.Fields(required={"id": str, "n": int}, optional={"score": float})


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("42", "line 2: expected a JSON object, found an integer 42"),
        ('"x"', 'line 2: expected a JSON object, found text "x"'),
        ("{}", "line 2: the field 'id' is missing"),
        ('{"id": "b", "n": true}', "line 2: the field 'n' is true or false true, not an integer"),
        ('{"id": "b", "n": 1, "score": "high"}', "line 2: the field 'score' is text \"high\", not a number"),
        ('{"id": "a", "n": 2}', "line 2: id 'a' appears twice (first on line 1)"),
    ],
)
def test_a_json_line_that_is_not_a_record_names_the_file_line_and_problem(tmp_path, line, needle):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "n": 1}\n' + line + '\n{"id": "c", "n": 3}\n')
    with pytest.raises(StdaError, match="fix it") as err:
        statefile.read_records(path, RECORD, key="id", recover="fix it")
    assert str(err.value).startswith(f"{path}, ") and needle in str(err.value)


def test_records_of_the_schema_are_read_and_integers_count_as_numbers(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "n": 1, "score": 2, "extra": null}\n\n{"id": "b", "n": 2}\n{"id": "c", "n"')
    assert [r["id"] for r in statefile.read_records(path, RECORD, key="id")] == [
        "a",
        "b",
    ]  # torn tail skipped


def test_a_bad_last_line_that_ends_in_a_newline_is_not_taken_for_a_torn_append(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "n": 1}\n{"id": \n')
    with pytest.raises(StdaError, match="line 2: not valid JSON"):
        statefile.read_records(path, RECORD)


def test_a_fifo_in_place_of_a_state_file_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "manifest.jsonl"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(
        StdaError, match=r"manifest\.jsonl is a FIFO \(named pipe\), not a regular file; redo"
    ):
        statefile.read_records(fifo, recover="redo")
    with pytest.raises(StdaError, match="is a FIFO"):
        statefile.read_json(fifo, default=None)
    with pytest.raises(StdaError, match="is a FIFO"):
        read_jsonl(fifo)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(StdaError, match=r"folder\.json is a folder, not a regular file"):
        statefile.read_json(tmp_path / "folder.json")


def test_corrupt_json_names_the_file_and_line_and_a_missing_one_gives_the_default(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text('{\n  "name": "arbitrary",\n  oops\n}\n')
    with pytest.raises(StdaError, match=r"engine\.json is not valid JSON \(line 3: .*\); delete it"):
        statefile.read_json(path)
    assert statefile.read_json(tmp_path / "absent.json", default=None) is None
    with pytest.raises(StdaError, match=r"absent\.json not found"):
        statefile.read_json(tmp_path / "absent.json")
    path.write_text("[1, 2]")
    with pytest.raises(StdaError, match="expected a JSON object, found a list"):
        statefile.read_json(path, statefile.Fields())


def test_a_key_given_twice_in_yaml_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("arms:\n  baseline: {}\n  stda: {mix: 0.5}\n  baseline: {mix: 0}\nseeds: [0]\n")
    with pytest.raises(StdaError, match=r"'baseline' appears twice \(first on line 2, again on line 4\)"):
        statefile.read_yaml(path)
    path.write_text("arms:\n  baseline: {}\n  stda: {mix: 0.5}\nseeds: [0]\n")
    assert statefile.read_yaml(path) == {"arms": {"baseline": {}, "stda": {"mix": 0.5}}, "seeds": [0]}


def test_a_manifest_record_pointing_at_another_image_is_refused(tmp_path):
    path = tmp_path / "manifest.jsonl"
    record = {"id": "syn_a", "file": "images/syn_b.jpg", "content_id": "c", "style_id": "s"}
    append_jsonl(path, record)
    with pytest.raises(StdaError, match=r"line 1: the file of syn_a is 'images/syn_b.jpg', not images/syn_a"):
        statefile.read_manifest(path)


def test_an_image_whose_bytes_changed_since_its_record_fails_the_digest_check(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "syn_a.jpg").write_bytes(b"the image generate wrote")
    record = {
        "id": "syn_a",
        "file": "images/syn_a.jpg",
        "sha256": hashlib.sha256(b"the image generate wrote").hexdigest(),
    }
    assert statefile.image_digest_problem(tmp_path, record) is None
    (tmp_path / "images" / "syn_a.jpg").write_bytes(b"another image")
    problem = statefile.image_digest_problem(tmp_path, record)
    assert problem is not None and "syn_a.jpg is not the image its manifest record (syn_a)" in problem
    old = {k: v for k, v in record.items() if k != "sha256"}  # written before digests were recorded
    assert statefile.image_digest_problem(tmp_path, old) is None
