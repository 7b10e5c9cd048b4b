"""Saved settings against the settings of now: the one guard every resumable stage runs first."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from stda_hf.core.config import changed_settings, describe_changes, read_settings
from stda_hf.core.errors import StdaError


def test_changed_settings_names_what_differs_in_the_order_of_now():
    saved = {"lr": 0.1, "epochs": 3, "seed": 0}
    now = {"seed": 1, "epochs": 3, "lr": 0.2}
    assert changed_settings(saved, now) == ["seed", "lr"]
    assert describe_changes(saved, now, ["lr"]) == "lr: 0.1 -> 0.2"


def test_settings_that_may_change_are_ignored():
    assert (
        changed_settings(
            {"epochs": 3, "resume": False}, {"epochs": 5, "resume": True}, ignore={"epochs", "resume"}
        )
        == []
    )


def test_a_setting_missing_from_an_older_file_counts_as_changed_only_when_asked():
    saved, now = {"lr": 0.1}, {"lr": 0.1, "new_option": 4}
    assert changed_settings(saved, now) == ["new_option"]
    assert changed_settings(saved, now, missing_is_change=False) == []


def test_only_the_given_keys_are_compared():
    assert changed_settings({"a": 1, "b": 1}, {"a": 2, "b": 2}, keys=["b"]) == ["b"]


def test_read_settings_is_none_without_a_file_and_refuses_broken_yaml(tmp_path):
    assert read_settings(tmp_path / "absent.yaml") is None
    (tmp_path / "ok.yaml").write_text("lr: 0.1\n")
    assert read_settings(tmp_path / "ok.yaml") == {"lr": 0.1}
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    with pytest.raises(StdaError, match=r"bad\.yaml is not valid YAML"):
        read_settings(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(StdaError, match=r"list\.yaml must hold a mapping"):
        read_settings(tmp_path / "list.yaml")


def test_an_optional_bool_field_becomes_a_yes_no_flag_that_defaults_to_unset():
    import argparse
    from dataclasses import dataclass

    from stda_hf.core.config import add_config_flags

    @dataclass
    class Settings:
        clamp: bool | None = None  # keep pixels in range

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    assert parser.parse_args([]).clamp is None
    assert parser.parse_args(["--clamp"]).clamp is True
    assert parser.parse_args(["--no-clamp"]).clamp is False


@dataclasses.dataclass
class Typed:
    n: int = 1  # a count
    rate: float = 0.5  # a fraction
    name: str = "x"  # a name
    flag: bool = False  # a switch
    layers: tuple[str, ...] = ()  # layer names
    limit: int | None = None  # optional bound
    mode: typing.Literal["fast", "exact"] = "fast"  # a choice


def _typed():
    return Typed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": "ten"}, r"setting n \(--n\): 'ten' is not an integer"),
        ({"n": True}, "True is not an integer"),
        ({"n": None}, "None is not an integer"),
        ({"rate": "abc"}, "'abc' is not a number"),
        ({"rate": float("inf")}, "inf is not a finite number"),
        ({"flag": "yes"}, "'yes' is not true or false"),
        ({"name": [1]}, r"\[1\] is not text"),
        ({"layers": [None, "a"]}, "is not a list of values that are each text"),
        ({"limit": "x"}, "'x' is not an integer"),
        ({"mode": "slow"}, r"'slow' is not one of \['fast', 'exact'\]"),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_setting_and_value(values, message):
    from stda_hf.core.config import check_types

    with pytest.raises(StdaError, match=message):
        check_types(_typed(), values)


def test_safe_conversions_of_typed_values():
    from stda_hf.core.config import check_types

    got = check_types(
        _typed(), {"rate": 1, "name": 2024, "layers": "conv1_1", "limit": None, "mode": "exact"}
    )
    assert got == {"rate": 1.0, "name": "2024", "layers": ("conv1_1",), "limit": None, "mode": "exact"}
    assert isinstance(got["rate"], float)


def test_a_config_file_value_of_the_wrong_type_names_the_file(tmp_path):
    from stda_hf.core.config import load_config

    (tmp_path / "c.yaml").write_text("n: many\n")
    with pytest.raises(StdaError, match=r"setting n in .*c\.yaml: 'many' is not an integer"):
        load_config(_typed(), tmp_path / "c.yaml")


@dataclasses.dataclass
class _Settings:
    lr: float = 0.1  # learning rate
    epochs: int = 3  # epochs


def test_a_setting_given_twice_in_a_config_file_is_refused_not_last_wins(tmp_path):
    from stda_hf.core.config import load_config

    (tmp_path / "cfg.yaml").write_text("lr: 0.1\nepochs: 3\nlr: 0.5\n")
    with pytest.raises(
        StdaError, match=r"cfg\.yaml is not valid YAML .*'lr' appears twice \(first on line 1"
    ):
        load_config(_Settings, tmp_path / "cfg.yaml")


def test_a_folder_given_as_config_is_named_as_a_folder_not_as_missing(tmp_path):
    from stda_hf.core.config import load_config

    (tmp_path / "cfg").mkdir()
    with pytest.raises(StdaError, match=r"config file .*cfg is a folder, not a regular file"):
        load_config(_Settings, tmp_path / "cfg")
    with pytest.raises(StdaError, match=r"config file .*absent\.yaml not found"):
        load_config(_Settings, tmp_path / "absent.yaml")


def test_saved_settings_with_a_key_twice_are_refused_with_how_to_recover(tmp_path):
    (tmp_path / "generate.yaml").write_text("size: 64\nsize: 128\n")
    with pytest.raises(StdaError, match=r"'size' appears twice.*delete it to start the folder afresh"):
        read_settings(tmp_path / "generate.yaml")


def test_a_usage_error_is_one_line_suggesting_the_dashed_spelling_of_a_flag(capsys):
    from stda_hf.core.config import OneLineParser, add_config_flags

    parser = OneLineParser(prog="train.py")
    add_config_flags(parser, _Settings)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--lr", "0.2", "--epoch_s", "4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "train.py: error: unrecognized arguments: --epoch_s 4 (did you mean --epoch_s -> --epochs?); "
        "see `train.py --help`\n"
    )
