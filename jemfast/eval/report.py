"""report.md: the tables of eval.json in Markdown, with the PNGs embedded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .ood import SCORE_LABELS, SCORES


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"


def _fig(part: dict[str, Any], alt: str) -> list[str]:
    return [f"![{alt}]({part['figure']})", ""] if part.get("figure") else []


def accuracy_md(r: dict[str, Any]) -> list[str]:
    lines = ["| split | images | accuracy (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['n']} | {_pct(v['accuracy'])} |" for name, v in r.items()]
    return lines + [""]


def calibration_md(r: dict[str, Any]) -> list[str]:
    return [f"ECE on the {r['split']} split ({r['n']} images, {r['bins']} equal-width bins): "
            f"**{_pct(r['ece'])} %** (accuracy {_pct(r['accuracy'])} %, mean confidence "
            f"{_pct(r['mean_confidence'])} %).", ""] + _fig(r, "reliability diagram")


def ood_md(r: dict[str, Any]) -> list[str]:
    lines = [f"AUROC, in-distribution ({r['in_distribution']}, {r['n_in']} images) = positive class, "
             "higher score = more in-distribution.", "",
             "| OOD set | images | " + " | ".join(SCORE_LABELS[k].replace("|", "\\|") for k in SCORES) + " |",
             "|---|---:|" + "---:|" * len(SCORES)]
    for name, row in r["auroc"].items():
        lines.append(f"| {name} | {row['n']} | " + " | ".join(f"{row[k]:.3f}" for k in SCORES) + " |")
    lines.append("")
    for why in r.get("skipped_sets", {}).values():
        lines.append(f"- skipped {why}")
    if r.get("skipped_sets"):
        lines.append("")
    return lines + _fig(r, "OOD score histograms")


def samples_md(r: dict[str, Any]) -> list[str]:
    lines = []
    if "short_run" in r:
        s = r["short_run"]
        lines += [f"Fresh short-run chains: {s['steps']} SGLD steps from U(-1, 1) noise "
                  f"(backend {s['backend']}); {_pct(s['conditional_classified_as_y'])} % of the "
                  "class-conditional samples are classified as their class.", "",
                  f"![short-run samples]({s['figure']})", ""]
    if "buffer" in r:
        lines += [f"Replay buffer of the checkpoint ({r['buffer']['capacity']} chains):", "",
                  f"![replay buffer]({r['buffer']['figure']})", ""]
    if "likely_real" in r:
        lines += ["Test images of each class with the highest and lowest p(y|x):", "",
                  f"![most and least likely real images]({r['likely_real']['figure']})", ""]
    return lines


def robustness_md(r: dict[str, Any]) -> list[str]:
    ks = r["refine_steps"]
    lines = [f"Accuracy (%) of {r['n']} test images under PGD ({r['pgd_steps']} steps, "
             f"{r['pgd_restarts']} restart(s), step {r['step_rel']:.3g} x eps), attacking through "
             f"K SGLD refinement steps (step size {r['sgld_step_size']:g}, noise {r['sgld_noise']:g}). "
             f"eps in {r['eps_units']}. The paper's attack ran 100 steps x 20 restarts; a shorter attack "
             "gives upper bounds on robust accuracy.", "",
             "| norm | eps | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---:|" + "---:|" * len(ks)]
    for norm, rows in r["accuracy"].items():
        for eps in sorted(rows, key=float):
            lines.append(f"| {'L-inf' if norm == 'linf' else 'L2'} | {eps} | "
                         + " | ".join(_pct(rows[eps].get(str(k))) for k in ks) + " |")
    return lines + [""] + _fig(r, "robustness curves")


def generation_md(r: dict[str, Any]) -> list[str]:
    lines = []
    if "digits_fid" in r:
        lines += ["| samples | digits IS | digits FID |", "|---|---:|---:|",
                  f"| all ({r['source']}) | {r['digits_is']:.2f} +- {r['digits_is_std']:.2f} | {r['digits_fid']:.1f} |",
                  "", f"In the features of a small digits classifier (jemfast.eval.digits_fidelity), reference: "
                  f"{r['reference']}; comparable between jemfast runs only.", ""]
    if "fid" not in r:
        return lines + [f"Inception IS/FID: {r.get('inception', {}).get('skipped', 'not computed')}", ""]
    lines += ["| samples | Inception Score | FID |", "|---|---:|---:|",
             f"| all ({r['n_fake']}, {r['source']}) | {r['inception_score']:.2f} +- {r['inception_score_std']:.2f} "
             f"| {r['fid']:.1f} |",
             f"| top 10 % by p(y\\|x) | {r['inception_score_top10']:.2f} +- {r['inception_score_top10_std']:.2f} "
             f"| {r['fid_top10']:.1f} |", "",
             f"FID reference: {r['reference']} ({r['n_real']} images). Network: the standard FID Inception "
             "(TF weights, torch-fidelity), as behind published numbers; FID rises as the number of "
             "samples falls, so compare at equal counts.", ""]
    if r.get("note"):
        lines += [f"Note: {r['note']}.", ""]
    return lines


SECTIONS = [("accuracy", "Accuracy", accuracy_md), ("calibration", "Calibration", calibration_md),
            ("ood", "Out-of-distribution detection", ood_md), ("samples", "Samples", samples_md),
            ("robustness", "Adversarial robustness", robustness_md),
            ("generation", "Inception Score and FID", generation_md)]


def write_report(results: dict[str, Any], path: Path) -> None:
    t = results["timings_s"]
    where = ("original JEM format" if results.get("format") == "original"
             else f"step {results['step']}, epoch {results['epoch']}")
    lines = [f"# JEM evaluation: {results['dataset']}", "",
             f"Checkpoint `{results['checkpoint']}` ({where}, "
             f"model {results['model']}); device {results['device_name']}, torch {results['torch_version']}, "
             f"jemfast {results['jemfast_version']}, seed {results['seed']}; {t.get('total', 0):.0f} s.", ""]
    for key, title, fn in SECTIONS:
        if key not in results:
            continue
        lines += [f"## {title}", ""]
        part = results[key]
        lines += [f"Skipped: {part['skipped']}", ""] if "skipped" in part else fn(part)
    path.write_text("\n".join(lines).rstrip() + "\n")
