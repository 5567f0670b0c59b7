"""The JEM family's published training recipes, one flag away: ``--recipe jem|jempp|sadajem|mjem``.

Each recipe is its authors' CIFAR-10 setting, read from their code (command lines in the READMEs
and scripts, argparse defaults where those set nothing); :data:`RECIPES` holds every value with
the file it comes from. Precedence: the paper's defaults < the dataset's preset < the recipe <
the flags given. On a dataset with its own preset (digits, digits32, toy2d) the recipe keeps the
preset's scale (epochs, batch size, warm-up, buffer size, WRN depth and width, whether it augments;
the lr too when the recipe's optimizer is the preset's) and the lr decay
epochs move to the same fractions of the run; on CIFAR-10/100 and SVHN it is the recipe as
published. docs/recipes.md is the readable form of this table.

Where jemfast cannot do exactly what a recipe's code does, the nearest setting is used and said:
JEM++'s 10 x 5 "PYLD" inner steps of 0.2 x clamp(grad, -1, 1) with one gradient per outer step
are 10 steps of 1.0 x clamp(grad, -1, 1); M-JEM's one Gaussian over all training images is the
per-class informative init, its separate energy head the logsumexp energy, its L2 penalty
weight 0.5 on jemfast's mean E(real)^2 + mean E(fake)^2.
"""
from __future__ import annotations

from typing import Any

NAMES = ("none", "jem", "jempp", "sadajem", "mjem")
SCALE_KEYS = ("optim.epochs", "optim.batch_size", "optim.warmup_iters", "sampler.buffer_size", "model.depth",
              "model.width", "data.augment")  # a dataset preset's own scale (and augmentation) wins over the recipe's
JEM = "wgrathwohl/JEM README.md:20, train_wrn_ebm.py argparse defaults"
JEMPP = "sndnyang/JEMPP README.md:21-35 (= scripts/jempp_cifar10.sh), train_jempp.py defaults"
SADAJEM = "sndnyang/SADAJEM readme.md:21-33 (= scripts/sadajem_cifar10.sh), train_sadajem.py defaults"
MJEM = "sndnyang/mebm scripts/majem_cifar10.sh, train_maebm.py defaults"

