"""SGLD over the JEM energy: the loop once, and the ways to run it.

Read in this order: :mod:`.spec` (what a chain does), :mod:`.reference` (the loop,
:func:`sgld_chain`, and its plain-PyTorch pieces), :mod:`.sampler` (the :class:`SGLD` class the
trainer uses), :mod:`.backends` (choosing a backend; ``auto``'s rules in :mod:`.auto_rule`),
then the fast ways to run the same loop: :mod:`.fused` (Triton update), :mod:`.graph` (CUDA
graph capture), :mod:`.compiled` (``torch.compile`` of one step). Fresh chains start from
:mod:`.chain_init` (``--init``), fitted for :class:`jemfast.Guard` to the per-class sample of
:mod:`.reservoir`; :mod:`.sync_check` records the host syncs of a region (tests).
"""
from .backends import NAMES, make_chain, resolve_backend, unavailable
from .reference import energy_of, reference_chain, sgld_chain, torch_update
from .sampler import SGLD, sampling_mode
from .spec import ChainSpec

__all__ = ["SGLD", "ChainSpec", "NAMES", "energy_of", "make_chain", "reference_chain", "resolve_backend",
           "sampling_mode", "sgld_chain", "torch_update", "unavailable"]
