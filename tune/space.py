"""The search space: which jemfast fields are searched, over what, and how they are written.

A parameter spec is a string or (in a YAML/JSON file) a mapping/list/number:

    choice:1000,2000,5000   {"choice": [1000, 2000, 5000]}   [1000, 2000, 5000]
    uniform:0.01,0.1        {"type": "uniform", "low": 0.01, "high": 0.1}
    loguniform:0.1,3        {"type": "loguniform", "low": 0.1, "high": 3}
    randint:10,40           (high exclusive, as in Ray Tune)
    lograndint:500,20000
    grid:10,20,40           every value, each with --num-samples trials
    2000                    a fixed value (the parameter is not searched)

Defaults (centred on the dataset preset, or on the value a training flag such as
``--sgld-step-size`` sets): buffer_size choice of {1/4, 1/2, 1, 2} x base; reinit_freq
loguniform 0.01..0.2; sgld_step_size and sgld_noise loguniform base/4..base*4. ``lr`` and
``sgld_steps`` are searched only when given a spec. A training flag for one of the four core
parameters (e.g. ``--buffer-size 500``) fixes it unless ``--space`` names it too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jemfast.config import FLAGS_BY_KEY, Config, set_dotted, validate
from jemfast.errors import UserError

# name -> config field. The matching `python -m jemfast.train` flag is looked up in FLAGS.
PARAMS: dict[str, str] = {
    "buffer_size": "sampler.buffer_size",
    "reinit_freq": "sampler.reinit_freq",
    "sgld_step_size": "sampler.step_size",
    "sgld_noise": "sampler.noise_std",
    "lr": "optim.lr",
    "sgld_steps": "sampler.n_steps",
    "inject_divergence": "stability.inject_divergence",  # testing aid (--smoke-test)
}
CORE = ("buffer_size", "reinit_freq", "sgld_step_size", "sgld_noise")
INT_PARAMS = ("buffer_size", "sgld_steps", "inject_divergence")
# PBT perturbs these. sgld_steps is left out: a checkpoint carries the (possibly doubled by a
# recovery action) step count, which wins on resume by design. buffer_size changes the buffer's
# shape; the trainable resizes the checkpoint's buffer on restore (see trainable.resize_buffer).
PBT_MUTABLE = ("buffer_size", "reinit_freq", "sgld_step_size", "sgld_noise", "lr")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint", "fixed")


def flag_for(key: str) -> str:
    """The ``jemfast.train`` flag that sets config field ``key``."""
    return FLAGS_BY_KEY[key]


@dataclass
class Spec:
    name: str
    kind: str
    values: tuple  # choice/grid/fixed: the values; ranges: (low, high)

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def bounds(self) -> tuple[float, float]:
        return (min(self.values), max(self.values))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Spec":
        return cls(d["name"], d["kind"], tuple(d["values"]))

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
                "lograndint": tune.lograndint}[self.kind](lo, hi)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.values[0]!r}"
        return f"{self.kind}:{','.join(repr(v) for v in self.values)}"


def _cast(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"space {name}: expected a number, got {value!r}")
    if name in INT_PARAMS:
        f = float(value)
        if f != int(f):
            raise ValueError(f"space {name}: expected an integer, got {value!r}")
        return int(f)
    return float(value)


def parse_spec(name: str, raw: Any) -> Spec:
    """A Spec from a string (``kind:a,b``/number) or a YAML/JSON value. Raises ValueError."""
    if name not in PARAMS:
        raise ValueError(f"space: unknown parameter {name!r}; known: {', '.join(PARAMS)}")
    try:
        if isinstance(raw, (list, tuple)):
            kind, values = "choice", list(raw)
        elif isinstance(raw, dict):
            if "choice" in raw or "grid" in raw:
                kind = "choice" if "choice" in raw else "grid"
                values = list(raw[kind])
            else:
                kind = str(raw.get("type", ""))
                values = [raw["low"], raw["high"]] if "low" in raw else [raw.get("value")]
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            kind, values = "fixed", [raw]
        elif isinstance(raw, str):
            if ":" in raw:
                kind, _, rest = raw.partition(":")
                values = [v for v in rest.replace(" ", "").split(",") if v]
            else:
                kind, values = "fixed", [raw]
        else:
            raise ValueError(f"cannot read {raw!r}")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        values = [_cast(name, v) for v in values]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"space {name}: cannot read {raw!r} ({exc})") from None
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith("space ") else f"space {name}: {msg}") from None
    if kind in ("choice", "grid") and not values:
        raise ValueError(f"space {name}: {kind} needs at least one value")
    if kind == "fixed" and len(values) != 1:
        raise ValueError(f"space {name}: a fixed value is one number")
    if kind in ("uniform", "loguniform", "randint", "lograndint"):
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"space {name}: {kind} needs low,high with low < high, got {values}")
        if kind.startswith("log") and values[0] <= 0:
            raise ValueError(f"space {name}: {kind} needs low > 0, got {values[0]}")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ValueError(f"space {name}: values must be finite, got {values}")
    return Spec(name, kind, tuple(values))


def read_space_file(path: str | Path) -> dict[str, Any]:
    """A ``{name: spec}`` mapping from a .json, .yaml or .yml file. Raises UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--space-file {path}: cannot read it ({exc.strerror or exc})") from None
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--space-file {path}: not valid {path.suffix[1:] or 'JSON'} ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"--space-file {path}: expected a mapping of parameter name to range")
    return data


