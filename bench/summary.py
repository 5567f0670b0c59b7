"""Print the Markdown tables of bench/RESULTS.md from result files of bench/gpu.sh or pytest bench/.

Usage: ``python3 bench/summary.py PATH... [--peak-tflops N] [--gemm-tflops N]``; each PATH is a
JSON file or a directory of them (e.g. ``bench/results/``). Files are recognised by content:
pytest-benchmark output (``--benchmark-json``), the ``check`` stage's machine file
(bench/machine.py: versions, measured GEMM rates) and the ``layout`` stage's (bench/layout.py).

Tables: the machine (GPU, versions, measured bf16/TF32/fp32 GEMM rates); SGLD chains (images/s,
speed-up over the reference chain of the same workload, precision and layout, first-call
seconds, TFLOP/s, and for WRN-28-10 the fraction of the spec-sheet dense bf16 peak and of the
measured bf16 GEMM rate); training iterations (speed-up over the original design in strict fp32
and with TF32); buffer; layout. fp32 rows say whether TF32 was on. FLOP cost model (DESIGN.md):
4 FLOP per forward multiply-add per SGLD step (``gflop_per_image_step``, counted from the model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 TFLOP/s, spec sheets


def load(paths: list[str]) -> tuple[list[tuple[str, dict, dict, str]], list[dict], list[dict]]:
    """``(benchmark rows (name, extra_info, stats, file), check files, layout files)``."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    rows, checks, layouts = [], [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("kind") == "jemfast-gpu-check":
            checks.append(data)
        elif data.get("kind") == "jemfast-gpu-layout":
            layouts.append(data)
        elif "benchmarks" in data:
            rows += [(b["name"], b["extra_info"], b["stats"], f.name) for b in data["benchmarks"]
                     if "images_per_s" in b.get("extra_info", {})]
    return rows, checks, layouts


def spec_peak(device_name: str, given: float | None) -> float | None:
    """The dense bf16 spec peak: ``given``, else ``JEMFAST_PEAK_TFLOPS``, else by GPU name."""
    env = os.environ.get("JEMFAST_PEAK_TFLOPS")
    return given or (float(env) if env else None) or next((v for k, v in PEAKS.items() if k in device_name), None)


def fractions(tflops: float | None, workload: str, peak: float | None, gemm: float | None) -> tuple[str, str]:
    """``(of spec peak, of measured GEMM)`` as percentages, for WRN-28-10 rows only."""
    if not tflops or "WRN-28" not in workload:
        return "", ""
    return (f"{tflops / peak:.1%}" if peak else "", f"{tflops / gemm:.1%}" if gemm else "")


def _mode(i: dict) -> str:
    return i.get("float_mode") or i.get("precision", "")


