"""The native fused similarity/top-k kernel against numpy brute force."""

import numpy as np
import pytest

from clapedge.kernels import topk


def brute_force(q, g, k):
    s = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(g.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.mark.parametrize("n,d,q,k", [(1000, 17, 3, 5), (5, 8, 2, 10), (0, 4, 1, 3), (257, 64, 16, 1)])
def test_matches_brute_force(n, d, q, k):
    rng = np.random.default_rng(n + d)
    g = rng.standard_normal((n, d)).astype(np.float32)
    qs = rng.standard_normal((q, d)).astype(np.float32)
    scores, ids = topk(qs, g, k)
    assert scores.shape == (q, k) and ids.shape == (q, k)
    kk = min(k, n)
    ref_s, ref_i = brute_force(qs, g, kk)
    np.testing.assert_array_equal(ids[:, :kk], ref_i)
    np.testing.assert_allclose(scores[:, :kk], ref_s, rtol=1e-5, atol=1e-5)
    assert (ids[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all()


def test_ties_prefer_lower_id():
    g = np.ones((10, 4), dtype=np.float32)
    _, ids = topk(np.ones((1, 4), dtype=np.float32), g, 3)
    assert ids.tolist() == [[0, 1, 2]]


def test_nan_is_a_clear_error():
    g = np.zeros((10, 4), dtype=np.float32)
    g[7, 2] = np.nan
    with pytest.raises(ValueError, match="gallery contain NaN or Inf .*row 7"):
        topk(np.ones((1, 4), dtype=np.float32), g, 3)


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk(np.ones((1, 4), np.float32), np.ones((3, 4), np.float32), k)


def test_dim_mismatch():
    with pytest.raises(ValueError, match="dim 4 but gallery has dim 5"):
        topk(np.ones((1, 4), np.float32), np.ones((3, 5), np.float32), 1)
