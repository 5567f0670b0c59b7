"""The search space of ``python -m jemfast.tune``: which config fields are searched, over what.

A parameter is any ``jemfast.train`` flag, named without its dashes (``buffer_size``,
``sgld_steps``, ``lr``, ``hidden``, ...) or by its config field (``sampler.n_steps``). Its range is
``KIND:ARGS`` text (``--space NAME=KIND:ARGS``) or, in a ``--space-file``, also a list (a choice),
a mapping (``{type: loguniform, low: 0.1, high: 3}``, ``{choice: [...]}``, ``{grid: [...]}``) or a
single value (fixed, not searched). Each kind is Ray Tune's own search space of that name::

    choice:1000,2000,5000   tune.choice         grid:10,20,40     tune.grid_search
    uniform:0.01,0.1        tune.uniform        loguniform:0.1,3  tune.loguniform
    randint:10,40           tune.randint        lograndint:500,20000  tune.lograndint  (high exclusive)

Every value and bound is checked against the field's declaration in :mod:`jemfast.options.config` (its
type and bounds) and against the whole base configuration before Ray starts: a range that a
trial could not run is one line naming ``--space NAME`` and the flag's bound.

Defaults (centred on the dataset preset, or on the value a training flag such as
``--sgld-step-size`` sets): buffer_size choice of {1/4, 1/2, 1, 2} x base; reinit_freq
loguniform 0.01..0.2; sgld_step_size and sgld_noise loguniform base/4..base*4. A training flag
for one of these four (e.g. ``--buffer-size 500``) fixes it unless ``--space`` names it too.
"""
from __future__ import annotations

import json
from argparse import ArgumentTypeError
from pathlib import Path
from typing import Any, NamedTuple

from jemfast.options.config import FLAGS_BY_KEY, Config, check_value, field_kind
from jemfast.process.errors import UserError, one_line
from jemfast.options.schema import OptionError, parse_bool, show

NOT_SEARCHABLE = ("run.out", "run.resume", "run.overwrite", "run.progress")
NAMES = {flag[2:].replace("-", "_"): key for key, flag in FLAGS_BY_KEY.items() if key not in NOT_SEARCHABLE}
KEYS = {key: name for name, key in NAMES.items()}
CORE = ("sampler.buffer_size", "sampler.reinit_freq", "sampler.step_size", "sampler.noise_std")
# PBT perturbs these. sgld_steps is left out: a checkpoint carries the (possibly doubled by a
# recovery action) step count, which wins on resume by design. buffer_size changes the buffer's
# shape; the trainable resizes the checkpoint's buffer on restore (see restore.resize_buffer).
PBT_MUTABLE = (*CORE, "optim.lr")
TESTING_AIDS = ("stability.inject_divergence",)
RANGES = ("uniform", "loguniform", "randint", "lograndint")
KINDS = ("choice", "grid", *RANGES, "fixed")


class Range(NamedTuple):
    """One searched (or fixed) parameter: ``kind`` and its values ((low, high) for ranges)."""

    kind: str
    values: tuple

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    @property
    def log(self) -> bool:
        return self.kind.startswith("log")

    def to_tune(self) -> Any:
        """Ray Tune's search-space object (or the fixed value)."""
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def clamp(self, v: Any) -> Any:
        """``v`` moved inside a range (PBT perturbs by factors); choices are left alone."""
        if self.kind not in RANGES:
            return v
        lo, hi = self.values
        return min(max(v, lo), hi - 1 if self.kind.endswith("randint") else hi)

    def text(self) -> str:
        return show(self.values[0]) if self.kind == "fixed" else f"{self.kind}:{','.join(map(show, self.values))}"


def key_of(name: str) -> str:
    """The config field (dotted) a parameter name (``sgld_steps``, ``--sgld-steps``,
    ``sampler.n_steps``) sets. Raises ValueError."""
    if name in KEYS:
        return name
    key = NAMES.get(name.lstrip("-").replace("-", "_"))
    if key is None:
        raise ValueError(f"--space {one_line(repr(name), 60)}: unknown parameter; name a jemfast.train flag "
                         f"without its dashes, e.g. {', '.join(KEYS[k] for k in CORE)}, lr, sgld_steps")
    return key


def _token(key: str, text: str) -> Any:
    """A value of field ``key`` from text (numbers as int or float; the field checks them)."""
    kind = field_kind(key)
    if kind.base is bool:
        return parse_bool(text)
    if kind.base not in (int, float):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)  # "1e3", "0.5"; ValueError for "abc"; "1e400" -> inf (refused below)


def _split(raw: Any) -> tuple[str, list[Any]]:
    """(kind, raw values) of a range given as text, list, mapping or number."""
    if isinstance(raw, str):
        kind, sep, rest = raw.partition(":")
        if not sep:
            return "fixed", [raw.strip()]
        return kind.strip().lower(), [t.strip() for t in rest.split(",") if t.strip()]
    if isinstance(raw, (list, tuple)):
        return "choice", list(raw)
    if isinstance(raw, dict):
        for kind in ("choice", "grid"):
            if kind in raw:
                return kind, list(raw[kind])
        kind = str(raw.get("type", "")).lower()
        return kind, [raw["low"], raw["high"]] if "low" in raw or "high" in raw else [raw.get("value")]
    return "fixed", [raw]


