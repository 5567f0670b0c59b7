"""jemfast: fast, self-stabilising training of Joint Energy-based Models (JEM).

Training entry point: ``from jemfast.train import train`` (or ``python -m jemfast.train``).
"""
__version__ = "0.1.0"

from .buffer import ReplayBuffer  # noqa: E402
from .checkpoint import load_checkpoint  # noqa: E402
from .config import Config  # noqa: E402
from .energy import JEM  # noqa: E402
from .sampler import SGLD  # noqa: E402

__all__ = ["JEM", "ReplayBuffer", "SGLD", "Config", "load_checkpoint", "__version__"]
