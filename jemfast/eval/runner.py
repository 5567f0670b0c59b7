"""Run the chosen evaluation parts on one checkpoint; write eval.json, report.md and PNGs."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__
from ..build import resolve_device
from ..compat.loading import load_any_checkpoint
from ..data import load_data
from ..process.interrupt import handling_signals
from ..process.log import get_logger, progress_safe_logging
from ..rundir.directory import write_json
from ..rundir.lock import RunLock
from .common import Skipped, is_image, make_sampler
from .options import EvalOptions, resolve_defaults
from .report import write_report

log = get_logger(__name__)


def default_out(checkpoint: str) -> Path:
    """RUN/eval for RUN/checkpoints/x.pt, else DIR/eval beside the file."""
    parent = Path(checkpoint).resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


@contextlib.contextmanager
def exit_on_signals(prog: str) -> Iterator[None]:
    """While open, SIGINT/SIGTERM end the process at once with one line on stderr
    (``prog: stopped by SIGINT``) and exit code 128 + signal (130, 143).

    Evaluation never changes the checkpoint and writes eval.json atomically at the end, so
    there is nothing to save; exiting from the handler means no KeyboardInterrupt can surface
    as a traceback from deep inside torch or matplotlib. The previous handlers are restored on
    exit (``main`` may be called in-process).
    """
    def handler(signum: int, _frame: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.write(2, f"{prog}: stopped by {signal.Signals(signum).name}\n".encode())
        os._exit(128 + signum)

    with handling_signals(handler):
        yield


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate ``opts.checkpoint``; returns the eval.json dict. Raises UserError/ValueError
    for problems a user can fix (missing/corrupt checkpoint, bad option, missing dataset)."""
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    ck = load_any_checkpoint(opts.checkpoint, device, opts.model_flags)  # jemfast's format or the original's
    model, cfg, buffer = ck["model"], ck["config"], ck["buffer"]
    if opts.data_dir:
        cfg.data.data_dir = opts.data_dir
    data = load_data(cfg.data, device)
    resolve_defaults(opts, data.name)
    out = Path(opts.out) if opts.out else default_out(opts.checkpoint)
    with RunLock(out, "jemfast.eval --out"):  # one process writes an eval directory
        return _run_parts(opts, ck, model, cfg, buffer, data, device, out, t_start)


