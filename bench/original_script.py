"""The real original JEM script (wgrathwohl/JEM ``train_wrn_ebm.py``) on the bundled digits, as a
swap-in user runs it: unguarded, with the Guard lines of jemfast 9c5625c ("guarded-before"), or
with today's README Guard lines. The script is never part of jemfast: fetch it yourself
(``git clone https://github.com/wgrathwohl/JEM``) and pass its directory.

    python bench/original_script.py --original ../JEM --mode guarded --out runs/original/guarded

What it writes and runs: :mod:`jemfast.compat.original_run` (the same rows in ``python -m
jemfast.recipe_benchmark --original DIR``). ``--jemfast DIR`` puts another jemfast checkout first
on the path (the "before" mode's, e.g. a ``git worktree`` of 9c5625c). Extra arguments go to the
script.
"""
from __future__ import annotations

import argparse
import json
import sys

from jemfast.compat.original_run import LINES, run_original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, help="directory of wgrathwohl/JEM (train_wrn_ebm.py, wideresnet.py)")
    p.add_argument("--mode", choices=list(LINES), default="guarded")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None, help="replaces the script's hard-coded seed = 1")
    p.add_argument("--jemfast", default=None, help="a jemfast checkout to import instead of this one")
    args, extra = p.parse_known_args(argv)
    row = run_original(args.original, args.out, args.mode, args.seed, extra=extra, jemfast_dir=args.jemfast)
    print(f"{args.mode}: exit {row['exit']}, {row['status']}, test acc {row['test_acc']}, "
          f"{row['restarts']} restart(s), {row['wall_s']:.0f} s; log in {row['log']}")
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    return row["exit"]


if __name__ == "__main__":
    sys.exit(main())
