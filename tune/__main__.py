"""``python -m jemfast.tune``: see :mod:`jemfast.tune.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
