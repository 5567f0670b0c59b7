"""Configuration declared once on the dataclass fields: the flags, validation, from_dict/overrides,
normalisation to plain Python types and check_value are all generated from those declarations."""
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from jemfast.eval.options import (ORIGINAL_MODEL_KEYS, EvalOptions, options_from_args,
                                  build_parser as eval_parser)
from jemfast.options.cli import build_parser, config_from_args
from jemfast.options.config import (DATASET_PRESETS, FLAGS_BY_KEY, SEED_MAX, Config, build_config,
                                    check_value, field_rules, validate)
from jemfast.options.schema import declared, to_argv
from jemfast.process.errors import one_line


def flags_of(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("cls,parser", [(Config, build_parser), (EvalOptions, eval_parser)])
def test_every_declared_field_is_a_flag_and_every_flag_a_field(cls, parser):
    declared_flags = {f.metadata["flag"] for _, f, _ in declared(cls)}
    assert len(declared_flags) == len(list(declared(cls)))  # no flag declared twice
    # jemfast.eval also takes the Config flags that build an original JEM checkpoint's model
    borrowed = {FLAGS_BY_KEY[k] for k in ORIGINAL_MODEL_KEYS} if cls is EvalOptions else set()
    assert not borrowed & declared_flags
    assert flags_of(parser()) - {"-h", "--help"} == declared_flags | borrowed


def test_every_config_field_is_declared():
    """No field escapes validation: every leaf of Config carries a declaration."""
    leaves = {f"{s}.{k}" for s, sub in Config().to_dict().items() for k in sub}
    assert {key for key, _, _ in declared(Config)} == leaves


def test_help_shows_bounds_choices_and_defaults():
    text = build_parser().format_help()
    assert "--sgld-steps N" in text and "[1, 100000]" in text and "default 20" in text
    assert "{wrn,cnn,mlp}" in text and "[0, 1)" in text  # dropout: 1 excluded


def bad_values() -> list[tuple[str, str, object]]:
    """(dotted key, flag, a value outside its rules) for every declared field with a rule."""
    out = []
    for key, f, kind in declared(Config):
        m = f.metadata
        if m.get("choices"):
            bad = "no-such-choice"
        elif "lo" in m:
            bad = m["lo"] - 1
        elif "gt" in m:
            bad = m["gt"]
        elif kind.base is bool:
            bad = "yes"
        else:
            continue
        out.append((key, m["flag"], (bad,) if kind.seq else bad))
    return out


@pytest.mark.parametrize("key,flag,bad", bad_values(), ids=[b[0] for b in bad_values()])
def test_a_bad_value_names_its_flag_and_field(key, flag, bad):
    with pytest.raises(ValueError) as info:
        Config().with_overrides({key: bad})
    assert str(info.value).startswith(f"{flag} ({key}): ")


@pytest.mark.parametrize("key,value,message", [
    ("sampler.n_steps", 0, "--sgld-steps (sampler.n_steps): must be >= 1, got 0"),
    ("run.seed", 10**15, f"--seed (run.seed): must be <= {SEED_MAX}, got 1000000000000000"),
    ("run.seed", 2**32, "must be <= 4294967295"),
    ("sampler.buffer_size", 10**12, "must be <= 10000000"),
    ("model.hidden", 10**12, "must be <= 65536"),
    ("optim.lr", float("nan"), "--lr (optim.lr): must be a finite number, got nan"),
    ("optim.lr", 0.0, "--lr (optim.lr): must be > 0, got 0.0"),
    ("model.dropout", 1.0, "must be < 1, got 1.0"),
    ("sampler.n_steps", 2.5, "must be an integer, got 2.5"),
    ("sampler.n_steps", True, "must be an integer, got True"),
    ("sampler.n_steps", "20", "must be an integer, got '20'"),
    ("sampler.n_steps", 10**400, "must be <= 100000, got 1e+400"),
    ("optim.lr", 10**400, "must be a finite number"),
    ("optim.decay_epochs", 50, "must be a list of integers, got 50"),
    ("data.augment", 1, "must be true or false, got 1"),
    ("model.depth", 27, "WRN depth must be 6n+4"),
])
def test_rules(key, value, message):
    with pytest.raises(ValueError) as info:
        Config().with_overrides({key: value})
    assert message in str(info.value)


def test_seed_bound_is_what_the_rngs_accept():
    cfg = Config().with_overrides({"run.seed": SEED_MAX})
    np.random.seed(cfg.run.seed)  # numpy's legacy seeding is the narrowest: seeds < 2**32
    torch.manual_seed(cfg.run.seed)
    with pytest.raises(ValueError):
        np.random.seed(SEED_MAX + 1)


def test_numpy_values_become_plain_python_and_checkpoints_load():
    """Issue 13.4: numpy scalars set by a library user must not reach a checkpoint."""
    cfg = Config()
    cfg.optim.lr = np.logspace(-4, -2, 3)[1]
    cfg.sampler.n_steps = np.int64(7)
    cfg.optim.decay_epochs = (np.int64(3), np.int32(5))
    cfg.sampler.class_cond = np.bool_(True)
    cfg.sampler.reinit_freq = torch.tensor(0.25)
    validate(cfg)
    assert type(cfg.optim.lr) is float and cfg.optim.lr == pytest.approx(1e-3)
    assert type(cfg.sampler.n_steps) is int and cfg.optim.decay_epochs == (3, 5)
    assert all(type(e) is int for e in cfg.optim.decay_epochs)
    assert cfg.sampler.class_cond is True and type(cfg.sampler.reinit_freq) is float
    buf = io.BytesIO()
    torch.save({"config": cfg.to_dict()}, buf)
    buf.seek(0)
    assert Config.from_dict(torch.load(buf, weights_only=True)["config"]) == cfg


def test_from_dict_round_trip_and_overrides():
    cfg = build_config({"data.dataset": "toy2d", "sampler.n_steps": 40, "optim.decay_epochs": [3, 1]})
    assert cfg.model.name == "mlp" and cfg.sampler.step_size == 0.005  # the toy2d preset
    assert cfg.sampler.n_steps == 40 and cfg.optim.decay_epochs == (3, 1)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict({"optim": {"epochs": 3}}).optim.epochs == 3  # missing fields: defaults
    other = cfg.with_overrides({"optim.lr": 3e-4})
    assert other.optim.lr == 3e-4 and cfg.optim.lr == 1e-4  # a copy; the original is unchanged


@pytest.mark.parametrize("d,message", [
    ({"sampler": {"n_stepz": 1}}, "'sampler.n_stepz': no such config field"),
    ({"samplr": {}}, "unknown section"),
    ({"sampler": 3}, "config.sampler: expected a mapping"),
    ([1, 2], "config: expected a mapping"),
    ({"run": {"seed": "1"}}, "--seed (run.seed): must be an integer"),
])
def test_from_dict_refuses_what_it_cannot_read(d, message):
    with pytest.raises(ValueError) as info:
        Config.from_dict(d)
    assert message in str(info.value)


def test_flags_and_build_config_agree():
    """argv -> Config equals the same values given as dotted overrides, and to_argv inverts it."""
    argv = ["--dataset", "digits", "--sgld-steps", "7", "--decay-epochs", "4,9", "--augment", "false",
            "--no-progress", "--compile", "--lr", "0.002"]
    cfg = config_from_args(argv)
    overrides = {"data.dataset": "digits", "sampler.n_steps": 7, "optim.decay_epochs": (4, 9),
                 "data.augment": False, "run.progress": False, "run.compile": True, "optim.lr": 0.002}
    assert cfg == build_config(overrides)
    assert cfg.model.hidden == DATASET_PRESETS["digits"]["model.hidden"]  # preset under the flags
    assert cfg.sampler.backend == "auto"  # --compile picks the fastest backend
    assert config_from_args(to_argv(Config, overrides)) == cfg


def test_check_value_for_library_classes():
    assert check_value("sampler.n_steps", np.int64(4)) == 4
    assert type(check_value("sampler.reinit_freq", np.float32(0.5))) is float
    with pytest.raises(ValueError, match=r"^n_steps: must be >= 1, got 0$"):
        check_value("sampler.n_steps", 0, "n_steps")
    with pytest.raises(ValueError, match=r"^--reinit-freq \(sampler.reinit_freq\): must be <= 1"):
        check_value("sampler.reinit_freq", 1.5)
    with pytest.raises(ValueError, match="no such config field"):
        check_value("sampler.nope", 1)
    assert field_rules("sampler.buffer_size")["hi"] == 10_000_000


def test_eval_options_are_generated_too():
    o = options_from_args(["--checkpoint", "c.pt", "--what", "ood,accuracy,ood", "--eps-linf", "0.3,0,0.1",
                           "--eps-l2", "", "--refine-steps", "10,0", "--no-progress", "--pgd-steps", "3"])
    assert o.what == ("ood", "accuracy") and o.eps_linf == (0.0, 0.1, 0.3) and o.eps_l2 == ()
    assert o.refine_steps == (0, 10) and o.progress is False and o.pgd_steps == 3 and o.ood is None
    defaults = options_from_args(["--checkpoint", "c.pt"])
    assert {f.name: getattr(defaults, f.name) for f in dataclasses.fields(EvalOptions)} == {
        f.name: getattr(EvalOptions("c.pt"), f.name) for f in dataclasses.fields(EvalOptions)}
    with pytest.raises(ValueError, match=r"^--bins: must be >= 1, got 0$"):
        options_from_args(["--checkpoint", "c.pt", "--bins", "0"])


def test_one_line_escapes_and_cuts_at_a_word():
    text = "refused \x1b[1mdo this only if you trust it\x1b[0m. " + "word " * 100 + "\nsecond line"
    line = one_line(text, 60)
    assert "\x1b" not in line and "\\x1b[1m" in line and "second" not in line
    assert line.endswith("...") and len(line) <= 63
    assert line[:-3].split(" ")[-1] in text.split(" ")  # the last word is whole
    assert one_line("short") == "short" and not math.isnan(len(one_line("")))


def test_library_classes_check_their_arguments_with_the_config_rules():
    from jemfast import SGLD, ReplayBuffer

    s = SGLD(n_steps=np.int64(5), step_size=np.float32(0.5))
    assert type(s.n_steps) is int and type(s.step_size) is float and s.n_steps == 5
    with pytest.raises(ValueError, match=r"^n_steps: must be >= 1, got 0$"):
        SGLD(n_steps=0)
    with pytest.raises(ValueError, match=r"^step_size: must be a finite number, got nan$"):
        SGLD(step_size=float("nan"))
    with pytest.raises(ValueError, match=r"^noise_std: must be >= 0, got -0.1$"):
        SGLD(noise_std=-0.1)
    with pytest.raises(ValueError, match=r"^capacity: must be <= 10000000, got 1000000000000$"):
        ReplayBuffer(10**12, (3, 32, 32))  # refused before anything is allocated
    with pytest.raises(ValueError, match=r"^reinit_freq: must be <= 1, got 1.5$"):
        ReplayBuffer(5, (1,), reinit_freq=1.5)
    assert type(ReplayBuffer(np.int64(5), (1,), reinit_freq=np.float64(0.1)).capacity) is int