def parse_range(name: str, raw: Any, base: Config | None = None) -> Range:
    """A checked :class:`Range` for parameter ``name`` from ``raw``. Raises ValueError
    ``--space NAME: ...`` (one line)."""
    key = key_of(name)
    label = f"--space {KEYS[key]}"
    try:
        kind, items = _split(raw)
        values = [_token(key, v) if isinstance(v, str) else v for v in items]
    except (KeyError, TypeError, ValueError, ArgumentTypeError) as exc:
        detail = str(exc) if str(exc).startswith("expected") else f"cannot read {show(raw)}"
        raise ValueError(f"{label}: {one_line(detail, 120)}") from None
    if kind not in KINDS:
        raise ValueError(f"{label}: kind {show(kind)} is not one of {', '.join(KINDS)}")
    if not values:
        raise ValueError(f"{label}: {kind} needs at least one value")
    if kind == "fixed" and len(values) != 1:
        raise ValueError(f"{label}: a fixed value is one value")
    if kind in RANGES and len(values) != 2:
        raise ValueError(f"{label}: {kind} needs low,high, got {len(values)} value(s)")
    if kind in RANGES and field_kind(key).base not in (int, float):
        raise ValueError(f"{label}: {kind} needs a numeric parameter; use choice:a,b")
    # each value (a range's ends: the largest integer of randint's exclusive high) is one the field takes
    ends = [values[0], values[1] - 1] if kind.endswith("randint") and is_number(values[1]) else values
    try:
        checked = [check_value(key, v) for v in ends]
        for v in checked if base is not None else ():
            base.with_overrides({key: v})  # and together with the rest of the configuration
    except OptionError as exc:
        where = f" ({FLAGS_BY_KEY[key]})" if exc.key == key else f" ({exc.label})"
        raise ValueError(f"{label}: {exc.problem}{where}") from None
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None
    if kind.endswith("randint"):
        checked[1] += 1
    if kind in RANGES:
        if not checked[0] < checked[1]:
            raise ValueError(f"{label}: {kind} needs low < high, got {show(checked[0])},{show(checked[1])}")
        if kind.startswith("log") and checked[0] <= 0:
            raise ValueError(f"{label}: {kind} needs low > 0, got {show(checked[0])}")
    return Range(kind, tuple(checked))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_space_file(path: str | Path) -> dict[str, Any]:
    """A ``{name: range}`` mapping from a .json, .yaml or .yml file. Raises UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--space-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError("--space-file: reading YAML needs pyyaml, part of the tune extra: "
                                "pip install 'jemfast[tune]' (or use a .json file)") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UserError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"--space-file {path}: not valid {path.suffix[1:] or 'JSON'} "
                        f"({one_line(str(exc) or type(exc).__name__, 160)})") from None
    if not isinstance(data, dict):
        raise UserError(f"--space-file {path}: expected a mapping of parameter name to range")
    return data


def default_space(base: Config) -> dict[str, Range]:
    """Default ranges of the four core parameters, centred on ``base``'s values."""
    s = base.sampler
    buf = sorted({max(base.optim.batch_size, int(round(s.buffer_size * f))) for f in (0.25, 0.5, 1, 2)})
    return {
        "sampler.buffer_size": Range("choice", tuple(b for b in buf if b <= 10_000_000)),
        "sampler.reinit_freq": Range("loguniform", (0.01, 0.2)),
        "sampler.step_size": Range("loguniform", (s.step_size / 4, s.step_size * 4))
        if s.step_size > 0 else Range("fixed", (0.0,)),
        "sampler.noise_std": Range("loguniform", (s.noise_std / 4, s.noise_std * 4))
        if s.noise_std > 0 else Range("fixed", (0.0,)),
    }


def build_space(base: Config, given: dict[str, Any], fixed_by_flag: set[str]) -> dict[str, Range]:
    """``{parameter name: Range}``: the defaults, less the core parameters a training flag fixed
    (dotted keys in ``fixed_by_flag``), overridden by the ``given`` ranges. Raises ValueError."""
    space = {key: r for key, r in default_space(base).items() if key not in fixed_by_flag}
    for name, raw in given.items():
        space[key_of(name)] = parse_range(name, raw, base)
    return {KEYS[key]: r for key, r in space.items()}


def space_to_json(space: dict[str, Range]) -> dict[str, Any]:
    return {name: [r.kind, list(r.values)] for name, r in space.items()}


def space_from_json(d: dict[str, Any]) -> dict[str, Range]:
    return {name: Range(kind, tuple(values)) for name, (kind, values) in d.items()}


def trial_overrides(space: dict[str, Range], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched ``params`` (by name) as dotted config overrides: kept inside their
    ranges and rounded for integer fields."""
    out = {}
    for name, v in params.items():
        key = key_of(name)
        v = space[name].clamp(v) if name in space else v
        out[key] = int(round(v)) if field_kind(key).base is int and is_number(v) else v
    return out
