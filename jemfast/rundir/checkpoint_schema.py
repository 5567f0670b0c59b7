"""The structure of a checkpoint, checked completely before any of it is used.

:func:`parse_checkpoint` takes what ``torch.load`` returned and gives back a clean checkpoint
dict (only the known keys, current format) or raises :class:`Corrupt` with the first reason.
What it checks:

- every key's type; numbers in range; config through ``Config.from_dict`` + ``validate``;
- model tensors: names, shapes and dtypes of a model built from the checkpoint's own config on
  the meta device (nothing allocated);
- optimizer state: per-parameter tensors shaped as the parameters, param groups' hyper-parameters;
- replay buffer data ``[buffer_size, *input_shape]`` floating point;
- RNG states: torch CPU uint8[N] (N that of this torch), numpy MT19937 int64[624], Python's
  ``random`` (3, 625 ints, gauss), each tried on a throw-away generator; the buffer's and
  sampler's kernel Philox states int64[2]; a data-parallel run's ``world`` (every rank's);
- sizes: every tensor dense (no stride-0 expanded views, storage as large as the tensor) and
  all tensors together no larger than the file, so nothing read from a small file can later be
  cloned or allocated into gigabytes. Config sizes (depth, n_classes, input shape) are bounded
  before the meta model is built.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch

from ..build import build_model
from ..options.config import Config, validate

MAX_CLASSES = 100_000
MAX_INPUT_NUMEL = 1 << 26  # elements of one input (e.g. 3 x 4096 x 4096 is 50M)
MAX_SGLD_STEPS = 1_000_000
MAX_STEPS_FACTOR = 1024
MAX_RESTARTS = 10_000
SEED_MULTIPLIER = 100_003  # train.py's epoch order seed is seed * 100_003 + epoch
OPTIMIZER_STATE = {"adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "sgd": ("momentum_buffer",)}
OPTIMIZER_GROUP = {"adam": ("lr", "betas", "eps", "weight_decay"),
                   "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}


from .checkpoint_values import MAX_INT, Corrupt, _kind, _name, shorten, _int, _num, _dict, _seq, _scalar, _Tensors  # noqa: F401  (shorten is used by checkpoint.py)


def parse_checkpoint(raw: dict[str, Any], file_bytes: int, max_format: int) -> dict[str, Any]:
    """The clean checkpoint in ``raw`` (a dict with an int ``format_version`` <= ``max_format``;
    ``file_bytes`` is the file's size). Raises :class:`Corrupt`."""
    version = raw["format_version"]
    need = ["config", "input_shape", "n_classes", "model", "optimizer", "buffer", "sampler", "rng",
            "step", "epoch", "batch_in_epoch", "best_valid_acc", "seed"]
    need += ["recovery"] if version >= 2 else ["scheduler"]
    _dict(raw, "the checkpoint", tuple(need))
    tensors = _Tensors(file_bytes)
    cfg = _config(raw["config"])
    shape, n_classes = _input_shape(raw["input_shape"]), _int(raw["n_classes"], "n_classes", 1, MAX_CLASSES)
    model_dict = _dict(raw["model"], "model")
    template, params = _model_template(cfg, shape, n_classes, len(model_dict))
    model = _model(model_dict, template, tensors)
    optimizer = _optimizer(raw["optimizer"], cfg.optim.optimizer, params, tensors)
    buffer = _buffer(raw["buffer"], cfg, shape, n_classes, tensors)
    sampler = _sampler(raw["sampler"], tensors)
    recovery = _recovery(raw, version, sampler["n_steps"], cfg.sampler.n_steps)
    progress = _progress(raw)
    clean = {
        "format_version": max_format, "jemfast_version": _version(raw.get("jemfast_version", "unknown")),
        "config": cfg.to_dict(), "input_shape": list(shape), "n_classes": n_classes, "model": model,
        "optimizer": optimizer, "buffer": buffer, "sampler": sampler, "recovery": recovery,
        "rng": _rng(raw["rng"], tensors), **progress,
    }
    if raw.get("world") is not None:
        clean["world"] = _world(raw["world"], tensors)
    return clean


def _version(x: Any) -> str:
    if type(x) is not str or len(x) > 100:
        raise Corrupt("jemfast_version is not a short string")
    return x


# ---- config and model ------------------------------------------------------------------------
def _config(x: Any) -> Config:
    """The run's Config: plain values only (a tensor or nested object would be converted before
    any check), then types and bounds as declared on the config's fields."""
    d = _dict(x, "config")
    if len(d) > len(dataclasses.fields(Config)):
        raise Corrupt(f"config has {len(d)} sections")
    for section, sub in d.items():
        sub = _dict(sub, f"config {_name(section)}")
        if len(sub) > 200:
            raise Corrupt(f"config {_name(section)} has {len(sub)} fields")
        for key, value in sub.items():
            items = value if isinstance(value, (list, tuple)) and len(value) <= 1000 else [value]
            if not all(v is None or type(v) in (bool, int, float, str) for v in items):
                raise Corrupt(f"config {_name(section)}.{_name(key)} is {_kind(value)}, not a plain value")
    try:
        return validate(Config.from_dict(d))
    except (ValueError, TypeError, OverflowError) as exc:
        raise Corrupt(f"config: {shorten(str(exc), 200)}") from None


def _input_shape(x: Any) -> tuple[int, ...]:
    dims = tuple(_int(d, "input_shape entry", 1, MAX_INPUT_NUMEL) for d in _seq(x, "input_shape", 3))
    if not dims or math.prod(dims) > MAX_INPUT_NUMEL:
        raise Corrupt(f"input_shape {list(dims)} is empty or larger than {MAX_INPUT_NUMEL} elements")
    return dims


def _model_template(cfg: Config, shape: tuple[int, ...], n_classes: int, n_entries: int
                    ) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], list[tuple[tuple[int, ...], torch.dtype]]]:
    """Shapes and dtypes of the state_dict and of the parameters (optimizer order) of the model
    the config describes, built on the meta device."""
    m = cfg.model
    if m.name == "wrn" and 12 * ((m.depth - 4) // 6) > n_entries:  # 3n blocks of >= 4 tensors each
        raise Corrupt(f"config model.depth {m.depth} needs more tensors than the file's model holds")
    try:
        with torch.device("meta"):
            model = build_model(cfg, shape, n_classes, torch.device("meta"))
    except (ValueError, RuntimeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Corrupt(f"the model in its config cannot be built ({shorten(first, 120)})") from None
    template = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return template, [(tuple(p.shape), p.dtype) for p in model.parameters()]


def _model(d: dict, template: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: _Tensors) -> dict:
    missing = [k for k in template if k not in d]
    unexpected = [k for k in d if k not in template]
    if missing or unexpected:
        parts = [f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({', '.join(_name(k) for k in unexpected[:3])})"] if unexpected else []
        raise Corrupt(f"model does not match its config: {'; '.join(parts)}")
    return {k: tensors(d[k], f"model tensor {k}", shape, dtype) for k, (shape, dtype) in template.items()}


# ---- optimizer and buffer --------------------------------------------------------------------
def _optimizer(x: Any, name: str, params: list[tuple[tuple[int, ...], torch.dtype]], tensors: _Tensors) -> dict:
    d = _dict(x, "optimizer", ("state", "param_groups"))
    n = len(params)
    groups = [_param_group(g, name, i, n) for i, g in enumerate(_seq(d["param_groups"], "optimizer param_groups", n))]
    ids = [i for g in groups for i in g["params"]]
    if sorted(ids) != list(range(len(params))):
        raise Corrupt(f"optimizer param_groups do not list the model's {len(params)} parameters once each")
    amsgrad = any(g.get("amsgrad") is True for g in groups)
    state = {}
    for pid, entry in _dict(d["state"], "optimizer state").items():
        if type(pid) is not int or not 0 <= pid < len(params):
            raise Corrupt(f"optimizer state has an entry for parameter {_name(pid)}, not one of the model's")
        state[pid] = _param_state(_dict(entry, f"optimizer state {pid}"), name, pid, params[pid], amsgrad, tensors)
    return {"state": state, "param_groups": groups}


def _param_group(g: Any, name: str, i: int, n_params: int) -> dict:
    where = f"optimizer param_group {i}"
    g = _dict(g, where, ("params", *OPTIMIZER_GROUP[name]))
    if len(g) > 64:
        raise Corrupt(f"{where} has {len(g)} keys")
    clean: dict[str, Any] = {}
    for key, value in g.items():
        if type(key) is not str:
            raise Corrupt(f"{where} has a key {_name(key)} that is not a string")
        if key == "params":
            clean[key] = [_int(p, f"{where} params entry", 0, MAX_INT) for p in _seq(value, f"{where} params", n_params)]
        elif key == "betas":
            betas = _seq(value, f"{where} betas", 2)
            if len(betas) != 2:
                raise Corrupt(f"{where} betas must be two numbers")
            clean[key] = tuple(_num(b, f"{where} betas", 0.0, 1.0) for b in betas)
        elif key in ("lr", "eps", "weight_decay", "momentum", "dampening", "initial_lr"):
            clean[key] = _num(value, f"{where} {key}", 0.0)
        elif key in ("nesterov", "amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay"):
            if type(value) is not bool:
                raise Corrupt(f"{where} {key} is {_kind(value)}, not a bool")
            clean[key] = value
        else:
            clean[key] = _scalar(value, f"{where} {key}")
    return clean


def _param_state(entry: dict, name: str, pid: int, param: tuple[tuple[int, ...], torch.dtype],
                 amsgrad: bool, tensors: _Tensors) -> dict:
    where = f"optimizer state {pid}"
    allowed = OPTIMIZER_STATE[name]
    for key in entry:
        if key not in allowed:
            raise Corrupt(f"{where} has an unknown key {_name(key)} for {name}")
    if name == "sgd":
        buf = entry.get("momentum_buffer")
        return {"momentum_buffer": None if buf is None else tensors(buf, f"{where} momentum_buffer", param[0], floating=True)}
    if not entry:
        return {}
    need = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    _dict(entry, where, need)
    step = entry["step"]
    if isinstance(step, torch.Tensor):
        step = tensors(step, f"{where} step", (), floating=True)
        _num(float(step.item()), f"{where} step", 0.0)
    else:
        step = torch.tensor(_num(step, f"{where} step", 0.0))
    clean = {"step": step}
    for key in need[1:]:
        clean[key] = tensors(entry[key], f"{where} {key}", param[0], floating=True)
    return clean


def _buffer(x: Any, cfg: Config, shape: tuple[int, ...], n_classes: int, tensors: _Tensors) -> dict:
    d = _dict(x, "buffer", ("data", "reinit_freq", "n_classes"))
    capacity = cfg.sampler.buffer_size
    data = tensors(d["data"], "buffer data", (capacity, *shape), floating=True)
    expected = n_classes if cfg.sampler.class_cond else -1
    if _int(d["n_classes"], "buffer n_classes", -1, MAX_CLASSES) != expected:
        raise Corrupt(f"buffer n_classes is {d['n_classes']}, expected {expected}")
    if cfg.sampler.class_cond and capacity < n_classes:
        raise Corrupt(f"buffer of {capacity} rows cannot hold {n_classes} classes")
    clean = {"data": data, "reinit_freq": _num(d["reinit_freq"], "buffer reinit_freq", 0.0, 1.0),
             "n_classes": expected}
    if d.get("kernel_rng_state") is not None:  # Philox (seed, offset) of the gather kernel
        clean["kernel_rng_state"] = tensors(d["kernel_rng_state"], "buffer kernel_rng_state", (2,), torch.int64)
    return clean


def _sampler(x: Any, tensors: _Tensors) -> dict:
    """SGLD state: ``n_steps`` and the fused/graph kernels' Philox (seed, offset), if any."""
    d = _dict(x, "sampler", ("n_steps",))
    rng = d.get("rng_state")
    return {"n_steps": _int(d["n_steps"], "sampler n_steps", 1, MAX_SGLD_STEPS),
            "rng_state": None if rng is None else tensors(rng, "sampler rng_state", (2,), torch.int64)}


# ---- recovery, progress, RNG -----------------------------------------------------------------
def _recovery(raw: dict, version: int, n_steps: int, cfg_steps: int) -> dict:
    if version >= 2:
        d = _dict(raw["recovery"], "recovery", ("restarts", "lr_scale", "sgld_steps_factor"))
        restarts, lr_scale = d["restarts"], d["lr_scale"]
        warmup_from = _int(d.get("warmup_from", 0), "recovery warmup_from", 0, MAX_INT >> 1)
        step_size_scale = _num(d.get("sgld_step_size_scale", 1.0), "recovery sgld_step_size_scale", 1e-300, 1e12)
        factor = _int(d["sgld_steps_factor"], "recovery sgld_steps_factor", 1, MAX_STEPS_FACTOR)
        informative = d.get("informative_init", False)
        if type(informative) is not bool:
            raise Corrupt("recovery informative_init is not a bool")
        overrides = _overrides(d.get("overrides") or {}, "recovery overrides")
    else:  # format 1: restarts at the top level, lr factor under scheduler, SGLD factor implicit
        restarts, warmup_from, step_size_scale, informative = raw.get("restarts", []), 0, 1.0, False
        overrides = {}
        lr_scale = _dict(raw["scheduler"], "scheduler", ("lr_scale",))["lr_scale"]
        factor = n_steps // cfg_steps if n_steps % cfg_steps == 0 and n_steps >= cfg_steps else 1
    events = []
    for i, event in enumerate(_seq(restarts, "recovery restarts", MAX_RESTARTS)):
        event = _dict(event, f"restart event {i}")
        if len(event) > 16 or any(type(k) is not str for k in event):
            raise Corrupt(f"restart event {i} is not a short dict of named values")
        events.append({k: _overrides(v, f"restart event {i} overrides") if k == "overrides"
                       else _scalar(v, f"restart event {i} {k}") for k, v in event.items()})
    return {"restarts": events, "lr_scale": _num(lr_scale, "recovery lr_scale", 1e-300, 1.0), "sgld_steps_factor": factor,
            "warmup_from": warmup_from, "sgld_step_size_scale": step_size_scale, "informative_init": informative,
            "overrides": overrides}


def _overrides(x: Any, what: str) -> dict[str, Any]:
    """Config remedies of the recovery policy: a few dotted config keys with plain values, each
    a real field within its declared bounds."""
    d = _dict(x, what)
    if len(d) > 16 or any(type(k) is not str for k in d):
        raise Corrupt(f"{what} is not a short dict of config fields")
    if not all(v is None or type(v) in (bool, int, float, str) for v in d.values()):
        raise Corrupt(f"{what} holds a value that is not plain")
    try:
        Config().with_overrides(d)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Corrupt(f"{what}: {shorten(str(exc), 200)}") from None
    return dict(d)


def _progress(raw: dict) -> dict:
    step = _int(raw["step"], "step", 0, MAX_INT >> 1)
    epoch = _int(raw["epoch"], "epoch", 0, MAX_INT >> 1)
    batch = _int(raw["batch_in_epoch"], "batch_in_epoch", 0, MAX_INT >> 1)
    seed = _int(raw["seed"], "seed", 0, (2**64 - 1 - epoch) // SEED_MULTIPLIER)  # a valid epoch-order seed
    best = _num(raw["best_valid_acc"], "best_valid_acc", -1.0, 1.0, nan_ok=True)
    return {"step": step, "epoch": epoch, "batch_in_epoch": batch, "best_valid_acc": best, "seed": seed}


_TORCH_STATE_BYTES = torch.get_rng_state().numel()


def _rng(x: Any, tensors: _Tensors) -> dict:
    d = _dict(x, "rng", ("torch", "numpy", "python"))
    state = tensors(d["torch"], "rng torch state", (_TORCH_STATE_BYTES,), torch.uint8).cpu()
    try:
        torch.Generator().set_state(state)
    except RuntimeError:
        raise Corrupt("rng torch state is not a valid generator state") from None
    cuda = [tensors(s, "rng cuda state", dtype=torch.uint8).cpu() for s in _seq(d.get("cuda", []), "rng cuda", 1024)]
    if any(s.dim() != 1 or s.numel() > 1024 for s in cuda):
        raise Corrupt("rng cuda state is not a short byte vector")
    return {"torch": state, "cuda": cuda, "numpy": _numpy_rng(d["numpy"], tensors), "python": _python_rng(d["python"])}


def _world(x: Any, tensors: _Tensors) -> dict:
    """A data-parallel run's ``world``: its size, each rank's RNG states and parameter checksum."""
    d = _dict(x, "world", ("size", "rng", "param_checksums"))
    size = _int(d["size"], "world size", 1, 65536)
    rngs = [_rng(r, tensors) for r in _seq(d["rng"], "world rng", size)]
    sums = [_num(c, "world param_checksum", nan_ok=True) for c in _seq(d["param_checksums"], "world param_checksums", size)]
    if len(rngs) != size or len(sums) != size:
        raise Corrupt(f"world of {size} processes lists {len(rngs)} RNG states and {len(sums)} checksums")
    return {"size": size, "rng": rngs, "param_checksums": sums}


def _numpy_rng(x: Any, tensors: _Tensors) -> dict:
    d = _dict(x, "rng numpy", ("keys", "pos", "has_gauss", "cached"))
    keys = tensors(d["keys"], "rng numpy keys", (624,), torch.int64).cpu()
    if bool(((keys < 0) | (keys >= 2**32)).any()):
        raise Corrupt("rng numpy keys are not 32-bit words")
    clean = {"keys": keys, "pos": _int(d["pos"], "rng numpy pos", 0, 624),
             "has_gauss": _int(d["has_gauss"], "rng numpy has_gauss", 0, 1),
             "cached": _num(d["cached"], "rng numpy cached")}
    try:
        np.random.RandomState().set_state(("MT19937", keys.numpy().astype(np.uint32), clean["pos"],
                                           clean["has_gauss"], clean["cached"]))
    except (ValueError, TypeError):
        raise Corrupt("rng numpy state is not a valid MT19937 state") from None
    return clean


def _python_rng(x: Any) -> tuple:
    parts = _seq(x, "rng python", 3)
    if len(parts) != 3:
        raise Corrupt("rng python state is not (version, internal state, gauss)")
    version, internal, gauss = parts
    words = tuple(_int(w, "rng python word", 0, 2**32 - 1) for w in _seq(internal, "rng python internal state", 625))
    if len(words) != 625:
        raise Corrupt(f"rng python internal state has {len(words)} words, expected 625")
    state = (_int(version, "rng python version", 3, 3), words,
             None if gauss is None else _num(gauss, "rng python gauss"))
    try:
        random.Random().setstate(state)
    except (ValueError, TypeError):
        raise Corrupt("rng python state is not a valid Mersenne Twister state") from None
    return state
