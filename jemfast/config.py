"""Run configuration: nested dataclasses, validated in one place (:func:`validate`).

Defaults are the JEM paper's (WRN-28-10, batch 64, Adam 1e-4, 150 epochs, buffer 10,000,
reinit 0.05, 20 SGLD steps, step size 1, noise 0.01). The small embedded datasets (digits,
toy2d) carry their own presets (:data:`DATASET_PRESETS`) that a user's explicit flag overrides.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("cifar10", "cifar100", "svhn", "digits", "toy2d")
MODELS = ("wrn", "cnn", "mlp")
NORMS = ("none", "batch", "group", "layer")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "reference", "fused", "graph", "compile")
PRECISIONS = ("fp32", "bf16")


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str = "./data"
    noise_std: float = 0.03  # N(0, sigma) added to training images (paper: 0.03)
    augment: bool = True  # flips/crops for CIFAR (crops only for SVHN)
    n_valid: int = 5000  # images held out of the torchvision train split for validation
    num_workers: int = 2


@dataclass
class ModelConfig:
    name: str = "wrn"
    depth: int = 28
    width: int = 10
    norm: str = "none"
    dropout: float = 0.0
    hidden: int = 128  # width of the CNN's first layer / the MLP's hidden layers


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 150
    batch_size: int = 64
    warmup_iters: int = 1000
    decay_epochs: tuple[int, ...] = (50, 100)
    decay_rate: float = 0.3


@dataclass
class SamplerConfig:
    n_steps: int = 20
    step_size: float = 1.0
    noise_std: float = 0.01
    buffer_size: int = 10000
    reinit_freq: float = 0.05
    class_cond: bool = False
    backend: str = "reference"


@dataclass
class LossConfig:
    p_x_weight: float = 1.0
    p_y_given_x_weight: float = 1.0


@dataclass
class StabilityConfig:
    """Divergence detection and automatic recovery (see jemfast.stability)."""

    check_every: int = 10  # iterations between (host-synchronising) reads of the flags
    max_restarts: int = 4
    max_loss: float = 1e4  # |loss| above this is divergence
    max_energy_gap: float = 1e4  # |E(real) - E(fake)| above this is divergence
    max_sample_abs: float = 1e3  # max |x_fake| above this is divergence
    max_grad_norm: float = 1e5  # global gradient L2 norm above this is divergence
    # Relative tests (jemfast.stability): log(1 + |energy gap|) or log(1 + grad norm) more than
    # relative_z robust stds above the median of the last relative_window iterations.
    relative_z: float = 8.0  # 0 turns the relative tests off
    relative_window: int = 200  # iterations of history
    relative_warmup: int = 50  # iterations seen before the relative tests start
    good_ring: int = 3  # good checkpoints kept on disk
    inject_divergence: int = -1  # testing aid: make the run diverge at this iteration


@dataclass
class RunConfig:
    device: str = "auto"
    seed: int = 1
    out: str = "runs/jem"
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 1  # epochs between validation passes
    sample_every: int = 500  # iterations between sample-grid PNGs (and at each epoch end)
    log_every: int = 10  # iterations between metrics.jsonl lines
    ckpt_every: int = 0  # iterations between mid-epoch checkpoints (0: epoch ends only)
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    progress: bool = True
    threads: int = 0  # torch CPU threads; 0: auto (jemfast.threads)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = d.get(f.name, {})
            sub_cls = type(getattr(cls(), f.name))
            names = {sf.name for sf in dataclasses.fields(sub_cls)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"{f.name}: unknown field(s) {sorted(unknown)}")
            sub = dict(sub)
            if "decay_epochs" in sub:
                sub["decay_epochs"] = tuple(sub["decay_epochs"])
            kwargs[f.name] = sub_cls(**sub)
        return cls(**kwargs)


# Presets for the embedded datasets, chosen so the quickstart trains in minutes on a CPU.
# Dotted keys: section.field. Applied by :func:`apply_preset` before the user's flags.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "model.name": "cnn",
        "model.hidden": 64,
        "optim.epochs": 30,
        "optim.lr": 1e-3,
        "optim.warmup_iters": 100,
        "optim.decay_epochs": (20, 25),
        "sampler.buffer_size": 2000,
        "run.sample_every": 200,
        "run.out": "runs/digits",
    },
    "toy2d": {
        "model.name": "mlp",
        "model.hidden": 128,
        "data.noise_std": 0.0,
        "optim.epochs": 15,
        "optim.lr": 1e-4,  # 1e-3 diverges within 300 iterations (measured)
        "optim.warmup_iters": 50,
        "optim.decay_epochs": (),
        "sampler.buffer_size": 2000,
        "sampler.step_size": 0.005,
        "sampler.noise_std": 0.1,  # sqrt(2 * step_size): proper Langevin in 2-D
        "run.sample_every": 200,
        "run.out": "runs/toy2d",
    },
}


def set_dotted(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".")
    sub = getattr(cfg, section)
    if not hasattr(sub, name):
        raise ValueError(f"{key}: no such config field")
    setattr(sub, name, value)


def apply_preset(cfg: Config) -> Config:
    """Apply the dataset's preset to ``cfg`` in place (fields a user sets afterwards win)."""
    for key, value in DATASET_PRESETS.get(cfg.data.dataset, {}).items():
        set_dotted(cfg, key, value)
    return cfg


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {msg}")


