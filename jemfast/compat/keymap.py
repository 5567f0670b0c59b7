"""Model keys: the original ``CCF`` layout <-> jemfast's ``JEM(classifier)`` layout.

The original ``CCF`` holds its backbone as ``f`` and two heads: ``class_output`` (the logits;
``forward(x)`` is their logsumexp) and ``energy_output`` (used only by the unconditional ``F``).
jemfast's :class:`jemfast.JEM` holds one classifier whose last layer is ``head``. Which tensors
correspond is one table of module prefixes per model (:func:`prefix_pairs`):

- ``wrn``: the original ``wideresnet.Wide_ResNet`` (``conv1``, ``layer1..3.<j>.{bn1,conv1,bn2,
  conv2,shortcut.0}``, ``bn1``) <-> :class:`jemfast.models.WideResNet` with ``layout="original"``
  (``stem``, ``blocks.<i>.{norm1,conv1,norm2,conv2,shortcut}``, ``norm``), i = (group - 1) * n + j.
  The default jemfast layout downsamples in another conv (same shapes, another function), so
  conversion requires ``--wrn-layout original``. The original norms ``instance`` and ``act`` have
  no jemfast counterpart.
- ``cnn``: ``f.features.*`` <-> ``classifier.features.*``, the backbone of
  examples/jem_original_style.py, which is :class:`jemfast.models.SmallCNN` without its head.

Tensors the CCF never reads (``energy_output.*``; the WRN's unused ``f.linear.*``) are dropped
on the way in and written as zeros on the way out, so the original ``CCF`` loads the file
strictly. The unconditional ``F`` reads ``energy_output`` for log p(x), which ``JEM`` cannot
express: its checkpoints (same keys) convert as a CCF, i.e. they lose that head.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..build import build_model
from ..options.config import Config
from ..process.errors import UserError

UNUSED = ("energy_output.", "f.linear.")  # present in every original CCF, read by none
ORIGINAL_LINEAR_CLASSES = 10  # Wide_ResNet's own unused classifier keeps its default size


def prefix_pairs(cfg: Config) -> list[tuple[str, str]]:
    """``[(original prefix, jemfast prefix)]`` of corresponding modules for ``cfg.model``."""
    m = cfg.model
    pairs = [("class_output.", "classifier.head.")]
    if m.name == "cnn":
        return pairs + [("f.features.", "classifier.features.")]
    if m.name != "wrn":
        raise UserError(f"--model {m.name} has no counterpart in the original JEM code (wrn and cnn convert)")
    if m.wrn_layout != "original":
        raise UserError("--wrn-layout jemfast downsamples in another convolution than the original Wide_ResNet "
                        "(same shapes, another function); convert with --wrn-layout original")
    if m.norm == "group":
        raise UserError("--norm group has no counterpart in the original Wide_ResNet (none, batch, layer do)")
    n = (m.depth - 4) // 6
    pairs += [("f.conv1.", "classifier.stem."), ("f.bn1.", "classifier.norm.")]
    for group in (1, 2, 3):
        for j in range(n):
            a, b = f"f.layer{group}.{j}.", f"classifier.blocks.{(group - 1) * n + j}."
            pairs += [(a + "bn1.", b + "norm1."), (a + "conv1.", b + "conv1."), (a + "bn2.", b + "norm2."),
                      (a + "conv2.", b + "conv2."), (a + "shortcut.0.", b + "shortcut.")]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _template(cfg: Config, input_shape: tuple[int, ...], n_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(cfg, input_shape, n_classes, torch.device("meta"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe(cfg: Config) -> str:
    m = cfg.model
    if m.name == "wrn":
        return f"WRN-{m.depth}-{m.width} (--norm {m.norm})"
    return f"{m.name} (--hidden {m.hidden})"


def to_jemfast(state: Mapping[str, torch.Tensor], cfg: Config, input_shape: tuple[int, ...],
               n_classes: int) -> dict[str, torch.Tensor]:
    """The ``JEM`` state_dict of an original CCF ``state`` for the model ``cfg`` describes.
    Raises UserError naming the first key or shape that does not correspond."""
    pairs, want = prefix_pairs(cfg), _template(cfg, input_shape, n_classes)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs)
        if new is None and key.startswith(UNUSED):
            continue
        if new is None or new not in want:
            raise UserError(f"original tensor {key} has no counterpart in jemfast's {describe(cfg)}")
        if tuple(value.shape) != want[new]:
            raise UserError(f"original tensor {key} has shape {list(value.shape)}; jemfast's {describe(cfg)} "
                            f"expects {list(want[new])} ({new})")
        out[new] = value
    missing = [k for k in want if k not in out]
    if missing:
        inverse = [(b, a) for a, b in pairs]
        raise UserError(f"the original checkpoint has no {_rename(missing[0], inverse) or missing[0]}, "
                        f"which jemfast's {describe(cfg)} needs ({missing[0]})")
    return out


def to_original(state: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The original CCF state_dict of a ``JEM`` ``state`` (unused heads filled with zeros)."""
    inverse = [(b, a) for a, b in prefix_pairs(cfg)]
    out = {}
    for key, value in state.items():
        old = _rename(key, inverse)
        if old is None:
            raise UserError(f"jemfast tensor {key} has no counterpart in the original CCF")
        out[old] = value
    head = state["classifier.head.weight"]
    feat = head.shape[1]
    out["energy_output.weight"], out["energy_output.bias"] = head.new_zeros(1, feat), head.new_zeros(1)
    if cfg.model.name == "wrn":
        out["f.linear.weight"] = head.new_zeros(ORIGINAL_LINEAR_CLASSES, feat)
        out["f.linear.bias"] = head.new_zeros(ORIGINAL_LINEAR_CLASSES)
    return out
