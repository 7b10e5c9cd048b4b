"""The `stda` command line: help for every stage, one-line errors, config files, and the first stages end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stda_hf.cli import build_parser, field_comments, main
from stda_hf.data.phantoms import PhantomConfig

ROOT = Path(__file__).resolve().parents[1]


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("phantoms", "split", "inspect", "demo"):
        assert name in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--debug" in out
    if command in ("phantoms", "split"):
        assert "(default:" in out


def test_field_comments_become_help():
    assert field_comments(PhantomConfig)["n"] == "number of images"


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["split", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stda split: error:") and "does not exist" in err[0]


def test_debug_shows_the_traceback(tmp_path):
    from stda_hf.core.errors import StdaError

    with pytest.raises(StdaError):
        main(["split", str(tmp_path / "missing"), "--debug"])


def test_bad_option_value_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["phantoms", "--out", "x", "--n", "many"])
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("n: 5\nsize: 32\nseed: 4\n")
    assert main(["phantoms", "--out", str(tmp_path / "real"), "--config", str(cfg), "--n", "6"]) == 0
    assert (tmp_path / "real" / "images" / "PHANTOM_0000006.jpg").exists()
    assert "seed: 4" in (tmp_path / "real" / "phantoms.yaml").read_text()
    cfg.write_text("n: 5\nsizes: 32\n")
    assert main(["phantoms", "--out", str(tmp_path / "r2"), "--config", str(cfg)]) == 2
    assert "unknown setting(s) ['sizes']" in capsys.readouterr().err


def test_phantoms_split_inspect_through_the_cli(tmp_path, capsys):
    real = tmp_path / "real"
    assert (
        main(["phantoms", "--out", str(real), "--n", "40", "--size", "32", "--artifact", "patch=0.5,0"]) == 0
    )
    assert main(["split", str(real), "--seed", "1"]) == 0
    assert main(["inspect", str(real)]) == 0
    out = capsys.readouterr().out
    assert "wrote 40 phantom images" in out and "validation" in out and "bad files:   0" in out
    assert "patch" in (real / "phantoms.yaml").read_text()


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "stda_hf", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "stda-hf" in result.stdout


def test_running_one_stage_imports_only_that_stage(tmp_path):
    code = (
        "import sys; from stda_hf.cli import main; "
        f"rc = main(['phantoms', '--out', {str(tmp_path / 'r')!r}, '--n', '2', '--size', '32']); "
        "print(rc, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["0", "False"]


def test_benchmark_is_a_subcommand_with_the_benchmark_settings_as_flags(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["benchmark", "--config", str(missing), "--folds", "3"]) == 2
    assert capsys.readouterr().err.strip() == f"stda benchmark: error: config file {missing} not found"


def test_the_benchmark_script_runs_the_same_subcommand(tmp_path):
    missing = tmp_path / "nope.yaml"
    script = [sys.executable, "benchmarks/stda_benchmark.py", "--config", str(missing)]
    proc = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and f"stda benchmark: error: config file {missing} not found" in proc.stderr


SIGNAL_SCRIPT = r"""
import sys, time
from pathlib import Path
from stda_hf.core.errors import run_reporting_errors

def work():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:  # what a stage keeps for its resume runs on the way out
        Path(sys.argv[1]).write_text("cleaned up")

sys.exit(run_reporting_errors("job", work))
"""


@pytest.mark.parametrize(
    ("signum", "status", "said"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]
)
def test_sigterm_stops_a_command_like_ctrl_c_with_its_clean_up(tmp_path, signum, status, said):
    """``kill`` or a batch scheduler's time limit sends SIGTERM: clean-up runs and the exit says how to resume."""
    import signal

    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, signum))
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status
    assert f"job: {said}" in err and "re-run the same command to resume" in err
    assert marker.read_text() == "cleaned up"


def test_sigterm_handler_is_restored_and_left_alone_off_the_main_thread():
    import signal
    import threading

    from stda_hf.core.errors import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def off_main():
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join()
    assert seen == [before]
