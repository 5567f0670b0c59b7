"""Plain numeric metrics on NumPy arrays: expected calibration error and AUROC.

- ECE (Guo et al., 2017): confidences split into ``n_bins`` equal-width bins
  ``B_m = ((m-1)/M, m/M]`` (a confidence of exactly 0 goes to the first bin);
  ``ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|``. Written here because the library versions
  bin differently at the edges (torchmetrics' bins are left-closed and put a confidence of
  exactly 1, common with saturated softmax, in a bin of its own).
- AUROC: scikit-learn's ``roc_auc_score`` (ties count one half). Convention used everywhere in
  jemfast.eval: in-distribution is the positive class and a higher score means "more
  in-distribution". NaN scores are treated as -inf (least in-distribution).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 20) -> dict[str, np.ndarray]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (NaN for empty bins), and edges."""
    if n_bins < 1:
        raise ValueError(f"bins: must be >= 1, got {n_bins}")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError("confidence and correct must have the same length")
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, acc_sum / count, np.nan)
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count,
            "confidence": mean_conf, "accuracy": mean_acc}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 20) -> float:
    """ECE in [0, 1] of top-1 ``confidence`` (max_y p(y|x)) against ``correct`` (0/1)."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] / n * gaps).sum())


def auroc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the ROC curve with ``pos_scores`` (in-distribution) as the positive class;
    NaN when either side is empty."""
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.nan_to_num(np.concatenate([pos, neg]), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    # AUROC depends only on the order of the scores: dense ranks keep order and ties and are
    # finite, which roc_auc_score requires (it refuses +-inf)
    ranks = np.unique(scores, return_inverse=True)[1].astype(np.float64)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(labels, ranks))
