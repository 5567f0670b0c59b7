"""Replay-buffer shards of a data-parallel run, and a checkpoint read back on any world size.

Under torchrun each of the W ranks keeps a buffer of ``buffer_size // W`` rows. A checkpoint
file holds them merged into one buffer of ``buffer_size`` rows laid out as a single process's
(class-conditional: class c's rows of every shard, in rank order, inside class c's share), so
``load_checkpoint`` and a single-process ``--resume`` read it as usual, and a ``world`` entry::

    world: {size: W, rng: [each rank's RNG states], param_checksums: [one float per rank]}

:func:`for_rank` cuts a checkpoint back to one rank's shard and RNG states: exactly the saved
ones on the same world size; on another world size the merged buffer is re-sharded and the
RNG streams re-seeded (one warning line).
"""
from __future__ import annotations

from typing import Any

import torch

from ..process.log import get_logger

log = get_logger(__name__)
_PAD_SEED = 12345  # padding rows come from their own generator: the run's RNG streams are untouched


def _pad(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows`` cut or padded (U(-1, 1) rows) to ``n`` rows."""
    if rows.shape[0] >= n:
        return rows[:n]
    gen = torch.Generator().manual_seed(_PAD_SEED)
    extra = torch.rand((n - rows.shape[0], *rows.shape[1:]), generator=gen) * 2 - 1
    return torch.cat([rows, extra.to(rows.device, rows.dtype)])


def merge_shards(shards: list[torch.Tensor], n_classes: int | None, capacity: int) -> torch.Tensor:
    """One ``Tensor[capacity, *shape]`` buffer from the ranks' ``shards`` (rank order)."""
    if not n_classes:
        return _pad(torch.cat(shards), capacity)
    per_class = capacity // n_classes
    parts = [s[: (s.shape[0] // n_classes) * n_classes].reshape(n_classes, -1, *s.shape[1:]) for s in shards]
    by_class = torch.cat(parts, dim=1)  # [C, sum of per-class rows, *shape]
    rows = [_pad(by_class[c], per_class) for c in range(n_classes)]
    return _pad(torch.cat(rows), capacity)


def split_shard(full: torch.Tensor, n_classes: int | None, world: int, rank: int, shard_rows: int) -> torch.Tensor:
    """Rank ``rank``'s ``Tensor[shard_rows, *shape]`` of a merged buffer ``full`` (the inverse
    of :func:`merge_shards` on the same world size)."""
    if world == 1 and full.shape[0] == shard_rows:
        return full
    if not n_classes:
        return _pad(full[rank * shard_rows:], shard_rows)
    per_class, per_shard = full.shape[0] // n_classes, shard_rows // n_classes
    rows = [_pad(full[c * per_class + rank * per_shard:(c + 1) * per_class], per_shard) for c in range(n_classes)]
    return _pad(torch.cat(rows), shard_rows)


def fresh_rng_state(seed: int) -> dict[str, Any]:
    """The RNG states (as :func:`jemfast.rundir.checkpoint.rng_state`) right after seeding with ``seed``;
    the live RNG states are left as they were."""
    from ..build import seed_all
    from ..rundir.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    seed_all(seed)
    fresh = rng_state()
    set_rng_state(saved)
    return fresh


def for_rank(ckpt: dict[str, Any], rank: int, world: int, shard_rows: int) -> dict[str, Any]:
    """``ckpt`` with rank ``rank``'s buffer shard (``shard_rows`` rows) and RNG states, for a
    run of ``world`` processes; the checkpoint dict itself is not modified."""
    info = ckpt.get("world")
    saved_world = int(info["size"]) if info else 1
    if saved_world == world == 1:
        return ckpt
    n_classes = int(ckpt["buffer"]["n_classes"])
    data = split_shard(ckpt["buffer"]["data"], n_classes if n_classes > 0 else None, world, rank, shard_rows)
    out = {**ckpt, "buffer": {**ckpt["buffer"], "data": data}}
    if saved_world == world:
        out["rng"] = info["rng"][rank]
    else:
        if rank == 0:
            log.warning(f"--resume: the checkpoint was written by {saved_world} process(es), this run has "
                        f"{world}: the replay buffer is re-sharded and the random streams re-seeded "
                        f"(the run continues, not bit-for-bit as it would have)")
        out["rng"] = fresh_rng_state(int(ckpt["seed"]) + rank + 7919 * int(ckpt["step"]))
    return out