def _finite(name: str, v: float) -> None:
    _check(isinstance(v, (int, float)) and math.isfinite(v), name, f"must be a finite number, got {v!r}")


def _positive(name: str, v: float) -> None:
    _finite(name, v)
    _check(v > 0, name, f"must be > 0, got {v!r}")


def _choice(name: str, v: str, options: tuple[str, ...]) -> None:
    _check(v in options, name, f"must be one of {', '.join(options)}; got {v!r}")


def validate(cfg: Config) -> Config:
    """Check every field; raise ValueError naming the first bad one. Returns ``cfg``."""
    d, m, o, s, l, st, r = cfg.data, cfg.model, cfg.optim, cfg.sampler, cfg.loss, cfg.stability, cfg.run
    _choice("dataset", d.dataset, DATASETS)
    _finite("data.noise_std", d.noise_std)
    _check(d.noise_std >= 0, "data.noise_std", "must be >= 0")
    _check(d.n_valid >= 0, "data.n_valid", "must be >= 0")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _choice("model", m.name, MODELS)
    _choice("model.norm", m.norm, NORMS)
    _check(m.depth >= 10 and (m.depth - 4) % 6 == 0, "model.depth", f"WRN depth must be 6n+4 >= 10, got {m.depth}")
    _check(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
    _check(m.hidden >= 1, "model.hidden", f"must be >= 1, got {m.hidden}")
    _finite("model.dropout", m.dropout)
    _check(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _choice("optimizer", o.optimizer, OPTIMIZERS)
    _positive("lr", o.lr)
    _finite("momentum", o.momentum)
    _finite("weight_decay", o.weight_decay)
    _check(o.weight_decay >= 0, "weight_decay", "must be >= 0")
    _check(o.epochs >= 1, "epochs", f"must be >= 1, got {o.epochs}")
    _check(o.batch_size >= 1, "batch_size", f"must be >= 1, got {o.batch_size}")
    _check(o.warmup_iters >= 0, "warmup_iters", f"must be >= 0, got {o.warmup_iters}")
    _check(all(e >= 1 for e in o.decay_epochs), "decay_epochs", "must be positive epochs")
    _positive("decay_rate", o.decay_rate)
    _check(s.n_steps >= 1, "sgld_steps", f"must be >= 1, got {s.n_steps}")
    _positive("sgld_step_size", s.step_size)
    _finite("sgld_noise", s.noise_std)
    _check(s.noise_std >= 0, "sgld_noise", f"must be >= 0, got {s.noise_std}")
    _check(s.buffer_size >= 1, "buffer_size", f"must be >= 1, got {s.buffer_size}")
    _finite("reinit_freq", s.reinit_freq)
    _check(0 <= s.reinit_freq <= 1, "reinit_freq", f"must be in [0, 1], got {s.reinit_freq}")
    _choice("backend", s.backend, BACKENDS)
    _finite("p_x_weight", l.p_x_weight)
    _finite("p_y_given_x_weight", l.p_y_given_x_weight)
    _check(l.p_x_weight >= 0 and l.p_y_given_x_weight >= 0, "loss weights", "must be >= 0")
    _check(st.check_every >= 1, "check_every", f"must be >= 1, got {st.check_every}")
    _check(st.max_restarts >= 0, "max_restarts", f"must be >= 0, got {st.max_restarts}")
    for name in ("max_loss", "max_energy_gap", "max_sample_abs", "max_grad_norm"):
        _positive(name, getattr(st, name))
    _finite("relative_z", st.relative_z)
    _check(st.relative_z >= 0, "relative_z", f"must be >= 0 (0: off), got {st.relative_z!r}")
    _check(st.relative_window >= 1, "relative_window", f"must be >= 1, got {st.relative_window}")
    _check(st.relative_warmup >= 1, "relative_warmup", f"must be >= 1, got {st.relative_warmup}")
    _check(st.good_ring >= 1, "good_ring", f"must be >= 1, got {st.good_ring}")
    _choice("device", r.device, DEVICES)
    _check(r.seed >= 0, "seed", f"must be >= 0, got {r.seed}")
    _check(bool(r.out), "out", "must be a directory path")
    _check(r.eval_every >= 1, "eval_every", f"must be >= 1, got {r.eval_every}")
    _check(r.sample_every >= 1, "sample_every", f"must be >= 1, got {r.sample_every}")
    _check(r.log_every >= 1, "log_every", f"must be >= 1, got {r.log_every}")
    _check(r.ckpt_every >= 0, "ckpt_every", f"must be >= 0, got {r.ckpt_every}")
    _choice("precision", r.precision, PRECISIONS)
    _check(r.threads >= 0, "threads", f"must be >= 0 (0: auto), got {r.threads}")
    if s.class_cond and s.buffer_size < 2:
        raise ValueError("buffer_size: class-conditional sampling needs room for every class")
    return cfg