# name -> (what it is, {dotted key: value}, source)
RECIPES: dict[str, tuple[str, dict[str, Any], str]] = {
    "jem": ("JEM (Grathwohl et al. 2020): Adam, no normalisation, 20 SGLD steps from U(-1, 1)", {
        "optim.optimizer": "adam", "optim.lr": 1e-4, "optim.weight_decay": 0.0, "optim.epochs": 200,
        "optim.batch_size": 64, "optim.warmup_iters": 1000, "optim.decay_epochs": (160, 180),
        "optim.decay_rate": 0.3, "optim.sam_rho": 0.0, "model.depth": 28, "model.width": 10,
        "model.norm": "none", "sampler.n_steps": 20, "sampler.step_size": 1.0, "sampler.noise_std": 0.01,
        "sampler.grad_clip": 0.0, "sampler.clamp": False, "sampler.mode": "eval", "sampler.buffer_size": 10000,
        "sampler.reinit_freq": 0.05, "sampler.init_dist": "uniform", "loss.px_augment": True,
        "loss.energy_l2": 0.0, "data.noise_std": 0.03, "data.augment": True}, JEM),
    "jempp": ("JEM++ (Yang & Ji 2021): SGD with batch norm, proximal SGLD (10 steps, clipped gradient), "
              "informative init, sampling in train mode", {
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 4e-4,
        "optim.epochs": 150, "optim.batch_size": 64, "optim.warmup_iters": 1000,
        "optim.decay_epochs": (50, 100, 125), "optim.decay_rate": 0.2, "optim.sam_rho": 0.0,
        "model.depth": 28, "model.width": 10, "model.norm": "batch", "sampler.n_steps": 10,
        "sampler.step_size": 1.0, "sampler.noise_std": 0.0, "sampler.grad_clip": 1.0, "sampler.clamp": True,
        "sampler.mode": "train", "sampler.buffer_size": 10000, "sampler.reinit_freq": 0.05,
        "sampler.init_dist": "informative", "loss.px_augment": True, "loss.energy_l2": 0.0,
        "data.noise_std": 0.03, "data.augment": True}, JEMPP),
    "sadajem": ("SADA-JEM (Yang et al. 2023): JEM++ with adaptive SAM (rho 2), 5 steps, no noise, "
                "no augmentation in p(x)", {
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
        "optim.epochs": 200, "optim.batch_size": 64, "optim.warmup_iters": 1000,
        "optim.decay_epochs": (60, 120, 180), "optim.decay_rate": 0.2, "optim.sam_rho": 2.0,
        "optim.sam_adaptive": True, "model.depth": 28, "model.width": 10, "model.norm": "batch",
        "sampler.n_steps": 5, "sampler.step_size": 1.0, "sampler.noise_std": 0.0, "sampler.grad_clip": 1.0,
        "sampler.clamp": True, "sampler.mode": "train", "sampler.buffer_size": 10000,
        "sampler.reinit_freq": 0.05, "sampler.init_dist": "informative", "loss.px_augment": False,
        "loss.energy_l2": 0.0, "data.noise_std": 0.0, "data.augment": True}, SADAJEM),
    "mjem": ("M-JEM (Yang et al., sndnyang/mebm): SADA-JEM's sampler without SAM, 5 steps with noise 0.001, "
             "energy L2 penalty 0.5", {
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
        "optim.epochs": 200, "optim.batch_size": 64, "optim.warmup_iters": 1000,
        "optim.decay_epochs": (60, 120, 180), "optim.decay_rate": 0.2, "optim.sam_rho": 0.0,
        "model.depth": 28, "model.width": 10, "model.norm": "batch", "sampler.n_steps": 5,
        "sampler.step_size": 1.0, "sampler.noise_std": 0.001, "sampler.grad_clip": 1.0, "sampler.clamp": True,
        "sampler.mode": "train", "sampler.buffer_size": 10000, "sampler.reinit_freq": 0.05,
        "sampler.init_dist": "informative", "loss.px_augment": False, "loss.energy_l2": 0.5,
        "data.noise_std": 0.0, "data.augment": True}, MJEM),
}


def recipe_values(name: str, preset: dict[str, Any], optimizer: str = "adam") -> dict[str, Any]:
    """The dotted settings ``--recipe name`` applies on top of the dataset's ``preset`` (empty for
    the CIFAR-scale datasets), whose optimizer is ``optimizer``: the recipe's, less the preset's
    scale (:data:`SCALE_KEYS`; and its lr, when the recipe uses the preset's optimizer: the
    digits presets' Adam lr 1e-3 is JEM's 1e-4 at a CPU budget), with the decay epochs at the
    recipe's fractions of the preset's epochs (the run's, when ``--epochs`` is given)."""
    if name == "none":
        return {}
    values = dict(RECIPES[name][1])
    if not preset:
        return values
    for key in SCALE_KEYS:
        values.pop(key, None)
    if values["optim.optimizer"] == optimizer and "optim.lr" in preset:
        values.pop("optim.lr")
    epochs = preset.get("optim.epochs")
    if epochs is not None:
        total = RECIPES[name][1]["optim.epochs"]
        values["optim.decay_epochs"] = tuple(sorted({max(1, round(d / total * epochs))
                                                     for d in RECIPES[name][1]["optim.decay_epochs"]}))
    if preset.get("model.name", "wrn") != "wrn":  # a CNN or MLP preset has no WRN normalisation switch
        values.pop("model.norm", None)
    return values


def describe(name: str, flags: dict[str, str]) -> str:
    """One paragraph for ``--help``: what the recipe is and every setting it makes, as the flags
    ``flags`` (dotted key -> flag) would set them."""
    what, values, source = RECIPES[name]
    settings = " ".join(f"{flags[k]} {' '.join(map(str, v)) if isinstance(v, tuple) else str(v).lower()}"
                        for k, v in values.items())
    return f"{name}: {what}. CIFAR-10: {settings}. From {source}."
