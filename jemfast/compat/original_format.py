"""The original JEM checkpoint format: ``{"model_state_dict": f.state_dict(), "replay_buffer": buffer}``.

That is what ``checkpoint()`` in wgrathwohl/JEM ``train_wrn_ebm.py`` saves: the model's
``state_dict`` (keys ``f.*``, ``energy_output.*``, ``class_output.*`` for its ``F``/``CCF``)
and the replay buffer, a tensor ``[N, C, H, W]`` (or ``[]`` for a run without one). It holds no
optimizer, iteration or configuration.

:func:`read_original` loads such a file weights-only (no pickled objects run) and checks it
before returning it; :func:`write_original` writes one atomically. Other keys some descendants
add are ignored on reading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..process.errors import UserError
from ..rundir.checkpoint import atomic_save, load_weights_only
from ..rundir.checkpoint_values import Corrupt, _Tensors, _dict, _kind, _name

KEYS = ("model_state_dict", "replay_buffer")
MAX_TENSORS = 100_000


def is_jemfast_checkpoint(obj: Any) -> bool:
    """Whether a loaded checkpoint object is jemfast's format (it carries a ``format_version``)."""
    return isinstance(obj, dict) and "format_version" in obj


def read_original(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``{"model_state_dict": {name: Tensor}, "replay_buffer": Tensor[N, C, H, W] or []}`` from an
    original-format file. Raises UserError (one line) for a missing, torn or pickle-carrying file,
    a jemfast checkpoint, any other foreign object, or malformed contents."""
    obj, file_bytes = load_weights_only(path, map_location)
    return parse_original(obj, file_bytes, path)


def parse_original(obj: Any, file_bytes: int, path: str | Path) -> dict[str, Any]:
    """What :func:`read_original` returns, from the loaded object ``obj`` of a ``file_bytes`` file."""
    if is_jemfast_checkpoint(obj):
        raise UserError(f"checkpoint {path} is a jemfast checkpoint, not the original JEM format "
                        f"(python -m jemfast.compat convert turns it into one)")
    if not isinstance(obj, dict) or not all(k in obj for k in KEYS):
        what = f"a dict with keys {', '.join(_name(k) for k in list(obj)[:4])}" if isinstance(obj, dict) else _kind(obj)
        raise UserError(f"checkpoint {path} is not an original JEM checkpoint (expected a dict with "
                        f"'model_state_dict' and 'replay_buffer', found {what})")
    try:
        tensors = _Tensors(file_bytes)
        return {"model_state_dict": _state_dict(obj["model_state_dict"], tensors),
                "replay_buffer": _buffer(obj["replay_buffer"], tensors)}
    except Corrupt as exc:
        raise UserError(f"checkpoint {path} is corrupt ({exc})") from None


def _state_dict(x: Any, tensors: _Tensors) -> dict[str, torch.Tensor]:
    d = _dict(x, "model_state_dict")
    if not d or len(d) > MAX_TENSORS:
        raise Corrupt(f"model_state_dict holds {len(d)} tensors")
    clean = {}
    for key, value in d.items():
        if type(key) is not str:
            raise Corrupt(f"model_state_dict has a key {_name(key)} that is not a string")
        clean[key] = tensors(value, f"model tensor {_name(key)}")
    return clean


def _buffer(x: Any, tensors: _Tensors) -> torch.Tensor | list:
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return []
    buf = tensors(x, "replay_buffer", floating=True)
    if buf.dim() < 2 or buf.shape[0] == 0:
        raise Corrupt(f"replay_buffer has shape {list(buf.shape)}, not [rows, *image shape]")
    return buf


def write_original(path: str | Path, model_state_dict: Mapping[str, torch.Tensor],
                   replay_buffer: torch.Tensor | list) -> Path:
    """Write ``{"model_state_dict", "replay_buffer"}`` to ``path`` atomically (CPU tensors, as
    the original's ``checkpoint()`` moves the model to the CPU first); returns the path."""
    state = {k: v.detach().cpu() for k, v in model_state_dict.items()}
    buffer = replay_buffer.detach().cpu() if isinstance(replay_buffer, torch.Tensor) else []
    atomic_save({"model_state_dict": state, "replay_buffer": buffer}, path)
    return Path(path)