def chain_table(chains: list, peak: float | None, gemm: float | None) -> list[str]:
    key = lambda i: (i["workload"], i["precision"], i.get("layout", "nchw"))  # noqa: E731
    ref = {key(i): i["images_per_s"] for _, i, _, _ in chains if i["backend"] == "reference"}
    out = ["## SGLD chain, 20 steps\n",
           "| workload | batch | float mode | layout | backend | images/s | vs reference | first call s "
           "| TFLOP/s | of bf16 spec peak | of measured bf16 GEMM | n |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, i, s, _ in sorted(chains, key=lambda r: (*key(r[1]), r[1]["backend"])):
        base = ref.get(key(i))
        vs = f"{i['images_per_s'] / base:.2f}x" if base else ""
        of_peak, of_gemm = fractions(i.get("tflops"), i["workload"], peak, gemm)
        layout = i.get("layout", "nchw") + (" (state not kept)" if i.get("state_channels_last") is False else "")
        out.append(f"| {i['workload']} | {i['batch']} | {_mode(i)} | {layout} | {i['backend']} | "
                   f"{i['images_per_s']:.1f} | {vs} | {i['first_call_s']:.1f} | {i.get('tflops') or 0:.3g} | "
                   f"{of_peak} | {of_gemm} | {s['rounds']} |")
    return out


def iteration_table(iters: list) -> list[str]:
    base = {v: next((i["images_per_s"] for _, i, _, _ in iters if i["variant"] == v), None)
            for v in ("original-strict-fp32", "original-tf32")}
    out = ["## Training iteration (PCD + 20 SGLD steps + training step)\n",
           "| workload | batch | variant | float mode | layout | images/s | vs original (strict fp32) "
           "| vs original (TF32) | first call s | n |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for _, i, s, _ in iters:
        sp = [f"{i['images_per_s'] / b:.2f}x" if b else "" for b in base.values()]
        out.append(f"| {i['workload']} | {i['batch']} | {i['variant']} | {_mode(i)} | {i.get('layout', 'nchw')} | "
                   f"{i['images_per_s']:.1f} | {sp[0]} | {sp[1]} | {i['first_call_s']:.1f} | {s['rounds']} |")
    return out


def buffer_table(rows: list) -> list[str]:
    bufs: dict = defaultdict(dict)
    for _, i, s, _ in rows:
        if "buffer" in i:
            bufs[i["workload"]][i["buffer"]] = (i["images_per_s"], s["rounds"])
    if not bufs:
        return []
    out = ["## Buffer draw + write-back\n", "| workload | on device (images/s) | original CPU copy (images/s) | n |",
           "|---|---|---|---|"]
    for wl, d in bufs.items():
        dev, orig = d.get("device", (0, 0)), d.get("original-cpu-copy", (0, 0))
        out.append(f"| {wl} | {dev[0]:.0f} | {orig[0]:.0f} | {dev[1]} |")
    return out


def layout_table(layout: dict, peak: float | None, gemm: float | None) -> list[str]:
    out = [f"## Layout: {layout['workload']} batch {layout['batch']}, {layout['steps']} steps, "
           f"{'bf16 autocast' if layout['precision'] == 'bf16' else layout['precision']}, {layout['backend']} backend ({layout.get('command', '')})\n",
           "| layout | cudnn.benchmark | ms | TFLOP/s | of bf16 spec peak | of measured bf16 GEMM | first call s "
           "| state channels-last | conv | elementwise | other (layout transforms) | profiled | n |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in layout["configs"]:
        of_peak, of_gemm = fractions(c["tflops"], layout["workload"], peak, gemm)
        f, p = c["profile"]["fraction"], c["profile"]
        out.append(f"| {c['layout']} | {c['cudnn_benchmark']} | {c['median_s'] * 1e3:.1f} | {c['tflops']:.0f} | "
                   f"{of_peak} | {of_gemm} | {c['first_call_s']:.1f} | {c['state_channels_last']} | "
                   f"{f['convolution']:.0%} | {f['elementwise']:.0%} | {f['other']:.0%} ({p['layout_fraction']:.0%}) | "
                   f"{c['profiled']} | {c['n']} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="JSON files or directories of them")
    ap.add_argument("--peak-tflops", type=float, default=None, help="spec-sheet dense bf16 peak (default by GPU name)")
    ap.add_argument("--gemm-tflops", type=float, default=None,
                    help="measured bf16 GEMM rate (default: from a check-stage file among PATHs)")
    args = ap.parse_args(argv)
    rows, checks, layouts = load(args.paths)
    if not (rows or checks or layouts):
        sys.stderr.write(f"bench/summary.py: no jemfast results in {' '.join(args.paths)}\n")
        return 1
    device = (checks[0]["gpu"] if checks else layouts[0]["gpu"] if layouts else rows[0][1].get("device_name", ""))
    peak = spec_peak(device, args.peak_tflops)
    gemm = args.gemm_tflops or (checks[-1]["gemm"]["bf16"]["tflops"] if checks else None)
    out = [f"# jemfast results: {device}\n"]
    for c in checks:
        v, g = c["versions"], c["gemm"]
        out.append(f"- machine: {c['gpu']}, {c.get('multiprocessors')} SMs, {c.get('memory_gib', 0):.0f} GiB; "
                   f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, triton {v['triton']}, "
                   f"python {v['python']}; `--backend auto` -> {c.get('auto_backend')}")
        out.append(f"- measured 8192^3 GEMM (median of {g['bf16']['n']}): bf16 {g['bf16']['tflops']:.0f} TFLOP/s, "
                   f"fp32 with TF32 {g['tf32']['tflops']:.0f}, strict fp32 {g['fp32']['tflops']:.1f}; "
                   f"device copy {c['copy']['gbs']:.0f} GB/s")
    out.append(f"- fractions of peak: WRN-28-10 rows against the dense bf16 spec ({f'{peak:.0f} TFLOP/s' if peak else 'unknown'}) "
               f"and the measured bf16 GEMM rate ({f'{gemm:.0f} TFLOP/s' if gemm else 'not measured'}); "
               "fp32 (TF32) and strict fp32 rows are set against the same bf16 figures")
    if rows:
        i0 = rows[0][1]
        vers = i0.get("versions", {})
        out.append(f"- benchmarks: {i0.get('mode')} mode, torch {vers.get('torch', i0.get('torch_version'))}, "
                   f"triton {vers.get('triton', '?')}, cudnn.benchmark {i0.get('cudnn_benchmark', '?')}; "
                   f"commands: {', '.join(sorted({'`' + r[1].get('command', 'pytest bench/') + '`' for r in rows}))}; "
                   f"files: {', '.join(sorted({r[3] for r in rows}))}; n = timed rounds (median reported)")
    chains = [r for r in rows if r[0].startswith("test_sgld_chain")]
    iters = [r for r in rows if r[0].startswith("test_train_iteration")]
    for table in ([chain_table(chains, peak, gemm)] if chains else []) + ([iteration_table(iters)] if iters else []) \
            + [buffer_table(rows)] + [layout_table(lay, peak, gemm) for lay in layouts]:
        if table:
            out += ["", *table]
    sys.stdout.write("\n".join(out) + "\n")  # the tables are this script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
