"""What ``--backend auto`` picks: a table of rules keyed by device type and workload class, each
naming the measurement behind it (bench/RESULTS.md). Update a row when new figures exist."""
from __future__ import annotations

from dataclasses import dataclass

LARGE_PARAMS = 10_000_000  # parameters; WRN-28-10 has 36.5M, the benchmark SmallCNNs and WRN-10-2 < 1M


@dataclass(frozen=True)
class Rule:
    """On ``device`` (a torch device type), for models of ``size`` ("small": fewer than
    ``LARGE_PARAMS`` parameters, "large", or "*") at ``precision`` ("fp32", "bf16" or "*"),
    use ``backend``; ``evidence`` is the figure (or the reason) behind it."""

    device: str
    size: str
    precision: str
    backend: str
    evidence: str

    def matches(self, device: str, size: str, precision: str) -> bool:
        return self.device == device and self.size in ("*", size) and self.precision in ("*", precision)

    def name(self) -> str:
        return f"{self.device}/{self.size}/{self.precision} -> {self.backend}"


# First match wins: put specific rows above the catch-all row of their device.
RULES: tuple[Rule, ...] = (
    Rule("cpu", "*", "*", "reference",
         "bench/RESULTS.md, 2-core CPU: compile chain 1.00-1.16x the reference side by side when idle "
         "(0.92-1.55x under load), --compile iteration 0.76x eager, plus 5-30 s of compiling"),
    Rule("cuda", "*", "*", "graph",
         "no GPU measurement yet (bench/RESULTS.md); default: the whole chain in one CUDA graph with the "
         "fused update (no per-op launch cost)"),
)
DEFAULT = Rule("*", "*", "*", "reference", "no rule for this device type: the plain PyTorch chain")


def size_class(n_params: int | None) -> str:
    """"large" from ``LARGE_PARAMS`` parameters on, "small" below, "*" when unknown."""
    if n_params is None:
        return "*"
    return "large" if n_params >= LARGE_PARAMS else "small"


def pick(device: str, n_params: int | None = None, precision: str = "fp32") -> Rule:
    """The first rule of :data:`RULES` matching ``device`` (type), the model size and precision."""
    size = size_class(n_params)
    for rule in RULES:
        if rule.matches(device, size, precision):
            return rule
    return DEFAULT
