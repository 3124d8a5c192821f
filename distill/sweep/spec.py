"""The sweep file: its shape checked, its runs expanded and named, and values written as overrides.

Everything here is pure: a parsed YAML mapping in, a `SweepSpec`, the varied values of every run
and their names out. The keys themselves are checked later, when `distill.sweep.state` builds
every run's config.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import random as _random
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from distill.configtools import load_yaml
from distill.errors import ConfigError

SEED_KEY = "train.seed"
SECTIONS = ("name", "base", "overrides", "grid", "zip", "random", "seeds")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")


class SweepError(ConfigError):
    """A bad sweep file or a run whose config does not build; the message names the field and the fix."""


# ----------------------------------------------------------------------------- the sweep file

@dataclass(frozen=True)
class RandomAxis:
    """`random:`: `count` points, each drawing every key from its distribution, reproducible by `seed`."""

    count: int
    seed: int
    keys: dict[str, tuple[str, Any]]  # dotted key -> (distribution, its argument)


@dataclass(frozen=True)
class SweepSpec:
    """The sweep file as written, checked for shape (the keys are checked later, by building configs)."""

    name: str
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    zip: dict[str, list] = field(default_factory=dict)
    random: RandomAxis | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """The varied keys, in name order: grid, zip, random, then train.seed."""
        keys = [*self.grid, *self.zip, *(self.random.keys if self.random else {})]
        return tuple(keys + [SEED_KEY] if self.seeds is not None else keys)


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _mapping(raw, where: str, example: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise SweepError(f"{where}: expected a mapping of dotted keys, e.g. {example}")
    return dict(raw)


def _value_lists(raw, where: str, example: str) -> dict[str, list]:
    lists = _mapping(raw, where, example)
    for key, values in lists.items():
        if not isinstance(values, list):
            raise SweepError(f"{where}.{key}={values!r}: expected a list of values, e.g. {example}")
        if not values:
            raise SweepError(f"{where}.{key}: an empty list gives no runs; give at least one value")
    return lists


def _random_axis(raw) -> RandomAxis | None:
    if raw is None:
        return None
    example = "{count: 8, seed: 0, keys: {optim.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}}}"
    if not isinstance(raw, dict):
        raise SweepError(f"random: expected a mapping, e.g. {example}")
    for key in raw:
        if key not in ("count", "seed", "keys"):
            raise SweepError(f"random.{key}: unknown key.{suggest(str(key), ('count', 'seed', 'keys'))} "
                             "Known keys: count, keys, seed")
    count, seed = raw.get("count"), raw.get("seed", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SweepError(f"random.count={count!r}: the number of random points, an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepError(f"random.seed={seed!r}: an integer (the same seed draws the same points)")
    keys = {}
    for key, spec in _mapping(raw.get("keys"), "random.keys", example).items():
        where = f"random.keys.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SweepError(f"{where}={spec!r}: one of {{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, "
                             "{choice: [v1, v2, ...]}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise SweepError(f"{where}.choice={arg!r}: a non-empty list of values")
        else:
            if (not isinstance(arg, list) or len(arg) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
                raise SweepError(f"{where}.{kind}={arg!r}: two numbers [lo, hi] (write floats as 1.0e-3: "
                                 "YAML reads 1e-3 as a string)")
            if not arg[0] < arg[1]:
                raise SweepError(f"{where}.{kind}={arg!r}: needs lo < hi")
            if kind == "log_uniform" and arg[0] <= 0:
                raise SweepError(f"{where}.log_uniform={arg!r}: needs 0 < lo")
        keys[key] = (kind, arg)
    if not keys:
        raise SweepError(f"random.keys: at least one key to draw, e.g. {example}")
    return RandomAxis(count=count, seed=seed, keys=keys)


def _seeds(raw) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise SweepError(f"seeds={raw!r}: a non-empty list of integers (train.seed of each repeat), e.g. [0, 1, 2]")
    if len(set(raw)) != len(raw):
        raise SweepError(f"seeds={raw!r}: repeated seeds would be identical runs; list each seed once")
    return tuple(raw)


def parse_spec(raw, name: str) -> SweepSpec:
    """A `SweepSpec` from a parsed sweep file; `name` (the file stem) unless the file gives one."""
    if not isinstance(raw, dict):
        raise SweepError(f"the sweep file: expected a mapping with {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise SweepError(f"{key}: unknown key of the sweep file.{suggest(str(key), SECTIONS)} "
                             f"Known keys: {', '.join(SECTIONS)}")
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise SweepError("base: required, the path of the run config every run starts from, "
                         "e.g. base: experiments/quickstart.yaml")
    zipped = _value_lists(raw.get("zip"), "zip", "{optim.learning_rate: [1.0e-3, 3.0e-3], optim.warmup_steps: [20, 50]}")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError("zip: the lists must have equal lengths (the i-th values go together), got "
                         + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    spec = SweepSpec(
        name=str(raw.get("name") or name), base=base,
        overrides=_mapping(raw.get("overrides"), "overrides", "{train.steps: 400}"),
        grid=_value_lists(raw.get("grid"), "grid", "{loss.temperature: [1.0, 2.0]}"),
        zip=zipped, random=_random_axis(raw.get("random")), seeds=_seeds(raw.get("seeds")))
    _check_keys(spec)
    return spec


def _check_keys(spec: SweepSpec) -> None:
    if not spec.axes:
        raise SweepError("the sweep varies nothing: give grid, zip, random or seeds")
    owner: dict[str, str] = {}
    sections = [("overrides", spec.overrides), ("grid", spec.grid), ("zip", spec.zip),
                ("random.keys", spec.random.keys if spec.random else {}),
                ("seeds", {SEED_KEY: None} if spec.seeds is not None else {})]
    for section, keys in sections:
        for key in keys:
            if key == "run.dir":
                raise SweepError(f"{section}.run.dir: the sweep sets each run's directory (OUT/<name>); "
                                 "use --dir OUT to place the sweep")
            if key in owner:
                fix = "; drop seeds or the key" if SEED_KEY == key else ""
                raise SweepError(f"{key}: given in both {owner[key]} and {section}; give it once{fix}")
            owner[key] = section


# ----------------------------------------------------------------------------- expansion and names

def draw_random(axis: RandomAxis) -> list[dict[str, Any]]:
    """`axis.count` points; floats are rounded to 4 significant digits (kept inside [lo, hi])."""
    rng = _random.Random(axis.seed)
    points = []
    for _ in range(axis.count):
        point = {}
        for key, (kind, arg) in axis.keys.items():
            if kind == "choice":
                point[key] = rng.choice(arg)
                continue
            lo, hi = float(arg[0]), float(arg[1])
            x = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
            point[key] = min(max(float(f"{x:.4g}"), lo), hi)
        points.append(point)
    return points


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The varied values of every run, in run order: seeds outermost (so a partly done sweep already
    covers every configuration at the first seed), then grid (last key fastest), zip, random."""
    grid = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    length = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zipped = [{key: values[i] for key, values in spec.zip.items()} for i in range(length)]
    drawn = draw_random(spec.random) if spec.random else [{}]
    configs = [{**g, **z, **r} for g in grid for z in zipped for r in drawn]
    if spec.seeds is None:
        return configs
    return [{**c, SEED_KEY: seed} for seed in spec.seeds for c in configs]


