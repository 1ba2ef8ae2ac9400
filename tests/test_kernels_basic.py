"""The fused top-k kernel: API, SIMD dispatch, threads, ties and input errors."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from clapedge.kernels import (Gallery, KernelInputError, available_simd_levels, best_simd_level,
                              set_simd_level, simd_level, topk)


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


def test_one_dimensional_query():
    g = np.eye(4, dtype=np.float32)
    s, i = topk(np.array([0, 0, 1, 0], np.float32), g, 1)
    assert i.tolist() == [[2]] and s.tolist() == [[1.0]]


@pytest.mark.parametrize("dtype", ["float32", "fp16", "int8"])
@pytest.mark.parametrize("level", available_simd_levels())
def test_ties_prefer_lower_id_across_threads_and_chunks(dtype, level):
    # 60,000 identical rows: many chunks over 2-3 threads; the lowest ids must win.
    g = np.ones((60_000, 8), dtype=np.float32)
    gal = g if dtype == "float32" else Gallery(g, dtype)
    set_simd_level(level)
    try:
        for threads in (1, 2, 3):
            _, ids = topk(np.ones((3, 8), dtype=np.float32), gal, 5, threads=threads)
            assert ids.tolist() == [[0, 1, 2, 3, 4]] * 3
    finally:
        set_simd_level(None)


def test_threads_give_the_same_result():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((100_000, 24)).astype(np.float32)
    q = rng.standard_normal((5, 24)).astype(np.float32)
    ref = topk(q, g, 7, threads=1)
    for threads in (2, 3, 8):
        s, i = topk(q, g, 7, threads=threads)
        np.testing.assert_array_equal(i, ref[1])
        np.testing.assert_array_equal(s, ref[0])


def test_allow_list_as_mask_or_ids():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((50, 6)).astype(np.float32)
    q = rng.standard_normal((2, 6)).astype(np.float32)
    ids_allowed = np.array([3, 10, 11, 40])
    mask = np.zeros(50, bool)
    mask[ids_allowed] = True
    a = topk(q, g, 10, allow=mask)
    b = topk(q, g, 10, allow=ids_allowed)
    np.testing.assert_array_equal(a[1], b[1])
    assert set(a[1][0, :4].tolist()) == set(ids_allowed.tolist())
    assert (a[1][:, 4:] == -1).all()


def test_min_score_per_query():
    g = np.diag(np.arange(1, 6, dtype=np.float32))  # row i scores (i+1) * q[i]
    q = np.ones((2, 5), np.float32)
    s, i = topk(q, g, 5, min_score=np.array([3.5, 0.0], np.float32))
    assert i[0].tolist() == [4, 3, -1, -1, -1]
    assert i[1].tolist() == [4, 3, 2, 1, 0]
    s, i = topk(q, g, 5, min_score=4.0)
    assert i[0].tolist() == [4, 3, -1, -1, -1]


def test_contiguous_float32_gallery_is_not_copied(monkeypatch):
    from clapedge.kernels import _native
    seen = {}
    real = _native.topk

    def spy(q, **kw):
        seen["vectors"] = kw["vectors"]
        return real(q, **kw)

    monkeypatch.setattr(_native, "topk", spy)
    g = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    topk(g[:1], g, 2)
    assert seen["vectors"] is g


def test_other_dtypes_and_layouts_are_converted():
    rng = np.random.default_rng(2)
    g64 = rng.standard_normal((30, 8))
    q = rng.standard_normal((2, 8))
    ref = topk(q.astype(np.float32), g64.astype(np.float32), 4)
    for g in (g64, np.asfortranarray(g64), g64.astype(np.float32)[:, ::1]):
        np.testing.assert_array_equal(topk(q, g, 4)[1], ref[1])
    np.testing.assert_array_equal(topk(q, (g64 * 100).astype(np.int32), 4)[1],
                                  topk(q, (g64 * 100).astype(np.int32).astype(np.float32), 4)[1])


# -- SIMD dispatch ----------------------------------------------------------------------------

def test_simd_levels():
    levels = available_simd_levels()
    assert levels[-1] == "scalar" and levels[0] == best_simd_level()
    assert simd_level() == best_simd_level()
    with pytest.raises(ValueError, match="unknown SIMD level"):
        set_simd_level("sse9")
    missing = [lv for lv in ("avx512", "avx2", "neon", "neon_dotprod") if lv not in levels]
    for lv in missing:
        with pytest.raises(ValueError, match="not available"):
            set_simd_level(lv)


def test_env_var_forces_a_lower_level(monkeypatch, caplog):
    monkeypatch.setenv("CLAPEDGE_SIMD", "scalar")
    assert simd_level() == "scalar"
    monkeypatch.setenv("CLAPEDGE_SIMD", "no-such-level")
    with caplog.at_level(logging.WARNING, logger="clapedge.kernels"):
        assert simd_level() == best_simd_level()
    assert "not available" in caplog.text
    set_simd_level("scalar")
    monkeypatch.setenv("CLAPEDGE_SIMD", best_simd_level())
    try:
        assert simd_level() == "scalar", "set_simd_level wins over the variable"
    finally:
        set_simd_level(None)


def test_import_logs_the_chosen_level():
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
            "import clapedge.kernels\n")
    env = dict(os.environ, CLAPEDGE_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "clapedge.kernels SIMD level scalar" in out.stderr


# -- errors -----------------------------------------------------------------------------------

def test_nan_in_gallery_names_the_row():
    g = np.zeros((10, 4), dtype=np.float32)
    g[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"gallery contains NaN or Inf \(first at row 7\)"):
        topk(np.ones((1, 4), dtype=np.float32), g, 3)
    g[7, 2] = np.inf
    with pytest.raises(ValueError, match="row 7"):
        topk(np.ones((1, 4), dtype=np.float32), g.astype(np.float16), 3)
    with pytest.raises(ValueError, match=r"gallery vectors contain NaN or Inf \(first at row 7\)"):
        Gallery(g, "int8")


def test_nan_in_queries_names_the_row():
    q = np.ones((3, 4), np.float32)
    q[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"queries contain NaN or Inf \(first at row 2\)"):
        topk(q, np.ones((5, 4), np.float32), 1)


def test_overflowing_scores_are_reported():
    g = np.full((3, 4), 1e30, np.float32)
    with pytest.raises(ValueError, match="overflowed"):
        topk(np.full((1, 4), 1e30, np.float32), g, 1)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk(np.ones((1, 4), np.float32), np.ones((3, 4), np.float32), k)


def test_dim_mismatch():
    with pytest.raises(ValueError, match="dim 4 but the gallery has dim 5"):
        topk(np.ones((1, 4), np.float32), np.ones((3, 5), np.float32), 1)
    with pytest.raises(ValueError, match="dim 4 but the gallery has dim 5"):
        topk(np.ones((1, 4), np.float32), Gallery(np.ones((3, 5), np.float32)), 1)


@pytest.mark.parametrize("bad", [np.ones((3, 4), complex), np.ones((3, 4), bool),
                                 np.array([[object()] * 4] * 3), np.ones((3, 4, 1), np.float32),
                                 np.ones((3, 0), np.float32)])
def test_refused_galleries(bad):
    with pytest.raises(ValueError, match="gallery"):
        topk(np.ones((1, 4), np.float32), bad, 1)


def test_bad_filters():
    g, q = np.ones((5, 3), np.float32), np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        topk(q, g, 1, allow=np.ones(4, bool))
    with pytest.raises(ValueError, match="outside \\[0, 5\\)"):
        topk(q, g, 1, allow=np.array([0, 5]))
    with pytest.raises(ValueError, match="boolean mask"):
        topk(q, g, 1, allow=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="one per query"):
        topk(q, g, 1, min_score=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        topk(q, g, 1, min_score=np.nan)
    with pytest.raises(ValueError, match="rerank_factor"):
        topk(q, g, 1, rerank_factor=-1)
    with pytest.raises(ValueError, match="device"):
        topk(q, g, 1, device="tpu")


def test_errors_are_clapedge_errors():
    from clapedge.errors import ClapEdgeError
    with pytest.raises(ClapEdgeError):
        topk(np.ones((1, 4), np.float32), np.ones((3, 5), np.float32), 1)


def test_no_queries():
    g = np.ones((5, 4), np.float32)
    for gal in (g, Gallery(g, "int8"), Gallery(g, "fp16")):
        s, i = topk(np.zeros((0, 4), np.float32), gal, 3)
        assert s.shape == i.shape == (0, 3)
