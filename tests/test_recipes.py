"""--recipe jem|jempp|sadajem|mjem: each recipe's settings against the values docs/recipes.md
documents from its source, how it scales to the embedded datasets, and what wins over what."""
from __future__ import annotations

import re

import pytest
import torch

from jemfast.build import build_sampler
from jemfast.options.cli import build_parser, config_from_args
from jemfast.options.config import FLAGS_BY_KEY, build_config
from jemfast.options.recipes import RECIPES
from tests.conftest import REPO

KEY_BY_FLAG = {flag: key for key, flag in FLAGS_BY_KEY.items()}


def documented() -> dict[str, dict[str, str]]:
    """docs/recipes.md's settings table: ``{recipe: {flag: value as written}}``."""
    text = (REPO / "docs" / "recipes.md").read_text()
    rows = re.findall(r"^\| `(--[\w-]+)`(?: / `(--[\w-]+)`)? \|(.*)\|$", text, re.M)
    names = ["jem", "jempp", "sadajem", "mjem"]
    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for flag, flag2, cells in rows:
        for name, cell in zip(names, (c.strip() for c in cells.split("|"))):
            if flag2:
                out[name][flag], out[name][flag2] = (v.strip() for v in cell.split("/"))
            else:
                out[name][flag] = cell
    return out


def shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value).lower()


@pytest.mark.parametrize("recipe", ["jem", "jempp", "sadajem", "mjem"])
def test_each_recipe_sets_the_values_documented_from_its_source(recipe):
    table = documented()[recipe]
    assert len(table) >= 23, sorted(table)
    cfg = build_config({"data.dataset": "cifar10", "run.recipe": recipe})
    for flag, value in table.items():
        section, name = KEY_BY_FLAG[flag].split(".")
        assert shown(getattr(getattr(cfg, section), name)) == value, (recipe, flag)
    # every setting the recipe makes is in the documented table (or the notes under it)
    undocumented = {FLAGS_BY_KEY[k] for k in RECIPES[recipe][1]} - set(table) - {"--momentum", "--sam-adaptive",
                                                                                  "--augment"}
    assert not undocumented
    assert cfg.optim.sam_adaptive == (recipe == "sadajem") and cfg.data.augment and cfg.optim.momentum == 0.9


def test_on_digits32_a_recipe_keeps_the_presets_scale_and_moves_the_decays_to_the_same_fractions():
    preset = build_config({"data.dataset": "digits32"})
    jem = build_config({"data.dataset": "digits32", "run.recipe": "jem"})
    sada = build_config({"data.dataset": "digits32", "run.recipe": "sadajem"})
    for cfg in (jem, sada):
        assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.warmup_iters, cfg.sampler.buffer_size,
                cfg.model.depth, cfg.model.width, cfg.data.augment) == (12, 32, 20, 1000, 10, 2, False)
    assert jem.optim.lr == preset.optim.lr == 1e-3  # Adam, as the preset: its lr is the dataset's
    assert jem.optim.decay_epochs == (10, 11) and jem.sampler.n_steps == 20  # 160/200 and 180/200 of 12
    assert sada.optim.lr == 0.1 and sada.optim.optimizer == "sgd" and sada.optim.decay_epochs == (4, 7, 11)
    assert (sada.model.norm, sada.sampler.mode, sada.sampler.clamp, sada.optim.sam_rho) == ("batch", "train", True, 2.0)
    digits = build_config({"data.dataset": "digits", "run.recipe": "jempp"})
    assert digits.model.name == "cnn" and digits.optim.epochs == 30 and digits.optim.decay_epochs == (10, 20, 25)


def test_the_flags_given_win_over_the_recipe_and_the_recipe_over_the_preset():
    cfg = config_from_args(["--dataset", "digits32", "--recipe", "sadajem", "--sam-rho", "0.5", "--sgld-steps", "3"])
    assert (cfg.optim.sam_rho, cfg.sampler.n_steps, cfg.run.recipe) == (0.5, 3, "sadajem")
    assert cfg.model.norm == "batch"  # the recipe's, over the preset's none
    assert "mjem: M-JEM" in build_parser().format_help()  # --help names every recipe's settings
    short = config_from_args(["--dataset", "digits32", "--recipe", "jempp", "--epochs", "6"])
    assert short.optim.decay_epochs == (2, 4, 5)  # 50, 100, 125 of 150 -> of the run's 6 epochs
    fixed = config_from_args(["--dataset", "digits32", "--recipe", "jempp", "--epochs", "6", "--decay-epochs", "3"])
    assert fixed.optim.decay_epochs == (3,)


def test_a_search_over_recipes_applies_each_recipes_settings():
    base = build_config({"data.dataset": "digits32", "optim.epochs": 2})
    trial = base.with_overrides({"run.recipe": "mjem", "sampler.n_steps": 2})
    assert (trial.loss.energy_l2, trial.sampler.noise_std, trial.sampler.n_steps, trial.optim.epochs) == (0.5, 0.001, 2, 2)
    same = trial.with_overrides({"optim.lr": 0.05})  # the recipe already in effect is not re-applied
    assert same.optim.lr == 0.05 and same.sampler.n_steps == 2
    with pytest.raises(ValueError, match="recipe"):
        base.with_overrides({"run.recipe": "jem2"})


def test_the_sampler_runs_in_the_recipes_mode_and_clamps_its_chains():
    cfg = build_config({"data.dataset": "digits", "run.recipe": "jempp"})
    sgld = build_sampler(cfg)
    assert (sgld.mode, sgld.clamp, sgld.grad_clip, sgld.n_steps, sgld.noise_std) == ("train", True, 1.0, 10, 0.0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 10))
    from jemfast import JEM

    model = JEM(net).eval()
    before = net[1].running_mean.clone()
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    x = sgld.run(model, torch.rand(8, 1, 8, 8) * 4 - 2)  # starts outside [-1, 1]
    assert x.abs().max() <= 1.0  # clamped after each step
    assert seen == [True] * 10  # batch norm ran on batch statistics (train mode) at every step
    assert torch.equal(net[1].running_mean, before)  # its running statistics stay the training data's
    assert not model.training  # and the mode was restored


def test_jemfast_tune_searches_over_recipes():
    from jemfast.tune.space import build_space, trial_overrides

    base = build_config({"data.dataset": "digits32", "run.progress": False})
    space = build_space(base, {"recipe": "choice:jem,sadajem,mjem"}, set())
    assert space["recipe"].values == ("jem", "sadajem", "mjem")
    trial = base.with_overrides(trial_overrides(space, {"recipe": "sadajem"}))
    assert (trial.run.recipe, trial.optim.sam_rho, trial.loss.px_augment) == ("sadajem", 2.0, False)
    with pytest.raises(ValueError, match="recipe"):
        build_space(base, {"recipe": "choice:jem,jem3"}, set())
