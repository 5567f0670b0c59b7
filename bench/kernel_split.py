"""Where a profiled GPU run spends its time: kernels bucketed by name from a torch.profiler trace.

Buckets (checked in this order, first match wins; names are CUDA kernel names as the profiler
records them):

- ``layout``: NCHW <-> NHWC transforms (``nchwToNhwc``, ``nhwcToNchw``, transposes): the cost of a
  memory format that does not match what the convolution kernels want. Counted under "other" in
  the three-way split, and also reported on its own.
- ``convolution``: cuDNN / CUTLASS / cuBLAS matrix-unit kernels (implicit-GEMM ``fprop`` and
  ``dgrad`` convolutions, ``xmma``/``nvjet``/``gemm`` kernels, split-K reductions).
- ``elementwise``: PyTorch's elementwise and reduction kernels (bias, leaky-ReLU, residual adds,
  their backward, casts, sums) and Triton kernels (jemfast's ``_sgld_kernel`` and
  ``_gather_reinit_kernel``, Inductor's ``triton_*`` fusions).
- ``other``: everything else (memcpy/memset, layout transforms, unknown kernels).
"""
from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

_RULES = [
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw|nchw_to_nhwc|nhwc_to_nchw|transpose|permute", re.I)),
    ("convolution", re.compile(r"conv|xmma|implicit|fprop|dgrad|wgrad|cudnn|cutlass|gemm|nvjet|splitk|"
                               r"sm\d+_|wgmma|hmma", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce|triton|leaky|relu|fill|copy_kernel|"
                               r"catarray|where|clamp|add|mul|exp|log|softmax|sum|cast|_sgld_kernel|_gather_reinit_kernel", re.I)),
]


def bucket(name: str) -> str:
    """``layout`` | ``convolution`` | ``elementwise`` | ``other`` for a kernel name."""
    for label, pattern in _RULES:
        if pattern.search(name):
            return label
    return "other"


def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every GPU kernel/memcpy/memset in a Chrome-trace dict."""
    out = []
    for ev in trace.get("traceEvents", []):
        cat = str(ev.get("cat", "")).lower()
        if ev.get("ph") == "X" and cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            out.append((str(ev.get("name", "?")), float(ev.get("dur", 0.0))))
    return out


def split(events: list[tuple[str, float]], top: int = 15) -> dict:
    """Milliseconds per bucket, the three-way split (convolution / elementwise / other, with
    layout transforms inside other) as fractions, and the ``top`` kernels by time."""
    ms: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, us in events:
        ms[bucket(name)] += us / 1e3
        per_kernel[name] += us / 1e3
        counts[name] += 1
    total = sum(ms.values())
    three = {"convolution": ms["convolution"], "elementwise": ms["elementwise"],
             "other": ms["other"] + ms["layout"]}
    return {
        "gpu_ms": total, "kernels": len(events),
        "ms": {k: ms[k] for k in ("convolution", "elementwise", "layout", "other")},
        "fraction": {k: (v / total if total else 0.0) for k, v in three.items()},
        "layout_fraction": ms["layout"] / total if total else 0.0,
        "top": [{"name": n[:160], "ms": t, "calls": counts[n], "bucket": bucket(n)}
                for n, t in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]],
    }


def read_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)
