"""Energy models: the energy view of a classifier (:class:`JEM`), of a model whose forward is a
log-density (:class:`LogDensity`), and of a plain energy function (:func:`as_energy_model`).

Every one of them has ``energy(x, y=None) -> Tensor[B]`` (unnormalised negative log-density of
``x: Tensor[B, *shape]``, or of (x, y) with labels ``y: Tensor[B]``), which is all that SGLD needs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

EnergyFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class JEM(nn.Module):
    """Wrap any classifier ``f: Tensor[B, *shape] -> Tensor[B, C]`` as a joint energy model.

    ``forward(x)`` returns the logits unchanged, so a JEM is a drop-in classifier;
    ``energy(x)`` is the unnormalised negative log-density of x, ``energy(x, y)`` that of (x, y).

    ``state_dict()`` keys are the classifier's with the prefix ``classifier.``;
    ``load_state_dict`` also accepts the classifier's own keys (e.g. an original JEM script's
    ``model_state_dict`` of the bare network): when none of the given keys is one of JEM's, they
    are read as the classifier's.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_load_state_dict_pre_hook(functools.partial(_accept_unprefixed, "classifier."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[B]`` of energies (float32 even under bf16 autocast)."""
        logits = self.classifier(x).float()
        return energy_from_logits(logits, y)


class LogDensity(nn.Module):
    """Adapter for a model whose forward *is* the log-density, as the original JEM code's
    ``F``/``CCF``: ``f(x) -> Tensor[B]`` is log p(x) up to a constant and ``f(x, y=y)`` log p(x, y).

    ``energy(x, y) = -f(x)`` or ``-f(x, y=y)`` (float32); ``forward`` passes everything through
    to ``f``. Parameters, buffers and train/eval modes are ``f``'s, and so are the state_dict
    keys: ``state_dict()`` has no prefix and ``load_state_dict`` takes ``f``'s own keys, so
    checkpoints of ``f`` load both ways.
    """

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.register_state_dict_post_hook(functools.partial(_strip_prefix, "f."))
        self.register_load_state_dict_pre_hook(functools.partial(_add_prefix, "f."))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.f(*args, **kwargs)

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[B]`` of energies -log p(x) (or -log p(x, y)), float32."""
        log_p = self.f(x) if y is None else self.f(x, y=y)
        return -log_p.float()


class EnergyFunction(nn.Module):
    """A plain energy function ``fn(x, y) -> Tensor[B]`` as a model with ``energy`` (what SGLD
    runs). ``owner`` (optional) is the module ``fn`` evaluates: registered as a submodule, so its
    parameters count for ``auto`` and its modes are set and restored while sampling; parameter
    swaps (``functional_call``) reach it because ``fn`` calls that same module object."""

    def __init__(self, fn: EnergyFn, owner: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.owner = owner

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(x, y)

    forward = energy


def as_energy_model(energy: Any, model: nn.Module | None = None) -> nn.Module:
    """The module SGLD runs for ``energy``: a module with ``.energy`` (a :class:`JEM`, a
    :class:`LogDensity`, your own) as it is; any other object with ``.energy``, or a callable
    ``energy(x, y) -> Tensor[B]``, wrapped in an :class:`EnergyFunction` whose owner is ``model``
    (or ``energy`` itself when it is a module). Raises ValueError for anything else."""
    if isinstance(energy, nn.Module) and callable(getattr(energy, "energy", None)) and model in (None, energy):
        return energy
    fn = getattr(energy, "energy", energy)
    if not callable(fn):
        raise ValueError(f"energy: expected a model with .energy(x, y) or a function energy(x, y) -> Tensor[B], "
                         f"got {type(energy).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return EnergyFunction(fn, model if model is not None else energy if isinstance(energy, nn.Module) else None)


def energy_from_logits(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp(logits) or, with labels ``y: Tensor[B] int64``, E(x, y) = -logits[y]."""
    if y is None:
        return -torch.logsumexp(logits, dim=1)
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


# ---- state_dict key hooks (any nesting depth: keys are relative to ``prefix``; module-level
# functions under functools.partial, so that a model with them still pickles) -----------------
def _accept_unprefixed(inner: str, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: if none of the keys under the module's prefix is one of its own, read them
    as keys of its submodule ``inner`` (e.g. ``"classifier."``)."""
    own = set(module.state_dict(keep_vars=True))
    mine = [k for k in state_dict if k.startswith(prefix)]
    if mine and not any(k[len(prefix):] in own for k in mine):
        for k in mine:
            state_dict[prefix + inner + k[len(prefix):]] = state_dict.pop(k)


def _add_prefix(inner: str, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: every key under the module's prefix is read as one of submodule ``inner``."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + inner + k[len(prefix):]] = state_dict.pop(k)


def _strip_prefix(inner: str, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State_dict post-hook: submodule ``inner`` dropped from the module's keys (order kept: they
    are the last keys written when the hook runs)."""
    head = prefix + inner
    for k in [k for k in state_dict if k.startswith(head)]:
        state_dict[prefix + k[len(head):]] = state_dict.pop(k)
