"""The swap-in user's collapse, rescued by jemfast.Guard: examples/jem_original_style.py on
``--dataset digits32`` (3x32x32 digits, WRN-10-2 without normalisation, the original block
layout, jemfast's digits32 settings) over seeds, in three modes:

- ``unguarded``: the script after the swap line, nothing else (it stops itself at |L| > 1e8, as
  the original's ``1/0`` does);
- ``guarded``: with the README's Guard lines (docs/swap-in.md);
- ``clf-only``: the same network and schedule as a plain classifier (``--p_x_weight 0``).

    python bench/guard_rescue.py --seeds 1,2,3,4,5 --jobs 2 --out runs/guard_rescue

Writes OUT/results.jsonl (one line per run) and OUT/table.md; each run's save_dir and log are
OUT/seed-S-MODE/. docs/swap-in.md has the figures; bench/test_guard_rescue.py is CI's reduced form.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "jem_original_style.py"
MODES = {"unguarded": [], "guarded": ["--guard"], "clf-only": ["--p_x_weight", "0"]}
WITHIN = 0.05  # the guarded run's final test accuracy within 5 points of the plain classifier's


def run_one(seed: int, mode: str, out: Path, threads: int, extra: list[str]) -> dict:
    """One run of the example; its row (``exit`` the script's exit code)."""
    save = out / f"seed-{seed}-{mode}"
    save.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(EXAMPLE), "--dataset", "digits32", "--sampler", "jemfast", "--device", "cpu",
           "--seed", str(seed), "--save_dir", str(save), *MODES[mode], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(save / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = (save / "log.txt").read_text()
    results = json.loads((save / "results.json").read_text()) if (save / "results.json").exists() else {}
    history = results.get("history") or []
    stop = re.search(r"diverged at iteration (\d+)", text)
    return {"seed": seed, "mode": mode, "exit": rc, "wall_s": round(wall, 1),
            "stopped_at": int(stop.group(1)) if stop else None,
            "restarts": [e["action"] for e in results.get("restarts", [])],
            "epochs": len(history), "test_acc": history[-1]["test_acc"] if history and rc == 0 else None}


def table(rows: list[dict]) -> str:
    """Markdown: one line per seed (the three modes side by side) and the verdict."""
    by = {(r["seed"], r["mode"]): r for r in rows}
    lines = ["| seed | unguarded | guarded: exit, test acc, restarts | clf-only test acc | within 5 points |",
             "|---|---|---|---|---|"]
    ok = 0
    seeds = sorted({r["seed"] for r in rows})
    for s in seeds:
        u, g, c = (by.get((s, m)) for m in MODES)
        un = "-" if u is None else (f"stopped at iteration {u['stopped_at']}" if u["stopped_at"] is not None
                                    else f"exit {u['exit']}, {u['test_acc']}")
        gd = "-" if g is None else (f"{g['exit']}, {_pct(g['test_acc'])}, {len(g['restarts'])}: "
                                    + "; ".join(g["restarts"]))
        within = (g is not None and c is not None and g["exit"] == 0 and g["test_acc"] is not None
                  and c["test_acc"] is not None and g["test_acc"] >= c["test_acc"] - WITHIN)
        ok += within
        lines.append(f"| {s} | {un} | {gd} | {_pct(c['test_acc']) if c else '-'} | {'yes' if within else 'no'} |")
    lines.append(f"\nguarded within {WITHIN * 100:.0f} points of the plain classifier on {ok}/{len(seeds)} seeds")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/guard_rescue")
    args, extra = p.parse_known_args(argv)  # the rest goes to the example (e.g. --n_epochs 3)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(s, m) for s in seeds for m in modes]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool, open(out / "results.jsonl", "a") as log:
        for row in pool.map(lambda j: run_one(j[0], j[1], out, threads, extra), jobs):
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    (out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
