"""``python -m jemfast.eval --checkpoint PATH [--what ...] [--out DIR]``: see ``--help``."""
from __future__ import annotations

import sys

from ..options.cli import run_cli
from ..process.log import setup_cli_logging
from ..rundir.writable import check_writable_dir
from .options import options_from_args
from .runner import default_out, exit_on_signals, run_eval


def summary_lines(r: dict) -> list[str]:
    lines = []
    if "accuracy" in r:
        lines.append("accuracy " + ", ".join(f"{k} {100 * v['accuracy']:.1f} %" for k, v in r["accuracy"].items()))
    if "calibration" in r and "ece" in r["calibration"]:
        lines.append(f"ECE {100 * r['calibration']['ece']:.2f} % ({r['calibration']['bins']} bins)")
    if "ood" in r and "auroc" in r["ood"]:
        lines += [f"OOD {name}: AUROC log p(x) {row['log_px']:.3f}, max p(y|x) {row['max_py']:.3f}, "
                  f"-grad norm {row['neg_grad']:.3f}" for name, row in r["ood"]["auroc"].items()]
    if "robustness" in r and "accuracy" in r["robustness"]:
        for norm, rows in r["robustness"]["accuracy"].items():
            worst = max(rows, key=float)
            lines.append(f"PGD {norm} eps {worst}: " + ", ".join(
                f"K={k} {100 * a:.1f} %" for k, a in rows[worst].items()))
    if "generation" in r and "fid" in r["generation"]:
        g = r["generation"]
        lines.append(f"IS {g['inception_score']:.2f}, FID {g['fid']:.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        opts = options_from_args(argv)
        check_writable_dir(opts.out or default_out(opts.checkpoint), "--out")  # before any work
        results = run_eval(opts)
        for line in summary_lines(results):
            print(line)
        out = results.get("out_dir", "")
        print(f"wrote eval.json, report.md and PNGs{' to ' + out if out else ''} "
              f"in {results['timings_s']['total']:.0f} s")
        return 0

    setup_cli_logging("jemfast.eval")
    with exit_on_signals("jemfast.eval"):
        return run_cli(_run, "jemfast.eval")


if __name__ == "__main__":
    sys.exit(main())
