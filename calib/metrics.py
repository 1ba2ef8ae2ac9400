"""Task metrics of the seed papers, in numpy: classification (accuracy, UAR, macro-F1),
retrieval (R@k, attribute-match precision@k) and ordinal agreement (Kendall's tau-b)."""

from __future__ import annotations

import numpy as np


def classification(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, UAR (unweighted average recall over the classes present) and macro-F1."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    recalls, f1s = [], []
    for c in range(n_classes):
        true_c = y_true == c
        pred_c = y_pred == c
        tp = float(np.sum(true_c & pred_c))
        if true_c.any():
            recalls.append(tp / float(true_c.sum()))
            precision = tp / float(pred_c.sum()) if pred_c.any() else 0.0
            recall = tp / float(true_c.sum())
            f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "uar": float(np.mean(recalls)) if recalls else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
    }


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable handled), O(n^2) — fine for eval sets."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), k=1)
    dx, dy = dx[upper], dy[upper]
    concordant_minus_discordant = float(np.sum(dx * dy))
    n_x = float(np.sum(dx != 0))
    n_y = float(np.sum(dy != 0))
    if n_x == 0 or n_y == 0:
        return 0.0
    return concordant_minus_discordant / np.sqrt(n_x * n_y)


def recall_at_k(similarity: np.ndarray, targets: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """similarity [Q, N]; targets [Q] index of the right item. R@k and median rank (1-based)."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranks = np.argmax(order == np.asarray(targets)[:, None], axis=1) + 1
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    return out


def match_precision_at_k(similarity: np.ndarray, relevant: np.ndarray,
                         ks=(1, 10)) -> dict[str, float]:
    """similarity [Q, N]; relevant [Q, N] bool (the item has every attribute the query asks
    for). Mean fraction of relevant items among the top k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    out = {}
    for k in ks:
        top = order[:, :k]
        out[f"P@{k}"] = float(np.mean(np.take_along_axis(relevant, top, axis=1)))
    return out
