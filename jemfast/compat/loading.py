"""A checkpoint of either format for evaluation: jemfast's, or the original JEM code's with the
train flags that say which model it holds (``python -m jemfast.eval --checkpoint ORIGINAL.pt
--dataset digits --hidden 64``).

The original format ``{"model_state_dict", "replay_buffer"}`` holds no configuration, so the
model is built from the flags given over the dataset's preset, exactly as
``python -m jemfast.compat convert`` builds it (:func:`.convert.original_model`): the
defaults are the original code's own (CIFAR-10, WRN-28-10 without normalisation), a WRN gets
``--wrn-layout original``, and ``--buffer-size`` follows the file. Nothing is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..options.config import FLAGS_BY_KEY
from ..process.errors import UserError
from ..process.log import get_logger
from ..rundir.checkpoint import load_checkpoint, load_weights_only
from . import keymap
from .convert import original_model
from .original_format import KEYS, is_jemfast_checkpoint, parse_original

log = get_logger(__name__)
MODEL_FLAGS_HINT = "--dataset, --model, --depth, --width, --norm, --hidden"


def refuse_flags(overrides: Mapping[str, Any], src: str | Path, use: str) -> None:
    """UserError when train flags were given for the jemfast checkpoint ``src``, which carries
    its own config; ``use`` says what those flags are for."""
    extra = sorted(FLAGS_BY_KEY[k] for k in overrides if k != "run.out")
    if extra:
        raise UserError(f"{', '.join(extra)} apply only to an original checkpoint {use}; {src} is a jemfast "
                        f"checkpoint (its own config is used)")


def load_any_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`jemfast.load_checkpoint`'s dict (``model`` in eval mode on ``device``, ``buffer``,
    ``config``, ``step``, ``epoch``, ``raw``) plus ``format`` (``"jemfast"`` or ``"original"``),
    for a jemfast checkpoint or an original one built with the train flags ``overrides`` (dotted
    config keys; refused for a jemfast checkpoint). An original checkpoint has no step or epoch
    (None) and ``raw`` is its validated dict. Raises UserError (one line) for anything else."""
    overrides = dict(overrides or {})
    device = torch.device(device)
    try:
        ck = load_checkpoint(path, device)
    except UserError:
        obj, file_bytes = load_weights_only(path)  # a missing, torn or pickled file: its own message again
        if is_jemfast_checkpoint(obj):
            raise  # a jemfast checkpoint, refused for what it holds
        if not (isinstance(obj, dict) and all(k in obj for k in KEYS)):
            raise UserError(f"checkpoint {path} is neither a jemfast checkpoint (RUN/checkpoints/*.pt) nor an "
                            f"original JEM one (a dict with 'model_state_dict' and 'replay_buffer')") from None
        return _load_original(parse_original(obj, file_bytes, path), path, device, overrides)
    refuse_flags(overrides, path, "being evaluated")
    return {**ck, "format": "jemfast"}


def _load_original(original: dict[str, Any], path: str | Path, device: torch.device,
                   overrides: dict[str, Any]) -> dict[str, Any]:
    try:
        cfg, _, _, added, build = original_model(original, overrides, device)
    except UserError as exc:
        raise UserError(f"original JEM checkpoint {path}: {exc} (give the model flags it was trained with: "
                        f"{MODEL_FLAGS_HINT})") from None
    model, buffer = build()
    model.eval()
    rows = len(original["replay_buffer"])
    held = f"buffer of {rows} rows" if rows else "no replay buffer (the buffer shown is fresh U(-1, 1) noise)"
    log.info(f"{path}: an original JEM checkpoint, read as {keymap.describe(cfg)} on {cfg.data.dataset}; "
             f"it holds {held}")
    return {"model": model, "buffer": buffer, "config": cfg, "step": None, "epoch": None, "raw": original,
            "format": "original", "added": added}
