"""Command line of ``python -m jemfast.eval`` and the validated :class:`EvalOptions`.

Dataset-dependent defaults (OOD sets, epsilons, number of attacked images) are filled in by
:func:`resolve_defaults` once the checkpoint says which dataset it was trained on. A checkpoint
of the original JEM code says nothing: the train flags of :data:`ORIGINAL_MODEL_KEYS` (as
``python -m jemfast.compat convert`` takes them) say which model it holds.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..options.cli import OneLineParser
from ..options.config import BACKENDS, DEVICES, FLAGS_BY_KEY, SEED_MAX, Config
from ..options.schema import add_flags, check_fields, given_values, option
from .ood import OOD_SETS, default_ood

# the train flags that build an original JEM checkpoint's model (jemfast.compat.loading)
ORIGINAL_MODEL_KEYS = ("data.dataset", "model.name", "model.depth", "model.width", "model.norm", "model.dropout",
                       "model.wrn_layout", "model.hidden", "sampler.class_cond", "sampler.step_size",
                       "sampler.noise_std")
ORIGINAL_PREFIX = "original."
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


# Each option declared once (jemfast.options.schema.option): the flags and validate() come from here.
@dataclass
class EvalOptions:
    checkpoint: str = option(flag="--checkpoint", help="checkpoint file (e.g. RUN/checkpoints/last.pt)")
    what: tuple[str, ...] = option(PARTS, "--what", "comma list of parts", choices=PARTS, unique=True,
                                   min_len=1, metavar="PART,...")
    out: str | None = option(None, "--out", "output directory (default: RUN/eval beside the checkpoints folder)")
    device: str = option("auto", "--device", "device", choices=DEVICES)
    backend: str = option("reference", "--backend", "SGLD backend for samples/generation", choices=BACKENDS)
    seed: int = option(0, "--seed", "random seed", lo=0, hi=SEED_MAX)
    batch_size: int = option(500, "--batch-size", "images per forward pass", lo=1, hi=65536)
    data_dir: str | None = option(None, "--data-dir", "torchvision datasets folder (default: the checkpoint's)")
    progress: bool = option(True, "--no-progress", "no progress bars", action="store_false")
    bins: int = option(20, "--bins", "ECE bins (paper: 20)", lo=1, hi=10_000)
    ood: tuple[str, ...] | None = option(None, "--ood", "comma list of OOD sets (default depends on the dataset)",
                                         choices=OOD_SETS, unique=True, min_len=1, metavar="SET,...")
    ood_n: int = option(2000, "--ood-n", "images per OOD set", lo=1, hi=1_000_000)
    sample_steps: int = option(80, "--sample-steps", "SGLD steps of the fresh short-run chains", lo=1, hi=100_000)
    per_class: int = option(10, "--per-class", "images per class in the sample pictures", lo=1, hi=1000)
    eps_linf: tuple[float, ...] | None = option(
        None, "--eps-linf", "comma list of L-inf epsilons in data units (images in [-1, 1]; default digits "
        "0,.1,.2,.3, 32x32 images 0,4,8,16,32 /255); '' skips the norm", lo=0.0, hi=1e6, sort=True,
        metavar="EPS,...")
    eps_l2: tuple[float, ...] | None = option(
        None, "--eps-l2", "comma list of L2 epsilons in data units (default digits 0,1,2,3, 32x32 images "
        "0,.5,1,2,4); '' skips the norm", lo=0.0, hi=1e6, sort=True, metavar="EPS,...")
    refine_steps: tuple[int, ...] = option((0, 1, 10), "--refine-steps",
                                           "SGLD refinement steps before classifying (paper 0,1,10)",
                                           lo=0, hi=100_000, sort=True, min_len=1, metavar="K,...")
    pgd_steps: int | None = option(None, "--pgd-steps", "PGD iterations per restart (default 10 digits, 20 images)",
                                   lo=1, hi=100_000)
    pgd_restarts: int = option(1, "--pgd-restarts", "PGD runs from random starts (worst case counts)",
                               lo=1, hi=1000)
    pgd_step_rel: float | None = option(None, "--pgd-step-rel", "PGD step size / eps (default 2.5 / --pgd-steps)",
                                        gt=0.0, hi=1e3)
    eot: int = option(1, "--eot", "SGLD-noise draws averaged per attack gradient", lo=1, hi=1000)
    attack_n: int | None = option(None, "--attack-n", "test images attacked (default 100 digits, 300 images)",
                                  lo=1, hi=10_000_000)
    attack_batch: int = option(250, "--attack-batch", "rows per PGD batch", lo=1, hi=65536)
    inception_weights: str | None = option(None, "--inception-weights", "FID Inception weights for IS/FID (weights-inception-2015-12-05-6726825d.pth, torch-fidelity's layout; default: the torch hub cache)")
    gen_source: str = option("buffer", "--gen-source", "samples scored by IS/FID", choices=GEN_SOURCES)
    gen_n: int = option(5000, "--gen-n", "samples scored by IS/FID", lo=1, hi=1_000_000)
    is_splits: int = option(10, "--is-splits", "splits of the Inception Score's mean +- std", lo=1, hi=1000)
    eps: dict[str, list[float]] = field(default_factory=dict)  # norm -> eps list; see resolve_defaults
    model_flags: dict[str, Any] = field(default_factory=dict)  # dotted config keys of ORIGINAL_MODEL_KEYS given


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m jemfast.eval",
                      description="Evaluate a JEM checkpoint: accuracy, calibration, OOD detection, "
                                  "samples, adversarial robustness, IS/FID. Writes eval.json, report.md "
                                  "and PNGs.")
    add_flags(p, EvalOptions)
    original = p.add_argument_group(
        "original JEM checkpoints", "{'model_state_dict', 'replay_buffer'} files hold no configuration: give "
        "the train flags of their model (defaults: the original code's, --dataset cifar10 --model wrn --depth 28 "
        "--width 10 --norm none; a WRN is read with --wrn-layout original)")
    add_flags(p, Config, skip=[key for key in FLAGS_BY_KEY if key not in ORIGINAL_MODEL_KEYS],
              dest_prefix=ORIGINAL_PREFIX, group=original)
    return p


def options_from_args(argv: Sequence[str] | None = None) -> EvalOptions:
    """Parse ``argv`` into validated options (raises ValueError for bad values)."""
    args = build_parser().parse_args(argv)
    return validate(EvalOptions(**given_values(args, EvalOptions),
                                model_flags=given_values(args, Config, ORIGINAL_PREFIX)))


def validate(o: EvalOptions) -> EvalOptions:
    """Check every option, normalising values in place; raise ValueError naming the first bad
    one by its flag. Returns ``o``."""
    return check_fields(o)


def resolve_defaults(o: EvalOptions, dataset: str) -> EvalOptions:
    """Fill the dataset-dependent defaults (OOD sets, eps lists, attacked images)."""
    kind = dataset if dataset in DEFAULT_EPS else "images"
    if o.ood is None:
        o.ood = default_ood(dataset)
    o.eps = {norm: (list(given) if given is not None else list(DEFAULT_EPS[kind][norm]))
             for norm, given in (("linf", o.eps_linf), ("l2", o.eps_l2))}
    if o.attack_n is None:
        o.attack_n = DEFAULT_ATTACK_N[kind]
    if o.pgd_steps is None:
        o.pgd_steps = DEFAULT_PGD_STEPS[kind]
    if o.pgd_step_rel is None:
        o.pgd_step_rel = 2.5 / o.pgd_steps
    return o
