"""Run configuration: nested dataclasses, declared and validated in one place.

Each field carries its flag, help and bounds (:func:`jemfast.options.schema.option`); ``python -m
jemfast.train``'s flags and :func:`validate` are generated from them. Build configs with
:func:`build_config` (defaults < preset < dotted overrides), :meth:`Config.from_dict` or
:meth:`Config.with_overrides`; check single values with :func:`check_value`.

Defaults are the JEM paper's (WRN-28-10, batch 64, Adam 1e-4, 150 epochs, buffer 10,000,
reinit 0.05, 20 SGLD steps, step size 1, noise 0.01). The small embedded datasets (digits,
toy2d) carry their own presets (:data:`DATASET_PRESETS`) that a user's explicit flag overrides.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..process.errors import one_line
from .recipes import NAMES as RECIPE_NAMES, recipe_values
from .schema import Kind, check_field, check_fields, declared, label_of, option, show

DATASETS = ("cifar10", "cifar100", "svhn", "digits", "digits32", "toy2d")
MODELS = ("wrn", "cnn", "mlp")
NORMS = ("none", "batch", "group", "layer")
WRN_LAYOUTS = ("jemfast", "original")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "reference", "fused", "graph", "compile")
PRECISIONS = ("fp32", "bf16")
SGLD_INITS = ("buffer", "noise")
INIT_DISTS = ("uniform", "informative")
UPSCALES = ("bilinear", "nearest", "bicubic")
SGLD_MODES = ("eval", "train")


SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes seeds below 2**32


def _wrn_depth(d: int) -> str | None:
    return None if (d - 4) % 6 == 0 else f"WRN depth must be 6n+4 (10, 16, 22, 28, ...), got {d}"


def _not_empty(s: str) -> str | None:
    return None if s.strip() else "must be a directory path"


# Each field is declared once: default, flag, help and bounds (jemfast.options.schema.option). The
# command line (jemfast.options.cli) and validate() are generated from these declarations. Upper bounds
# keep absurd values (1e12 rows, 2**64 seeds) from reaching an allocator or an RNG.
@dataclass
class DataConfig:
    dataset: str = option("cifar10", "--dataset", "dataset (digits, digits32 and toy2d set their presets; digits32: the digits at 3x32x32)", choices=DATASETS)
    data_dir: str = option("./data", "--data-dir", "where torchvision datasets are downloaded", check=_not_empty)
    noise_std: float = option(0.03, "--data-noise", "std of N(0, s) added to training images (paper 0.03)",
                              lo=0.0, hi=10.0)
    augment: bool = option(True, "--augment", "flips/crops for CIFAR and digits32 (crops only for SVHN; the digits32 "
                           "preset sets false)")
    upscale: str = option("bilinear", "--upscale", "digits32: how the 8x8 digits are resized to 32x32",
                          choices=UPSCALES)
    n_valid: int = option(5000, "--n-valid", "images held out of the torchvision train split for validation",
                          lo=0, hi=10_000_000)
    num_workers: int = option(2, "--num-workers", "data loader worker processes", lo=0, hi=256)
    labels_per_class: int = option(0, "--labels-per-class",
                                   "semi-supervised: only this many training images per class keep their label "
                                   "(fixed stratified choice); every training image feeds p(x) as a separate "
                                   "batch (0: all labelled, one batch)", lo=0, hi=10_000_000)


@dataclass
class ModelConfig:
    name: str = option("wrn", "--model", "classifier", choices=MODELS)
    depth: int = option(28, "--depth", "WRN depth (6n+4)", lo=10, hi=1000, check=_wrn_depth)
    width: int = option(10, "--width", "WRN widen factor", lo=1, hi=64)
    norm: str = option("none", "--norm", "WRN normalization", choices=NORMS)
    dropout: float = option(0.0, "--dropout", "WRN dropout rate", lo=0.0, lt=1.0)
    wrn_layout: str = option("jemfast", "--wrn-layout",
                             "WRN block layout: jemfast (downsample in the first conv) or original (the original "
                             "JEM code's Wide_ResNet: downsample in the second conv, batch-norm momentum 0.9; "
                             "for converted original checkpoints, jemfast.compat)", choices=WRN_LAYOUTS)
    hidden: int = option(128, "--hidden", "CNN first-layer channels / MLP width", lo=1, hi=65536)


@dataclass
class OptimConfig:
    optimizer: str = option("adam", "--optimizer", "optimizer", choices=OPTIMIZERS)
    lr: float = option(1e-4, "--lr", "learning rate", gt=0.0, hi=10.0)
    momentum: float = option(0.9, "--momentum", "SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = option(0.0, "--weight-decay", "weight decay", lo=0.0, hi=10.0)
    epochs: int = option(150, "--epochs", "training epochs", lo=1, hi=100_000)
    batch_size: int = option(64, "--batch-size", "images per iteration (real and fake each)", lo=1, hi=65536)
    warmup_iters: int = option(1000, "--warmup-iters", "linear learning-rate warm-up iterations",
                               lo=0, hi=100_000_000)
    decay_epochs: tuple[int, ...] = option((50, 100), "--decay-epochs",
                                           "epochs at which lr is multiplied by --decay-rate", lo=1, hi=100_000,
                                           metavar="E1,E2,...")
    decay_rate: float = option(0.3, "--decay-rate", "learning-rate decay factor", gt=0.0, hi=10.0)
    sam_rho: float = option(0.0, "--sam-rho",
                            "sharpness-aware minimisation (SAM; SADA-JEM: 2 with --sam-adaptive): each step "
                            "takes the gradient at the worst weights within radius rho of the current ones; "
                            "two forward+backward passes of the loss per step (0: off)", lo=0.0, hi=1e3)
    sam_adaptive: bool = option(False, "--sam-adaptive",
                                "adaptive SAM (ASAM): the radius scales with each weight's magnitude",
                                action="store_true")


@dataclass
class SamplerConfig:
    n_steps: int = option(20, "--sgld-steps", "SGLD steps per iteration", lo=1, hi=100_000)
    step_size: float = option(1.0, "--sgld-step-size", "SGLD step size alpha (0: the chains are noise alone)",
                              lo=0.0, hi=1e6)
    noise_std: float = option(0.01, "--sgld-noise", "SGLD noise std sigma", lo=0.0, hi=1e3)
    buffer_size: int = option(10000, "--buffer-size", "replay buffer capacity (rows)", lo=1, hi=10_000_000)
    reinit_freq: float = option(0.05, "--reinit-freq", "probability a drawn chain restarts from U(-1,1)",
                                lo=0.0, hi=1.0)
    class_cond: bool = option(False, "--class-cond", "class-conditional buffer and SGLD")
    sgld_init: str = option("buffer", "--sgld-init",
                            "where chains start: buffer (PCD) or noise (short-run chains from the --init "
                            "distribution every iteration; the buffer is unused)", choices=SGLD_INITS)
    init_dist: str = option("uniform", "--init",
                            "distribution of fresh chains: uniform U(-1,1) or informative (JEM++: per-class "
                            "Gaussian fitted to the training split)", choices=INIT_DISTS)
    backend: str = option("reference", "--backend", "SGLD backend", choices=BACKENDS)
    grad_clip: float = option(0.0, "--sgld-grad-clip",
                              "proximal SGLD (JEM++: 1): dE/dx clamped elementwise to [-c, c] before each "
                              "step (0: off)", lo=0.0, hi=1e6)
    clamp: bool = option(False, "--sgld-clamp", "clamp the chains to [-1, 1] after each step (JEM++, SADA-JEM)")
    mode: str = option("eval", "--sgld-mode",
                       "the model's mode while sampling: eval (the paper's) or train (batch norm on batch "
                       "statistics, updating its running statistics: JEM++, SADA-JEM)", choices=SGLD_MODES)


@dataclass
class LossConfig:
    p_x_weight: float = option(1.0, "--p-x-weight", "weight of the generative term E(real) - E(fake)",
                               lo=0.0, hi=1e6)
    p_y_given_x_weight: float = option(1.0, "--p-y-given-x-weight", "weight of cross-entropy", lo=0.0, hi=1e6)
    p_x_given_y_weight: float = option(0.0, "--p-x-given-y-weight",
                                       "weight of the class-conditional term E(real, y) - E(fake_y, y) "
                                       "(fake_y sampled given y)", lo=0.0, hi=1e6)
    clf_only: bool = option(False, "--clf-only", "cross-entropy only: no SGLD, buffer unused "
                            "(p(x) and p(x|y) weights treated as 0)", action="store_true")
    energy_l2: float = option(0.0, "--energy-l2",
                              "L2 penalty on the p(x) term's energies: adds energy_l2 * (mean E(real)^2 + "
                              "mean E(fake)^2) (the original author's advice against divergence: ~0.1; "
                              "M-JEM: 0.5; 0: off)", lo=0.0, hi=1e6)
    px_augment: bool = option(True, "--px-augment",
                              "the p(x) term's real images are augmented (flips/crops) like the cross-entropy's; "
                              "false: they enter it un-augmented (SADA-JEM; one more forward of the batch "
                              "per step where augmentation is on)")


@dataclass
class StabilityConfig:
    """Divergence detection and automatic recovery (see jemfast.stability)."""

    check_every: int = option(10, "--check-every", "iterations between (host-synchronising) divergence checks",
                              lo=1, hi=1_000_000)
    max_restarts: int = option(4, "--max-restarts", "automatic restarts after divergence", lo=0, hi=1000)
    max_loss: float = option(1e4, "--max-loss", "|loss| above this counts as divergence", gt=0.0)
    max_energy_gap: float = option(1e4, "--max-energy-gap", "|E(real)-E(fake)| above this counts as divergence",
                                   gt=0.0)
    max_sample_abs: float = option(1e3, "--max-sample-abs", "max |x_fake| above this counts as divergence", gt=0.0)
    max_grad_norm: float = option(1e5, "--max-grad-norm", "gradient L2 norm above this counts as divergence",
                                  gt=0.0)
    # Relative tests (jemfast.stability.monitor): log(1 + |energy gap|) or log(1 + grad norm) more than
    # relative_z robust stds above its median over the last relative_window iterations.
    relative_z: float = option(8.0, "--relative-z",
                               "divergence: |E(real)-E(fake)| or the gradient norm this many robust stds (log "
                               "scale) above its median over the last --relative-window iterations (0: off)",
                               lo=0.0, hi=1e6)
    relative_window: int = option(200, "--relative-window", "iterations of history for --relative-z",
                                  lo=1, hi=100_000)
    relative_warmup: int = option(50, "--relative-warmup",
                                  "iterations seen before --relative-z applies (a rollback restores the history of the state it lands on)",
                                  lo=1, hi=100_000_000)
    good_ring: int = option(3, "--good-ring", "good checkpoints kept on disk", lo=1, hi=1000)
    snapshot_ring: int = option(5, "--snapshot-ring",
                                "good states kept in memory (the newest check's and older ones spaced more widely "
                                "with age), so a rollback reaches back before a collapse that took a while to "
                                "detect; each is a copy of model, optimizer and buffer", lo=1, hi=1000)
    inject_divergence: int = option(-1, "--inject-divergence",
                                    "TESTING AID: make the run diverge at this iteration (-1: never)", lo=-1)


@dataclass
class RunConfig:
    device: str = option("auto", "--device", "device", choices=DEVICES)
    seed: int = option(1, "--seed", "random seed", lo=0, hi=SEED_MAX)
    out: str = option("runs/jem", "--out", "output directory", check=_not_empty)
    resume: bool = option(False, "--resume", "continue the run in --out from its last good checkpoint",
                          action="store_true")
    overwrite: bool = option(False, "--overwrite", "replace a run already in --out", action="store_true")
    eval_every: int = option(1, "--eval-every", "epochs between validation passes", lo=1, hi=100_000)
    sample_every: int = option(500, "--sample-every", "iterations between sample grids (and at each epoch end)",
                               lo=1)
    log_every: int = option(10, "--log-every", "iterations between metrics.jsonl lines", lo=1)
    ckpt_every: int = option(0, "--ckpt-every", "iterations between mid-epoch checkpoints (0: epoch ends only)",
                             lo=0)
    precision: str = option("fp32", "--precision", "SGLD/model precision", choices=PRECISIONS)
    compile: bool = option(False, "--compile", "torch.compile the training step and use the fastest SGLD backend",
                           action="store_true")
    channels_last: bool = option(False, "--channels-last", "channels-last memory format for conv nets",
                                 action="store_true")
    progress: bool = option(True, "--no-progress", "no progress bar", action="store_false")
    threads: int = option(0, "--threads", "torch CPU threads (0: auto: torch's count, at most the CPUs this "
                          "process may use; jemfast.process.threads)", lo=0, hi=65536)
    recipe: str = option("none", "--recipe",
                         "a published JEM recipe's settings (after the dataset's preset, before the flags given; "
                         "docs/recipes.md and the list below): " + ", ".join(RECIPE_NAMES), choices=RECIPE_NAMES)


SECTIONS = ("data", "model", "optim", "sampler", "loss", "stability", "run")


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
        """``{section: {field: value}}`` of plain Python values (tuples stay tuples)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """The validated Config of a :meth:`to_dict` mapping (missing fields keep their
        defaults). Unknown sections or fields and bad values raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config: expected a mapping of sections, got {show(d)}")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"config: unknown section(s) {sorted(map(str, unknown))}")
        flat = {}
        for section, sub in d.items():
            if not isinstance(sub, Mapping):
                raise ValueError(f"config.{section}: expected a mapping of fields, got {show(sub)}")
            flat.update({f"{section}.{name}": v for name, v in sub.items()})
        return cls().with_overrides(flat)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A validated copy with dotted keys set: ``cfg.with_overrides({"sampler.n_steps": 40})``.
        A new ``run.recipe`` among them sets the recipe's values first (jemfast.options.recipes),
        the other keys given win over it."""
        cfg = copy.deepcopy(self)
        recipe = overrides.get("run.recipe", cfg.run.recipe)
        if recipe != cfg.run.recipe:
            recipe = check_value("run.recipe", recipe)
            preset = DATASET_PRESETS.get(cfg.data.dataset, {})
            if preset and "optim.epochs" in overrides:  # the decay epochs scale to the run's length
                preset = {**preset, "optim.epochs": overrides["optim.epochs"]}
            for key, value in recipe_values(recipe, preset, cfg.optim.optimizer).items():
                set_dotted(cfg, key, value)
        for key, value in overrides.items():
            set_dotted(cfg, key, value)
        return validate(cfg)


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
    # The natural-divergence benchmark's setting (docs/stability.md): the paper's
    # architecture family (WRN without normalisation) at a CPU size; plain JEM diverges here.
    "digits32": {
        "data.augment": False,
        "model.name": "wrn",
        "model.depth": 10,
        "model.width": 2,
        "model.norm": "none",
        "optim.epochs": 12,
        "optim.lr": 1e-3,
        "optim.batch_size": 32,
        "optim.warmup_iters": 20,
        # lr x0.3 at epochs 8 and 10: at a constant 1e-3 the accuracy swings 10-20 points from one
        # epoch to the next (measured: 74, 60, 84, 78 %), and 8 epochs with one decay still ended
        # on the rise (83-95 % test over 11 seeds), both more than the differences being measured
        "optim.decay_epochs": (8, 10),
        "sampler.buffer_size": 1000,
        "sampler.n_steps": 5,
        "run.sample_every": 200,
        "run.out": "runs/digits32",
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
    """Set ``cfg.<section>.<field> = value`` (unchecked; :func:`validate` checks)."""
    section, _, name = str(key).partition(".")
    sub = getattr(cfg, section, None) if section in SECTIONS else None
    if sub is None or name not in {f.name for f in dataclasses.fields(sub)}:
        raise ValueError(f"{one_line(repr(key), 80)}: no such config field (section.field, e.g. sampler.n_steps)")
    setattr(sub, name, value)


def apply_preset(cfg: Config) -> Config:
    """Apply the dataset's preset to ``cfg`` in place (fields a user sets afterwards win)."""
    for key, value in DATASET_PRESETS.get(cfg.data.dataset, {}).items():
        set_dotted(cfg, key, value)
    return cfg


def build_config(overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated Config of the paper's defaults < the dataset's preset < ``overrides``
    (dotted keys; ``data.dataset`` among them picks the preset). ``run.compile`` with the
    reference SGLD backend switches to ``auto`` (the fastest available), as ``--compile`` says."""
    overrides = dict(overrides or {})
    cfg = Config()
    if "data.dataset" in overrides:
        cfg.data.dataset = check_value("data.dataset", overrides["data.dataset"])
    cfg = apply_preset(cfg).with_overrides(overrides)
    if cfg.run.compile and cfg.sampler.backend == "reference":
        cfg.sampler.backend = "auto"
    return cfg


_FIELDS = {key: (f, kind) for key, f, kind in declared(Config)}
FLAGS_BY_KEY = {key: f.metadata["flag"] for key, (f, _) in _FIELDS.items()}


def field_rules(key: str) -> dict[str, Any]:
    """The declaration of config field ``key`` (dotted): flag, help, bounds, choices."""
    if key not in _FIELDS:
        raise ValueError(f"{one_line(repr(key), 80)}: no such config field (section.field, e.g. sampler.n_steps)")
    return dict(_FIELDS[key][0].metadata)


def field_kind(key: str) -> Kind:
    """The type of config field ``key`` (dotted)."""
    field_rules(key)
    return _FIELDS[key][1]


def check_value(key: str, value: Any, name: str | None = None) -> Any:
    """``value`` checked against config field ``key``'s declaration and normalised to plain
    Python types (numpy scalars become int/float). Library classes call this so their argument
    checks are the config's: ``check_value("sampler.n_steps", n_steps, "n_steps")``. ``name``
    replaces the flag in the message. Raises ValueError."""
    f, kind = _FIELDS.get(key, (None, None))
    if f is None:
        field_rules(key)
    return check_field(f.metadata, kind, value, name or label_of(key, f, True), key)


def validate(cfg: Config) -> Config:
    """Check every field against its declaration, normalising values in place to plain Python
    types; raise ValueError naming the first bad one by flag and field. Returns ``cfg``."""
    if not isinstance(cfg, Config):
        raise ValueError(f"config: expected a Config, got {show(cfg)}")
    check_fields(cfg)
    if cfg.sampler.class_cond and cfg.sampler.buffer_size < 2:
        raise ValueError("--buffer-size (sampler.buffer_size): class-conditional sampling needs room for every class")
    if (cfg.loss.p_x_given_y_weight > 0 and not cfg.loss.clf_only and cfg.sampler.sgld_init == "buffer"
            and not cfg.sampler.class_cond):
        raise ValueError("--p-x-given-y-weight (loss.p_x_given_y_weight) > 0 samples given y from the buffer: "
                         "add --class-cond (or use --sgld-init noise)")
    return cfg