def _run_parts(opts: EvalOptions, ck: dict[str, Any], model, cfg, buffer, data, device: torch.device,
               out: Path, t_start: float) -> dict[str, Any]:
    torch.manual_seed(opts.seed)
    fmt = ck.get("format", "jemfast")
    where = "original JEM format" if fmt == "original" else f"step {ck['step']}, epoch {ck['epoch']}"
    log.info(f"{opts.checkpoint}: {data.name}, {where}, device {device}; writing to {out}")
    results: dict[str, Any] = {
        "checkpoint": str(opts.checkpoint), "format": fmt, "dataset": data.name, "step": ck["step"],
        "epoch": ck["epoch"],
        "model": cfg.model.name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "jemfast_version": __version__, "seed": opts.seed,
        "what": list(opts.what), "out_dir": str(out), "timings_s": {},
    }
    with progress_safe_logging():
        for part in opts.what:
            t0 = time.perf_counter()
            try:
                results[part] = PARTS[part](opts, model, cfg, buffer, data, device, out)
            except Skipped as exc:
                log.info(f"{exc}")
                results[part] = {"skipped": str(exc)}
            results["timings_s"][part] = round(time.perf_counter() - t0, 2)
            log.info(f"{part} done in {results['timings_s'][part]:.1f} s")
    results["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
    write_json(results, out / "eval.json")
    write_report(results, out / "report.md")
    return results


def _accuracy(opts, model, cfg, buffer, data, device, out):
    from .calibration import accuracy_part

    return accuracy_part(model, data, opts.batch_size)


def _calibration(opts, model, cfg, buffer, data, device, out):
    from .calibration import calibration_part

    return calibration_part(model, data, opts.bins, opts.batch_size, out)


def _ood(opts, model, cfg, buffer, data, device, out):
    from .ood import ood_part

    return ood_part(model, data, tuple(opts.ood), opts.ood_n, opts.batch_size, cfg.data.data_dir,
                    opts.seed, out, opts.progress)


def _samples(opts, model, cfg, buffer, data, device, out):
    from .samples import samples_part

    return samples_part(model, cfg, buffer, data, opts.sample_steps, opts.per_class, opts.backend,
                        device, out)


def _robustness(opts, model, cfg, buffer, data, device, out):
    from .robustness import robustness_part

    gen = torch.Generator().manual_seed(opts.seed)
    idx = torch.randperm(len(data.test), generator=gen)[:opts.attack_n].to(device)
    return robustness_part(model, data.test.x[idx], data.test.y[idx], opts.eps, list(opts.refine_steps),
                           opts.pgd_steps, opts.pgd_step_rel, opts.pgd_restarts, opts.eot,
                           cfg.sampler.step_size, cfg.sampler.noise_std, opts.attack_batch, data.name,
                           out, opts.progress)


def _generation(opts, model, cfg, buffer, data, device, out):
    from .generation import find_inception_weights, generated_images, generation_scores, inception_extractor

    if not is_image(tuple(data.input_shape)):
        raise Skipped(f"generation: IS/FID need images; {data.name} is not an image dataset")
    sampler = make_sampler(cfg, opts.sample_steps, opts.backend, device) if opts.gen_source == "short-run" else None
    n = min(opts.gen_n, buffer.capacity) if opts.gen_source == "buffer" else opts.gen_n
    fake = generated_images(model, buffer, opts.gen_source, sampler, n, data.input_shape, device,
                            opts.batch_size)
    real = data.train.x[torch.randperm(len(data.train), device=device)[:opts.gen_n]]
    res: dict[str, Any] = {"source": opts.gen_source, "reference": f"{data.name} train"}
    if data.name in ("digits", "digits32"):  # no download: the digits classifier's features
        from .digits_fidelity import digits_fidelity

        res.update(digits_fidelity(fake, real, opts.is_splits))
    try:
        weights = find_inception_weights(opts.inception_weights)
    except Skipped as exc:
        if "digits_fid" not in res:
            raise
        res["inception"] = {"skipped": str(exc)}
        return res
    res.update(generation_scores(model, inception_extractor(weights, device), fake, real,
                                 min(opts.batch_size, 100), opts.is_splits, opts.progress))
    res["weights"] = str(weights)
    if data.input_shape[-1] < 32 or data.input_shape[0] == 1:
        res["note"] = (f"{'x'.join(map(str, data.input_shape))} images upscaled to 299x299 RGB: "
                       "IS/FID are not meaningful here, shown only as a pipeline check")
    return res


def digits_quality(run_dir: str | Path, gen_n: int = 1000) -> dict[str, float]:
    """``{"digits_fid", "digits_is"}`` of a finished digits run's replay buffer (``gen_n`` rows)
    against its training digits (:mod:`.digits_fidelity`); what the benchmarks report beside
    accuracy. Writes the evaluation to ``run_dir/eval``."""
    from .options import options_from_args

    opts = options_from_args(["--checkpoint", str(Path(run_dir) / "checkpoints" / "last.pt"), "--what", "generation",
                              "--gen-n", str(gen_n), "--device", "cpu", "--no-progress",
                              "--out", str(Path(run_dir) / "eval")])
    gen = run_eval(opts)["generation"]
    return {k: float(gen.get(k, float("nan"))) for k in ("digits_fid", "digits_is")}


PARTS = {"accuracy": _accuracy, "calibration": _calibration, "ood": _ood, "samples": _samples,
         "robustness": _robustness, "generation": _generation}
