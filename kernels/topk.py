"""Python twin of the native ``topk`` kernel (faiss ``knn`` style: one function)."""

from __future__ import annotations

import numpy as np

from clapedge.kernels import _native


def _as_f32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """Contiguous float32 arrays are passed without a copy; other real dtypes are converted
    (one copy); anything else is refused."""
    arr = np.asarray(x)
    if arr.ndim == 1 and name == "queries":
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _describe_non_finite(queries: np.ndarray, gallery: np.ndarray) -> str:
    for name, arr in (("queries", queries), ("gallery", gallery)):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            return f"{name} contain NaN or Inf (first at row {row})"
    return "scores overflowed float32 (values too large); normalise the embeddings"


def topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    threads: int = 0,
    allow: np.ndarray | None = None,
    min_score: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product.

    Args:
        queries: [Q, D] (or [D]) query vectors.
        gallery: [N, D] gallery vectors.
        k: number of results per query (> 0). When k > N, the tail is padded with id -1 and
            score -inf.
        threads: worker threads (0: all cores); the gallery is split across them.
        allow: optional boolean mask [N] of rows that may be returned.
        min_score: optional minimum score, one float or one per query.

    Returns:
        (scores float32 [Q, k], ids int64 [Q, k]) sorted by score descending, ties by lower id.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    q = _as_f32_matrix(queries, "queries")
    g = _as_f32_matrix(gallery, "gallery")
    if g.shape[0] and q.shape[1] != g.shape[1]:
        raise ValueError(
            f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}; they must match")
    if q.shape[1] == 0:
        raise ValueError("vectors must have a positive dimension")
    if g.shape[0] == 0:
        g = np.zeros((0, q.shape[1]), dtype=np.float32)
    allow_bits = None
    if allow is not None:
        mask = np.asarray(allow)
        if mask.dtype != np.bool_ or mask.shape != (g.shape[0],):
            raise ValueError(f"allow must be a boolean array of shape ({g.shape[0]},)")
        allow_bits = np.packbits(mask, bitorder="little")
    thresholds = None
    if min_score is not None:
        thresholds = np.ascontiguousarray(
            np.broadcast_to(np.asarray(min_score, dtype=np.float32), (q.shape[0],)))
        if not np.isfinite(thresholds).all():
            raise ValueError("min_score must be finite")
    scores = np.empty((q.shape[0], int(k)), dtype=np.float32)
    ids = np.empty((q.shape[0], int(k)), dtype=np.int64)
    try:
        _native.topk_f32(q, g, int(k), int(threads), allow_bits, thresholds, scores, ids)
    except ValueError as e:
        if "not finite" in str(e):
            raise ValueError(_describe_non_finite(q, g)) from None
        raise
    return scores, ids
