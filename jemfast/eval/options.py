"""Command line of ``python -m jemfast.eval`` and the validated :class:`EvalOptions`.

Dataset-dependent defaults (OOD sets, epsilons, number of attacked images) are filled in by
:func:`resolve_defaults` once the checkpoint says which dataset it was trained on.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..cli import OneLineParser
from ..config import BACKENDS, DEVICES
from .ood import OOD_SETS, default_ood

PARTS = ("accuracy", "calibration", "ood", "samples", "robustness", "generation")
GEN_SOURCES = ("buffer", "short-run")

# eps in data units (images in [-1, 1]); 0 is the clean accuracy of the defended classifier
DEFAULT_EPS = {
    "digits": {"linf": [0.0, 0.1, 0.2, 0.3], "l2": [0.0, 1.0, 2.0, 3.0]},
    "toy2d": {"linf": [0.0, 0.05, 0.1, 0.2, 0.4], "l2": [0.0, 0.05, 0.1, 0.2, 0.4]},
    "images": {"linf": [0.0, 4 / 255, 8 / 255, 16 / 255, 32 / 255], "l2": [0.0, 0.5, 1.0, 2.0, 4.0]},
}
DEFAULT_ATTACK_N = {"digits": 100, "toy2d": 300, "images": 300}
DEFAULT_PGD_STEPS = {"digits": 10, "toy2d": 10, "images": 20}  # the paper: 100 (x 20 restarts)


@dataclass
class EvalOptions:
    checkpoint: str
    what: tuple[str, ...] = PARTS
    out: str | None = None
    device: str = "auto"
    backend: str = "reference"
    seed: int = 0
    batch_size: int = 500
    data_dir: str | None = None
    progress: bool = True
    bins: int = 20
    ood: tuple[str, ...] | None = None
    ood_n: int = 2000
    sample_steps: int = 80
    per_class: int = 10
    eps: dict[str, list[float]] = field(default_factory=dict)  # norm -> eps list; filled later
    eps_given: dict[str, list[float] | None] = field(default_factory=dict)
    refine_steps: tuple[int, ...] = (0, 1, 10)
    pgd_steps: int | None = None  # None: DEFAULT_PGD_STEPS of the dataset
    pgd_restarts: int = 1
    pgd_step_rel: float | None = None  # None: 2.5 / pgd_steps (Madry et al.)
    eot: int = 1
    attack_n: int | None = None
    attack_batch: int = 250
    inception_weights: str | None = None
    gen_source: str = "buffer"
    gen_n: int = 5000
    is_splits: int = 10


def _list(kind: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind}, got {text!r}")
        return items
    return parse


def parse_eps(text: str, flag: str) -> list[float]:
    """'0,0.1,0.2' -> [0.0, 0.1, 0.2]; each a finite number >= 0 (ValueError otherwise)."""
    try:
        values = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{flag}: expected a comma list of numbers like '0,0.1,0.2', got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{flag}: each epsilon must be a finite number >= 0, got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m jemfast.eval",
                      description="Evaluate a JEM checkpoint: accuracy, calibration, OOD detection, "
                                  "samples, adversarial robustness, IS/FID. Writes eval.json, report.md "
                                  "and PNGs.")
    a = p.add_argument
    a("--checkpoint", required=True, help="checkpoint file (e.g. RUN/checkpoints/last.pt)")
    a("--what", type=_list("parts"), default=PARTS, help=f"comma list of: {', '.join(PARTS)} (default all)")
    a("--out", default=None, help="output directory (default: RUN/eval beside the checkpoints folder)")
    a("--device", default="auto", choices=DEVICES)
    a("--backend", default="reference", choices=BACKENDS, help="SGLD backend for samples/generation")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=500, help="images per forward pass")
    a("--data-dir", default=None, help="torchvision datasets folder (default: the checkpoint's)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--bins", type=int, default=20, help="ECE bins (paper: 20)")
    a("--ood", type=_list("OOD sets"), default=None,
      help=f"comma list of: {', '.join(OOD_SETS)} (default depends on the dataset)")
    a("--ood-n", type=int, default=2000, help="images per OOD set")
    a("--sample-steps", type=int, default=80, help="SGLD steps of the fresh short-run chains")
    a("--per-class", type=int, default=10, help="images per class in the sample pictures")
    a("--eps-linf", default=None, help="comma list of L-inf epsilons in data units (images in [-1, 1]; "
      "default digits 0,.1,.2,.3, 32x32 images 0,4,8,16,32 /255); '' skips the norm")
    a("--eps-l2", default=None, help="comma list of L2 epsilons in data units (default digits 0,1,2,3, "
      "32x32 images 0,.5,1,2,4); '' skips the norm")
    a("--refine-steps", default="0,1,10", help="SGLD refinement steps before classifying (paper 0,1,10)")
    a("--pgd-steps", type=int, default=None, help="PGD iterations per restart (default 10 digits, 20 images)")
    a("--pgd-restarts", type=int, default=1, help="PGD runs from random starts (worst case counts)")
    a("--pgd-step-rel", type=float, default=None, help="PGD step size / eps (default 2.5 / --pgd-steps)")
    a("--eot", type=int, default=1, help="SGLD-noise draws averaged per attack gradient")
    a("--attack-n", type=int, default=None, help="test images attacked (default 100 digits, 300 images)")
    a("--attack-batch", type=int, default=250, help="rows per PGD batch")
    a("--inception-weights", default=None, help="torchvision inception_v3 state_dict for IS/FID")
    a("--gen-source", default="buffer", choices=GEN_SOURCES, help="samples scored by IS/FID")
    a("--gen-n", type=int, default=5000, help="samples scored by IS/FID")
    return p


def options_from_args(argv: Sequence[str] | None = None) -> EvalOptions:
    args = build_parser().parse_args(argv)
    unknown = [w for w in args.what if w not in PARTS]
    if unknown:
        raise ValueError(f"--what: unknown item {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if args.ood is not None:
        bad = [s for s in args.ood if s not in OOD_SETS]
        if bad:
            raise ValueError(f"--ood: unknown set {bad[0]!r}; choose from {', '.join(OOD_SETS)}")
    try:
        refine = tuple(sorted({int(t) for t in args.refine_steps.split(",") if t.strip()}))
    except ValueError:
        raise ValueError(f"--refine-steps: expected a comma list of integers, got {args.refine_steps!r}") from None
    eps_given = {norm: (None if text is None else (parse_eps(text, flag) if text.strip() else []))
                 for norm, text, flag in (("linf", args.eps_linf, "--eps-linf"), ("l2", args.eps_l2, "--eps-l2"))}
    opts = EvalOptions(
        checkpoint=args.checkpoint, what=tuple(dict.fromkeys(args.what)), out=args.out, device=args.device,
        backend=args.backend, seed=args.seed, batch_size=args.batch_size, data_dir=args.data_dir,
        progress=not args.no_progress, bins=args.bins, ood=args.ood, ood_n=args.ood_n,
        sample_steps=args.sample_steps, per_class=args.per_class, eps_given=eps_given,
        refine_steps=refine, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
        pgd_step_rel=args.pgd_step_rel, eot=args.eot, attack_n=args.attack_n,
        attack_batch=args.attack_batch, inception_weights=args.inception_weights,
        gen_source=args.gen_source, gen_n=args.gen_n)
    return validate(opts)


def validate(o: EvalOptions) -> EvalOptions:
    """Raise ValueError naming the first bad option."""
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    for name in ("batch_size", "bins", "ood_n", "sample_steps", "per_class", "pgd_restarts", "eot",
                 "attack_batch", "gen_n"):
        v = getattr(o, name)
        check(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')}: must be an integer >= 1, got {v!r}")
    check(o.seed >= 0, f"--seed: must be >= 0, got {o.seed}")
    check(all(k >= 0 for k in o.refine_steps) and len(o.refine_steps) > 0,
          "--refine-steps: must be integers >= 0")
    if o.pgd_step_rel is not None:
        check(math.isfinite(o.pgd_step_rel) and o.pgd_step_rel > 0,
              f"--pgd-step-rel: must be a finite number > 0, got {o.pgd_step_rel}")
    check(o.attack_n is None or o.attack_n >= 1, f"--attack-n: must be >= 1, got {o.attack_n}")
    check(o.pgd_steps is None or o.pgd_steps >= 1, f"--pgd-steps: must be an integer >= 1, got {o.pgd_steps}")
    unknown = [w for w in o.what if w not in PARTS]
    check(not unknown, f"--what: unknown item {unknown[0]!r}; choose from {', '.join(PARTS)}" if unknown else "")
    return o


def resolve_defaults(o: EvalOptions, dataset: str) -> EvalOptions:
    """Fill the dataset-dependent defaults (OOD sets, eps lists, attacked images)."""
    kind = dataset if dataset in DEFAULT_EPS else "images"
    if o.ood is None:
        o.ood = default_ood(dataset)
    o.eps = {norm: (given if given is not None else list(DEFAULT_EPS[kind][norm]))
             for norm, given in ((n, o.eps_given.get(n)) for n in ("linf", "l2"))}
    if o.attack_n is None:
        o.attack_n = DEFAULT_ATTACK_N[kind]
    if o.pgd_steps is None:
        o.pgd_steps = DEFAULT_PGD_STEPS[kind]
    if o.pgd_step_rel is None:
        o.pgd_step_rel = 2.5 / o.pgd_steps
    return o
