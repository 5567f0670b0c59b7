"""The good states a :class:`jemfast.Guard` writes to its ``out`` directory: :class:`GuardFiles`.

Each good state is one ``guard-ITERATION.pt`` (written atomically), the newest ``keep`` of them
kept; a state read back is checked against the live model and buffer before it is trusted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .process.log import get_logger
from .rundir.checkpoint import atomic_save

log = get_logger(__name__)
FILE_FORMAT = 1  # of the guard-ITERATION.pt files and of Guard.state_dict()


def buffer_data(state: Any) -> torch.Tensor | None:
    """The chains of a buffer state: a ReplayBuffer's ``state_dict()["data"]``, a plain tensor, or None."""
    return state["data"] if isinstance(state, dict) else state


class GuardFiles:
    """The ring of good-state files in ``out``, a directory the guard owns: what an earlier guard
    left there (``guard-*.pt``, torn ``.guard-*.tmp``) is removed when this one starts."""

    def __init__(self, out: str | Path, keep: int) -> None:
        self.out, self.keep = Path(out), keep
        stale = list(self.out.glob("guard-*.pt")) + list(self.out.glob(".guard-*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info(f"removed {len(stale)} good state file(s) an earlier Guard left in {self.out}")

    def ring(self) -> list[Path]:
        """The good-state files, newest first."""
        return sorted(self.out.glob("guard-*.pt"), reverse=True)

    def write(self, state: dict[str, Any], iteration: int) -> Path:
        """Save ``state`` as iteration ``iteration``'s file; drop the files past the newest ``keep``."""
        path = self.out / f"guard-{iteration:09d}.pt"
        atomic_save(state, path)
        for old in self.ring()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def read(path: Path, model_state: dict[str, torch.Tensor], buffer_state: Any) -> dict[str, Any]:
        """The state in ``path``; ValueError unless it is a Guard's, for a model with
        ``model_state``'s shapes and a buffer like ``buffer_state``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
            raise ValueError("not a good state of this jemfast Guard")
        if ({k: tuple(v.shape) for k, v in state["model"].items()}
                != {k: tuple(v.shape) for k, v in model_state.items()}):
            raise ValueError("its model does not match this model")
        saved, current = buffer_data(state["buffer"]), buffer_data(buffer_state)
        if (saved is None) != (current is None) or (saved is not None and saved.shape != current.shape):
            raise ValueError("its buffer does not match this buffer")
        return state
