"""Values on the command line and in config files reach the config as typed: YAML 1.2's booleans
(`on`, `off`, `yes`, `no` stay strings for the fields that take strings; bool fields read them) and
numbers such as `1e-3`."""

from __future__ import annotations

import dataclasses
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest

from distill.config import Config, build_config, load_config
from distill.configtools import from_dict, load_yaml, parse_override
from distill.errors import ConfigError
from distill.model.config import ModelConfig

WORDS = {"on": True, "off": False, "yes": True, "no": False, "On": True, "NO": False}


def annotated_fields(cls, prefix: str):
    """(dotted path, annotation) of every leaf field under dataclass `cls`; a list of dataclasses
    contributes its first item (`students.0.`)."""
    for name, tp in get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls) if f.init}:
            continue
        options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        nested = [o for o in options if dataclasses.is_dataclass(o)]
        items = [get_args(o)[0] for o in options if get_origin(o) is tuple and dataclasses.is_dataclass(get_args(o)[0])]
        if nested:
            yield from annotated_fields(nested[0], f"{prefix}{name}.")
        elif items:
            yield from annotated_fields(items[0], f"{prefix}{name}.0.")
        else:
            yield f"{prefix}{name}", options


def takes(options, kind) -> bool:
    return any(o is kind or (kind is str and get_origin(o) is Literal) for o in options)


CONFIG_FIELDS = list(annotated_fields(Config, ""))
STRING_FIELDS = [path for path, options in CONFIG_FIELDS if takes(options, str)]
BOOL_FIELDS = [path for path, options in CONFIG_FIELDS if takes(options, bool) and not takes(options, str)]
LITERALS = [(path, value) for path, options in CONFIG_FIELDS for o in options if get_origin(o) is Literal
            for value in get_args(o)]


def attribute(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
    return cfg


def test_the_walk_finds_the_fields_it_is_meant_to_check():
    assert {"mesh.distributed", "teacher.source", "run.name", "students.0.name"} <= set(STRING_FIELDS)
    assert {"teacher.trainable"} <= set(BOOL_FIELDS) and ("mesh.distributed", "on") in LITERALS


@pytest.mark.parametrize("word", ["on", "off", "yes", "no"])
@pytest.mark.parametrize("path", STRING_FIELDS)
def test_a_word_that_yaml_1_1_calls_boolean_reaches_a_string_field_as_typed(path, word):
    try:
        cfg = build_config({}, [f"{path}={word}"])
    except ConfigError as error:  # a value the field refuses: the message quotes what was typed
        assert f"{word!r}" in str(error) or word in str(error), str(error)
        assert "True" not in str(error) and "False" not in str(error), str(error)
    else:
        assert attribute(cfg, path) == word


@pytest.mark.parametrize("path,value", LITERALS)
def test_every_enum_value_on_the_command_line_is_taken(path, value):
    assert parse_override(f"{path}={value}") == (path, value)
    try:
        cfg = build_config({}, [f"{path}={value}"])
    except ConfigError as error:  # another field must change with it (e.g. a source needs a path)
        assert f"{path}={value!r}" not in str(error), str(error)
    else:
        assert attribute(cfg, path) == value


@pytest.mark.parametrize("path", BOOL_FIELDS)
@pytest.mark.parametrize("word", sorted(WORDS))
def test_a_bool_field_reads_on_off_yes_no(path, word):
    try:
        cfg = build_config({}, [f"{path}={word}"])
    except ConfigError as error:
        assert f"{path}=" not in str(error) or "expected true or false" not in str(error), str(error)
    else:
        assert attribute(cfg, path) is WORDS[word]


def test_a_bool_field_still_refuses_other_words():
    with pytest.raises(ConfigError, match=r"teacher.trainable='maybe': expected true or false"):
        build_config({}, ["teacher.trainable=maybe"])


@pytest.mark.parametrize("name,options", [(f.name, get_args(t)) for f in dataclasses.fields(ModelConfig)
                                          for t in [get_type_hints(ModelConfig)[f.name]]
                                          if get_origin(t) is Literal])
def test_the_model_enums_read_as_typed(name, options):
    for value in options:
        _, parsed = parse_override(f"teacher.model.{name}={value}")
        assert getattr(from_dict(ModelConfig, {name: parsed}), name) == value


def test_config_files_read_the_same_way(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("mesh: {distributed: on}\nteacher: {trainable: yes}\noptim: {learning_rate: 1e-3}\n")
    cfg = load_config(path)
    assert cfg.mesh.distributed == "on" and cfg.teacher.trainable is True and cfg.optim.learning_rate == 1e-3


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("-2E+4", -2e4), (".5", 0.5), ("3.", 3.0), ("5", 5),
                                        ("1_000", 1000), (".inf", float("inf")), ("true", True), ("FALSE", False),
                                        ("1e", "1e"), ("null", None)])
def test_numbers_and_booleans_follow_yaml_1_2(text, value):
    assert load_yaml(text) == value and type(load_yaml(text)) is type(value)


def test_a_learning_rate_in_exponent_form_is_a_number():
    assert load_config(None, ["optim.learning_rate=3e-4"]).optim.learning_rate == 3e-4
