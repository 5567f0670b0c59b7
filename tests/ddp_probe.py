"""Test helper: ``python -m tests.ddp_probe ARGS`` runs ``python -m jemfast.train ARGS`` (under
torchrun or not) with :func:`jemfast.step.loss_terms` wrapped:

- ``JEMFAST_TEST_PROBE=DIR``: every call's labelled batch ``x``, labels ``y`` and p(x) batch
  ``x_px`` are saved, when training returns, to ``DIR/rank<RANK>.pt`` as lists of CPU tensors;
- ``JEMFAST_TEST_HOLD_AT=n`` (with the probe): before its call number n (0-based) each rank
  touches ``DIR/held-<RANK>`` and waits (at most 300 s) until ``DIR/go`` exists, so a test can act
  while the run is known to be at that iteration.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import jemfast.step as step
from jemfast.train import main


def _install(probe: Path, hold_at: int | None) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": [], "x_px": []}
    real, rank = step.loss_terms, os.environ.get("RANK", "0")

    def wrapper(model, x, x_fake, y, *args, **kwargs):
        if hold_at is not None and len(seen["x"]) == hold_at:
            (probe / f"held-{rank}").touch()
            t0 = time.time()
            while not (probe / "go").exists() and time.time() - t0 < 300:
                time.sleep(0.05)
        seen["x"].append(x.detach().cpu().clone())
        seen["y"].append(y.cpu().clone())
        x_px = kwargs.get("x_px")
        seen["x_px"].append(None if x_px is None else x_px.detach().cpu().clone())
        return real(model, x, x_fake, y, *args, **kwargs)

    step.loss_terms = wrapper
    return seen


if __name__ == "__main__":
    probe = Path(os.environ["JEMFAST_TEST_PROBE"])
    hold = os.environ.get("JEMFAST_TEST_HOLD_AT")
    seen = _install(probe, int(hold) if hold else None)
    code = main()
    torch.save(seen, probe / f"rank{os.environ.get('RANK', '0')}.pt")
    sys.exit(code)
