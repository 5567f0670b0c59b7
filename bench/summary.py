"""Print a Markdown summary of a ``pytest bench/ --benchmark-json=FILE`` run.

Usage: ``python bench/summary.py FILE [--peak-tflops N]``

Tables: SGLD chains (images/s per backend, speed-up over the reference chain of the same
workload and precision, first-call seconds, achieved TFLOP/s and fraction of the dense bf16
peak for the WRN chain), training iterations (speed-up over the original design), buffer.
FLOP cost model (DESIGN.md): 4 FLOP per forward multiply-add per SGLD step, i.e. ~21 GFLOP per
image per step for WRN-28-10 at 32x32 (counted from the model: ``gflop_per_image_step``).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    if os.environ.get("JEMFAST_PEAK_TFLOPS"):
        return float(os.environ["JEMFAST_PEAK_TFLOPS"])
    return next((v for k, v in PEAKS.items() if k in device_name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_file")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    args = ap.parse_args()
    data = json.load(open(args.json_file))
    rows = [(b["name"], b["extra_info"], b["stats"]) for b in data["benchmarks"] if "images_per_s" in b["extra_info"]]
    if not rows:
        print("no jemfast benchmark results in", args.json_file)
        return
    info0 = rows[0][1]
    peak = _peak(info0.get("device_name", ""), args.peak_tflops)
    print(f"# jemfast benchmarks: {info0.get('device_name')} ({info0.get('mode')} mode, "
          f"torch {info0.get('torch_version')}, {data.get('datetime', '')})\n")
    print(f"n = rounds per benchmark (median reported); peak used: {peak or 'unknown'} TFLOP/s dense bf16\n")

    chains = [(n, i, s) for n, i, s in rows if n.startswith("test_sgld_chain")]
    ref = {(i["workload"], i["precision"]): i["images_per_s"] for _, i, _ in chains if i["backend"] == "reference"}
    print("## SGLD chain, 20 steps\n")
    print("| workload | batch | precision | backend | images/s | vs reference | first call s | TFLOP/s | of peak | n |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, i, s in sorted(chains, key=lambda r: (r[1]["workload"], r[1]["precision"], r[1]["backend"])):
        base = ref.get((i["workload"], i["precision"]))
        tf = i.get("tflops")
        frac = f"{tf / peak:.1%}" if (peak and tf and "WRN" in i["workload"]) else ""
        print(f"| {i['workload']} | {i['batch']} | {i['precision']} | {i['backend']} | {i['images_per_s']:.1f} | "
              f"{i['images_per_s'] / base:.2f}x | {i['first_call_s']:.1f} | {tf or 0:.3g} | {frac} | {s['rounds']} |"
              if base else
              f"| {i['workload']} | {i['batch']} | {i['precision']} | {i['backend']} | {i['images_per_s']:.1f} | "
              f"| {i['first_call_s']:.1f} | {tf or 0:.3g} | {frac} | {s['rounds']} |")

    iters = [(n, i, s) for n, i, s in rows if n.startswith("test_train_iteration")]
    if iters:
        base = next((i["images_per_s"] for _, i, _ in iters if i["variant"] == "original-strict-fp32"), None)
        print("\n## Training iteration (PCD + 20 SGLD steps + training step)\n")
        print("| workload | batch | variant | images/s | vs original design | n |")
        print("|---|---|---|---|---|---|")
        for _, i, s in iters:
            sp = f"{i['images_per_s'] / base:.2f}x" if base else ""
            print(f"| {i['workload']} | {i['batch']} | {i['variant']} | {i['images_per_s']:.1f} | {sp} "
                  f"| {s['rounds']} |")

    bufs = defaultdict(dict)
    for _, i, s in rows:
        if "buffer" in i:
            bufs[i["workload"]][i["buffer"]] = (i["images_per_s"], s["rounds"])
    if bufs:
        print("\n## Buffer draw + write-back\n")
        print("| workload | on device (images/s) | original CPU copy (images/s) | n |")
        print("|---|---|---|---|")
        for wl, d in bufs.items():
            dev, orig = d.get("device", (0, 0)), d.get("original-cpu-copy", (0, 0))
            print(f"| {wl} | {dev[0]:.0f} | {orig[0]:.0f} | {dev[1]} |")


if __name__ == "__main__":
    main()
