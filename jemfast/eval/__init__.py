"""Evaluation of a JEM checkpoint as in the paper's section 5 (``python -m jemfast.eval``).

Parts (``--what``): accuracy, calibration (ECE, reliability diagram), ood (AUROC of log p(x),
max_y p(y|x) and -||d log p(x)/dx||), samples (short-run chains, replay buffer, most/least
likely real images), robustness (PGD L2/L-inf through 0/1/10 SGLD refinement steps),
generation (Inception Score / FID when Inception weights are present; on the digits also the
digits FID / IS of :mod:`.digits_fidelity`, which need no file).

Files: :mod:`.options` (the command's flags, declared once), :mod:`.runner` (runs the parts),
one module per part (:mod:`.calibration`, :mod:`.ood`, :mod:`.robustness`, :mod:`.generation`,
:mod:`.samples`), :mod:`.metrics` (ECE, AUROC through scikit-learn, FID/IS through the standard
FID Inception network), :mod:`.report` and :mod:`.figures` (report.md and the PNGs),
:mod:`.common` (what the parts share).

Library use: ``run_eval(options_from_args([...]))`` or the parts' functions directly, e.g.
:func:`jemfast.eval.metrics.expected_calibration_error`, :func:`jemfast.eval.metrics.auroc`,
:func:`jemfast.eval.ood.ood_scores`, :func:`jemfast.eval.robustness.pgd_robust`,
:func:`jemfast.eval.generation.frechet_distance`.
"""
from .metrics import auroc, expected_calibration_error
from .options import EvalOptions, options_from_args
from .runner import run_eval

__all__ = ["EvalOptions", "auroc", "expected_calibration_error", "options_from_args", "run_eval"]