def default_specs(base: Config) -> dict[str, Spec]:
    """Default ranges for the four core parameters, centred on ``base``'s values."""
    s = base.sampler
    buf = sorted({max(base.optim.batch_size, int(round(s.buffer_size * f))) for f in (0.25, 0.5, 1, 2)})
    return {
        "buffer_size": Spec("buffer_size", "choice", tuple(buf)),
        "reinit_freq": Spec("reinit_freq", "loguniform", (0.01, 0.2)),
        "sgld_step_size": Spec("sgld_step_size", "loguniform", (s.step_size / 4, s.step_size * 4)),
        "sgld_noise": Spec("sgld_noise", "loguniform", (s.noise_std / 4, s.noise_std * 4))
        if s.noise_std > 0 else Spec("sgld_noise", "fixed", (0.0,)),
    }


def build_specs(base: Config, given: dict[str, Any], fixed_by_flag: set[str]) -> dict[str, Spec]:
    """Defaults, minus core parameters fixed by a training flag, overridden by ``given`` specs;
    every value a spec can produce is checked with jemfast's ``validate`` (ValueError)."""
    specs = {n: sp for n, sp in default_specs(base).items() if n not in fixed_by_flag}
    for name, raw in given.items():
        specs[name] = parse_spec(name, raw)
    for sp in specs.values():
        for v in sp.values:
            probe = apply_values(Config.from_dict(base.to_dict()), {sp.name: v})
            validate(probe)
    return specs


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """Set searched ``values`` (by parameter name) on ``cfg`` in place."""
    for name, v in values.items():
        if name in PARAMS:
            set_dotted(cfg, PARAMS[name], int(round(v)) if name in INT_PARAMS else float(v))
    return cfg


def clamp(specs: dict[str, dict[str, Any]], values: dict[str, Any]) -> dict[str, Any]:
    """Keep PBT-perturbed values inside each range spec's [low, high] (choices are left alone)."""
    out = dict(values)
    for name, d in specs.items():
        sp = Spec.from_json(d)
        if name in out and sp.kind in ("uniform", "loguniform", "randint", "lograndint"):
            lo, hi = sp.bounds()
            if sp.kind.endswith("randint"):
                hi -= 1  # Ray Tune's integer ranges exclude high
            out[name] = min(max(out[name], lo), hi)
    return out
