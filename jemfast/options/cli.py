"""Command line of ``python -m jemfast.train``: flags -> validated :class:`Config`.

Every flag is generated from the declarations on the config's dataclass fields
(:mod:`jemfast.options.config`, :func:`jemfast.options.schema.add_flags`). Precedence: the paper's defaults <
the dataset's preset (digits, toy2d) < flags given. Every user error becomes one line on stderr
and exit code 2 (:func:`run_cli`).
"""
from __future__ import annotations

import argparse
import textwrap
import os
import sys
from typing import Callable, Sequence

from ..process.errors import DivergenceExhausted, UserError, one_line
from .config import FLAGS_BY_KEY, Config, build_config
from .recipes import NAMES as RECIPE_NAMES, describe
from .schema import add_flags, given_values


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message, 300)}\n")
        sys.exit(2)


def build_parser(prog: str = "python -m jemfast.train") -> argparse.ArgumentParser:
    recipes = [textwrap.fill(describe(name, FLAGS_BY_KEY), 100, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False) for name in RECIPE_NAMES if name != "none"]
    p = OneLineParser(prog=prog, description="Train a Joint Energy-based Model (JEM). Defaults are the "
                      "paper's; --dataset digits/digits32/toy2d apply their presets first, then --recipe, then "
                      "the flags given.", epilog="recipes (--recipe; docs/recipes.md):\n" + "\n".join(recipes),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, Config)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv`` into a validated Config (raises ValueError for bad values)."""
    return build_config(given_values(build_parser().parse_args(argv), Config))


def run_cli(fn: Callable[[], int], prog: str) -> int:
    """Run ``fn``; user errors print one line and return their exit code. Under torchrun only
    rank 0 prints (jemfast.distributed.ranks makes it report the other ranks' errors)."""
    def say(message: str) -> None:
        if os.environ.get("RANK", "0") in ("", "0"):
            sys.stderr.write(f"{prog}: {message}\n")

    try:
        return fn()
    except ValueError as exc:
        say(f"error: {one_line(str(exc), 1000)}")
        return 2
    except (UserError, DivergenceExhausted) as exc:
        say(f"error: {one_line(str(exc), 1000)}")
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop's own handler: no traceback
        say("interrupted")
        return 130