def format_value(value: Any) -> str:
    """`value` as YAML text that reads back to the same value (how an override is written)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        text = f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text  # PyYAML wants 1.0e-05
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, str):
        text = value if value and value == value.strip() and _reads_back(value, value) else json.dumps(value)
    else:
        text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    if not _reads_back(text, value):
        raise SweepError(f"value {value!r}: cannot be written as a command-line override; use a plain "
                         "number, string, boolean, list or mapping")
    return text


def _reads_back(text: str, value: Any) -> bool:
    try:
        back = load_yaml(text)
    except yaml.YAMLError:
        return False
    same = back == value or (isinstance(value, float) and math.isnan(value) and isinstance(back, float) and math.isnan(back))
    return same and type(back) is type(value) if not isinstance(value, tuple) else back == list(value)


def short_names(keys) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares: `loss.temperature` -> `temperature`."""
    keys = list(keys)
    depth = dict.fromkeys(keys, 1)
    while True:
        suffix = {k: ".".join(k.split(".")[-depth[k]:]) for k in keys}
        clashes = [k for k in keys if list(suffix.values()).count(suffix[k]) > 1]
        if not clashes:
            return suffix
        for k in clashes:
            depth[k] += 1


def _safe(text: str) -> str:
    """Runs of characters other than letters, digits and `._+-` become one `-` (a leading minus sign stays)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", text)
    return (safe if text.startswith("-") else safe.lstrip("-")).rstrip("-") or "x"


def _digest(values: dict) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()[:6]


def run_names(points: list[dict[str, Any]], axes) -> list[str]:
    """A readable, filesystem-safe, unique name per run: `temperature-2.0_seed-1`."""
    short = short_names(axes)
    names = []
    for point in points:
        name = "_".join(f"{_safe(short[key])}-{_safe(format_value(point[key]))}" for key in axes) or "run"
        names.append(name if len(name) <= 120 else f"{name[:110]}_{_digest(point)}")
    for name in {n for n in names if names.count(n) > 1}:
        names = [f"{n}_{_digest(p)}" if n == name else n for n, p in zip(names, points)]
    return names
