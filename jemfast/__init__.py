"""jemfast: fast, self-stabilising training of Joint Energy-based Models (JEM).

Training entry point: ``from jemfast.train import train`` (or ``python -m jemfast.train``);
for a training loop of your own, :class:`jemfast.Guard` adds the same divergence recovery.
"""
import os as _os
import sys as _sys

from .process.interrupt import quiet_startup_signals as _quiet_startup_signals

if _sys.argv[:1] == ["-m"]:  # `python -m jemfast.<cli>` is starting: a signal now exits quietly
    _quiet_startup_signals()

__version__ = "0.1.0"

# jemfast.kernels and jemfast.tune live in the top-level folders kernels/ and tune/ of the
# repository (pyproject's package-dir maps them into the package when installed). When this
# package is imported from a source tree (a checkout, a worktree, or the repository root
# shadowing a non-editable install), look for those subpackages beside it too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]

from .process.threads import choose_wait_policy  # noqa: E402

if "torch" not in _sys.modules:  # libgomp reads the policy when torch is first imported
    choose_wait_policy()  # before the first `import torch` below (jemfast.process.threads says why)

from .buffer import ReplayBuffer  # noqa: E402
from .rundir.checkpoint import load_checkpoint  # noqa: E402
from .options.config import Config  # noqa: E402
from .energy import JEM, LogDensity  # noqa: E402
from .guard import Guard  # noqa: E402
from .sgld import SGLD  # noqa: E402
from .step import jem_loss  # noqa: E402

__all__ = ["JEM", "Guard", "LogDensity", "ReplayBuffer", "SGLD", "Config", "jem_loss", "load_checkpoint",
           "__version__"]
