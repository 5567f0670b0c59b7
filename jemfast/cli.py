"""Command line of ``python -m jemfast.train``: flags -> validated :class:`Config`.

Precedence: the paper's defaults < the dataset's preset (digits, toy2d) < flags given.
Every user error becomes one line on stderr and exit code 2 (``run_cli``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from .config import BACKENDS, DATASETS, DEVICES, MODELS, NORMS, OPTIMIZERS, PRECISIONS, Config, apply_preset, set_dotted, validate
from .errors import DivergenceExhausted, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like '50,100', got {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# (flag, config field, type, help). Types: int, float, str, _bool; choices from config.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data-dir", "data.data_dir", str, "where torchvision datasets are downloaded"),
    ("--data-noise", "data.noise_std", float, "std of N(0, s) added to training images (paper 0.03)"),
    ("--augment", "data.augment", _bool, "flips/crops for CIFAR/SVHN"),
    ("--model", "model.name", str, f"classifier: {', '.join(MODELS)}"),
    ("--depth", "model.depth", int, "WRN depth (6n+4)"),
    ("--width", "model.width", int, "WRN widen factor"),
    ("--norm", "model.norm", str, f"WRN normalization: {', '.join(NORMS)}"),
    ("--dropout", "model.dropout", float, "WRN dropout rate"),
    ("--hidden", "model.hidden", int, "CNN first-layer channels / MLP width"),
    ("--epochs", "optim.epochs", int, "training epochs"),
    ("--batch-size", "optim.batch_size", int, "images per iteration (real and fake each)"),
    ("--lr", "optim.lr", float, "learning rate"),
    ("--optimizer", "optim.optimizer", str, f"{', '.join(OPTIMIZERS)}"),
    ("--momentum", "optim.momentum", float, "SGD momentum"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay"),
    ("--warmup-iters", "optim.warmup_iters", int, "linear learning-rate warm-up iterations"),
    ("--decay-epochs", "optim.decay_epochs", _epochs_list, "epochs at which lr is multiplied by --decay-rate"),
    ("--decay-rate", "optim.decay_rate", float, "learning-rate decay factor"),
    ("--sgld-steps", "sampler.n_steps", int, "SGLD steps per iteration"),
    ("--sgld-step-size", "sampler.step_size", float, "SGLD step size alpha"),
    ("--sgld-noise", "sampler.noise_std", float, "SGLD noise std sigma"),
    ("--buffer-size", "sampler.buffer_size", int, "replay buffer capacity"),
    ("--reinit-freq", "sampler.reinit_freq", float, "probability a drawn chain restarts from U(-1,1)"),
    ("--class-cond", "sampler.class_cond", _bool, "class-conditional buffer and SGLD"),
    ("--backend", "sampler.backend", str, f"SGLD backend: {', '.join(BACKENDS)}"),
    ("--p-x-weight", "loss.p_x_weight", float, "weight of the generative term E(real) - E(fake)"),
    ("--p-y-given-x-weight", "loss.p_y_given_x_weight", float, "weight of cross-entropy"),
    ("--check-every", "stability.check_every", int, "iterations between divergence checks"),
    ("--max-restarts", "stability.max_restarts", int, "automatic restarts after divergence"),
    ("--max-loss", "stability.max_loss", float, "|loss| above this counts as divergence"),
    ("--max-energy-gap", "stability.max_energy_gap", float, "|E(real)-E(fake)| above this counts as divergence"),
    ("--max-sample-abs", "stability.max_sample_abs", float, "max |x_fake| above this counts as divergence"),
    ("--max-grad-norm", "stability.max_grad_norm", float, "gradient L2 norm above this counts as divergence"),
    ("--relative-z", "stability.relative_z", float,
     "divergence: |E(real)-E(fake)| or grad norm this many robust stds (log scale) above its recent median (0: off)"),
    ("--relative-window", "stability.relative_window", int, "iterations of history for --relative-z"),
    ("--relative-warmup", "stability.relative_warmup", int, "iterations before --relative-z applies"),
    ("--inject-divergence", "stability.inject_divergence", int, "TESTING AID: make the run diverge at this iteration"),
    ("--device", "run.device", str, f"{', '.join(DEVICES)}"),
    ("--seed", "run.seed", int, "random seed"),
    ("--out", "run.out", str, "output directory"),
    ("--eval-every", "run.eval_every", int, "epochs between validation passes"),
    ("--sample-every", "run.sample_every", int, "iterations between sample grids"),
    ("--log-every", "run.log_every", int, "iterations between metrics.jsonl lines"),
    ("--ckpt-every", "run.ckpt_every", int, "iterations between mid-epoch checkpoints (0: epoch ends)"),
    ("--precision", "run.precision", str, f"{', '.join(PRECISIONS)}"),
    ("--threads", "run.threads", int, "torch CPU threads (0: auto, at most the CPUs this process may use)"),
]
SWITCHES = [
    ("--resume", "run.resume", "continue the run in --out from its last good checkpoint"),
    ("--overwrite", "run.overwrite", "replace a run already in --out"),
    ("--compile", "run.compile", "torch.compile the training step and use the fastest SGLD backend"),
    ("--channels-last", "run.channels_last", "channels-last memory format for conv nets"),
    ("--no-progress", None, "no progress bar"),
]


def build_parser(prog: str = "python -m jemfast.train") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Train a Joint Energy-based Model (JEM).")
    p.add_argument("--dataset", default=None, help=f"{', '.join(DATASETS)} (default cifar10)")
    for flag, _, typ, help_ in FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    for flag, _, help_ in SWITCHES:
        p.add_argument(flag, action="store_true", help=help_)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv`` into a validated Config (raises ValueError for bad values)."""
    args = build_parser().parse_args(argv)
    cfg = Config()
    if args.dataset is not None:
        cfg.data.dataset = args.dataset
    apply_preset(cfg)
    for flag, key, _, _ in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            set_dotted(cfg, key, value)
    for flag, key, _ in SWITCHES:
        if key is not None and getattr(args, flag[2:].replace("-", "_")):
            set_dotted(cfg, key, True)
    if args.no_progress:
        cfg.run.progress = False
    if cfg.run.compile and cfg.sampler.backend == "reference":
        cfg.sampler.backend = "auto"
    return validate(cfg)


def run_cli(fn: Callable[[], int], prog: str) -> int:
    """Run ``fn``; user errors print one line and return their exit code."""
    try:
        return fn()
    except ValueError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except (UserError, DivergenceExhausted) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.exit_code
