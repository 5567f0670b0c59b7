"""``jemfast.compat``: jemfast behind the original JEM code's interface (wgrathwohl/JEM).

An original-style training script (classes ``F``/``CCF`` whose ``forward(x, y=None)`` is a
log-density, ``init_random(args, bs)``, ``get_sample_q(args, device)``, a tensor replay buffer,
checkpoints ``{"model_state_dict", "replay_buffer"}``) switches its sampler to jemfast by
replacing one line::

    sample_q = jemfast.compat.get_sample_q(args, device)     # was: get_sample_q(args, device)

Everything else stays: ``sample_q(f, replay_buffer, y=None, n_steps=args.n_steps)`` keeps the
original's semantics and random-number order (:mod:`.sampling`, the step itself :mod:`.pcd`),
and the buffer stays a plain tensor that the script's own ``checkpoint()`` saves. Images of any
shape: a tensor buffer says it; for an empty buffer ``[]`` pass ``shape=(n_ch, im_sz, im_sz)``
or the script's own ``init_random`` as ``init_fn`` (:mod:`.shape`).

The original evaluation script (``eval_wrn_ebm.py``) swaps in the same way
(:mod:`.eval_script`): ``sample_q = jemfast.compat.eval_sample_q`` after its ``def sample_q``,
and ``sample = jemfast.compat.eval_refine(f, args)`` after the ``def sample`` of ``test_clf``
and ``logp_hist``.

The fast path:

- **device-resident buffer**: ``replay_buffer = init_random(args, N).to(device)``. Row draws,
  re-initialisation and write-back then stay on the device (the original copies the drawn rows
  to the GPU and the chains back to the host every iteration); a CPU buffer keeps the
  original's behaviour exactly.
- **backend**: ``args.sgld_backend``, else the environment variable ``JEMFAST_SGLD_BACKEND``,
  else ``auto``: one of ``auto``, ``reference``, ``fused``, ``graph``, ``compile``
  (``jemfast.sgld``; ``auto`` is ``reference`` on a CPU and the CUDA graph on a GPU). The choice
  is logged once.

Checkpoints (:mod:`.original_format`): :func:`read_original` / :func:`write_original` read and
write the original format (weights-only loading, validated). Conversion (:mod:`.convert`,
``python -m jemfast.compat convert``) turns an original checkpoint into a jemfast run that
``python -m jemfast.train --resume`` continues, and a jemfast checkpoint back into the original
format; model keys are mapped by :mod:`.keymap`. ``python -m jemfast.eval --checkpoint
ORIGINAL.pt [model flags]`` evaluates an original checkpoint directly (:mod:`.loading`).

:mod:`.original_run` runs the real original script itself (fetched by the user) on the bundled
digits, patched with the swap line and the Guard lines: the benchmarks' comparison rows.
"""
from .eval_script import eval_refine, eval_sample_q, get_eval_sample_q
from .pcd import BACKEND_ENV
from .sampling import get_sample_q, init_random

__all__ = ["BACKEND_ENV", "eval_refine", "eval_sample_q", "get_eval_sample_q", "get_sample_q", "init_random"]
