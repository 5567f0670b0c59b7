"""``python -m jemfast.compat convert SRC --out DEST [train flags]``: checkpoints between the
original JEM format and jemfast (:mod:`jemfast.compat.convert`). The direction follows SRC:

- an original ``{"model_state_dict", "replay_buffer"}`` file becomes the jemfast run DEST,
  built from the train flags given (as ``python -m jemfast.train`` takes them); the command then
  prints the ``python -m jemfast.train --resume`` line that continues it;
- a jemfast checkpoint (``RUN/checkpoints/last.pt``) becomes the original-format file DEST.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..options.cli import OneLineParser, run_cli
from ..options.config import Config
from ..options.schema import add_flags, given_values, to_argv
from ..process.errors import UserError
from ..process.log import setup_cli_logging
from ..rundir.checkpoint import load_weights_only
from .convert import original_to_run, run_to_original
from .loading import refuse_flags
from .original_format import is_jemfast_checkpoint, parse_original

PROG = "python -m jemfast.compat"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Convert checkpoints between the original JEM code's format "
                      "and jemfast's.")
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="an original checkpoint into a jemfast run, or a jemfast "
                          "checkpoint into the original format (the direction follows SRC)",
                          description="SRC original-format: DEST (--out) is a new jemfast run made with the "
                          "train flags given. SRC a jemfast checkpoint: DEST is the original-format file.")
    conv.add_argument("src", metavar="SRC", help="the checkpoint to convert")
    add_flags(conv, Config)
    return p


def convert(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = given_values(args, Config)
    if "run.out" not in overrides:
        raise UserError("convert: --out is required (a new run directory, or the original-format file to write)")
    obj, file_bytes = load_weights_only(args.src)
    if is_jemfast_checkpoint(obj):
        del obj
        refuse_flags(overrides, args.src, "becoming a run")
        dest = Path(overrides["run.out"])
        if dest.is_dir():
            raise UserError(f"--out {dest} is a directory; give the original-format file to write")
        run_to_original(args.src, dest)
        print(f"wrote {dest} (original JEM format)")
        return 0
    original = parse_original(obj, file_bytes, args.src)
    path, added = original_to_run(original, overrides, args.src)
    flags = to_argv(Config, {**overrides, **added})
    print(f"wrote {path}; continue with: python -m jemfast.train --resume {shlex.join(flags)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging("jemfast.compat")
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_cli(lambda: convert(argv), "jemfast.compat")


if __name__ == "__main__":
    sys.exit(main())
