"""Property tests of the fused top-k kernel against numpy brute force in float64, for every
storage dtype and every SIMD level this machine can run (the SIMD level is switched inside
each example, so one example checks all of them)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clapedge.kernels import (Gallery, available_simd_levels, quantize_int8, set_simd_level,
                              simd_level, topk)

LEVELS = available_simd_levels()
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def level(name: str):
    set_simd_level(name)
    try:
        yield
    finally:
        set_simd_level(None)


def float_error_bound(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """A bound on |float32 dot - exact dot| for any summation order: D * eps * sum|q_i g_i|."""
    d = q.shape[1]
    return (d + 2) * 2.0 ** -23 * (np.abs(q).astype(np.float64) @ np.abs(g).astype(np.float64).T) + 1e-30


def check_topk(scores, ids, ref, tol, k, allowed=None, min_score=None):
    """The result is a correct top-k of `ref` (float64 [Q, N]) up to `tol` ([Q, N]): right
    scores, sorted, ties by lower id, nothing better left out, filters obeyed, padding."""
    nq, n = ref.shape
    allowed = np.ones(n, bool) if allowed is None else allowed
    assert scores.shape == ids.shape == (nq, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    for i in range(nq):
        m = int((ids[i] >= 0).sum())
        got, s = ids[i, :m], scores[i, :m].astype(np.float64)
        assert (ids[i, m:] == -1).all() and np.isneginf(scores[i, m:]).all(), "bad padding"
        assert len(set(got.tolist())) == m, "duplicate ids"
        assert allowed[got].all(), "returned a row outside the allow-list"
        assert (np.diff(s) <= 0).all(), "not sorted by score"
        eq = np.diff(s) == 0
        assert (np.diff(got)[eq] > 0).all(), "equal scores not ordered by id"
        np.testing.assert_array_less(np.abs(s - ref[i, got]), tol[i, got] + 1e-7)
        rest = np.ones(n, bool)
        rest[got] = False
        rest &= allowed
        floor = -np.inf if min_score is None else float(min_score[i])
        if min_score is not None:
            assert (s >= floor).all(), "returned a row under min_score"
        if m == k:
            worst = s[-1]
            assert (ref[i, rest] <= worst + tol[i, rest] + tol[i, got].max() + 1e-7).all(), \
                "left out a better row"
        else:  # fewer than k: everything left out must be under min_score
            assert (ref[i, rest] < floor + tol[i, rest] + 1e-7).all(), "left out a qualifying row"


# -- inputs -----------------------------------------------------------------------------------

@st.composite
def problems(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 129, 257]))
    d = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 128]))
    nq = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 9, 13, 17, 33]))
    k = draw(st.sampled_from([1, 2, 3, 5, 10, 20, 300]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d)).astype(np.float32)
    if n > 2 and draw(st.booleans()):  # duplicate rows: ties must go to the lower id
        src = rng.integers(0, n, size=n // 2)
        dst = rng.integers(0, n, size=n // 2)
        g[dst] = g[src]
    q = rng.standard_normal((nq, d)).astype(np.float32)
    if n and draw(st.booleans()):  # some queries equal to gallery rows
        q[0] = g[rng.integers(0, n)]
    allowed = None
    if draw(st.booleans()):
        allowed = rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    min_score = None
    if draw(st.booleans()):
        min_score = rng.normal(0, np.sqrt(d), size=nq).astype(np.float32)
    return g, q, k, allowed, min_score


def run_all_levels(q, gallery, k, **kw):
    out = {}
    for name in LEVELS:
        with level(name):
            out[name] = topk(q, gallery, k, **kw)
    return out


# -- the properties ---------------------------------------------------------------------------

@SETTINGS
@given(problems())
def test_float32_matches_brute_force(p):
    g, q, k, allowed, min_score = p
    ref = q.astype(np.float64) @ g.astype(np.float64).T
    tol = float_error_bound(q, g)
    for name, (s, i) in run_all_levels(q, g, k, allow=allowed, min_score=min_score).items():
        check_topk(s, i, ref, tol, k, allowed, min_score)


@SETTINGS
@given(problems())
def test_fp16_matches_brute_force_of_the_fp16_rows(p):
    g, q, k, allowed, min_score = p
    gal = Gallery(g, "fp16")
    g16 = gal.decode()
    ref = q.astype(np.float64) @ g16.astype(np.float64).T
    tol = float_error_bound(q, g16)
    results = run_all_levels(q, gal, k, allow=allowed, min_score=min_score)
    for name, (s, i) in results.items():
        check_topk(s, i, ref, tol, k, allowed, min_score)
    # a raw float16 array takes the same path without a copy
    s, i = topk(q, g.astype(np.float16), k, allow=allowed, min_score=min_score)
    check_topk(s, i, ref, tol, k, allowed, min_score)


@SETTINGS
@given(problems())
def test_int8_matches_brute_force_of_the_dequantised_rows(p):
    g, q, k, allowed, min_score = p
    gal = Gallery(g, "int8", rerank=False)
    qc, qs = quantize_int8(q)
    dots = qc.astype(np.int64) @ gal.codes().astype(np.int64).T  # exact integers
    ref = dots * gal.scales.astype(np.float64)[None, :] * qs.astype(np.float64)[:, None]
    tol = 4 * 2.0 ** -24 * np.abs(ref) + 1e-30  # only the two float32 scale products round
    results = run_all_levels(q, gal, k, allow=allowed, min_score=min_score)
    for name, (s, i) in results.items():
        check_topk(s, i, ref, tol, k, allowed, min_score)
    first = next(iter(results.values()))
    for name, (s, i) in results.items():  # integer dots: every level gives the same bits
        np.testing.assert_array_equal(s, first[0], err_msg=name)
        np.testing.assert_array_equal(i, first[1], err_msg=name)


@SETTINGS
@given(problems())
def test_int8_rerank_is_exact_when_every_row_is_a_candidate(p):
    g, q, k, allowed, min_score = p
    gal = Gallery(g, "int8", rerank=True)
    factor = max(1, -(-g.shape[0] // k))  # k * factor >= N: the re-rank sees every row
    ref = q.astype(np.float64) @ g.astype(np.float64).T
    tol = float_error_bound(q, g)
    results = run_all_levels(q, gal, k, allow=allowed, min_score=min_score, rerank_factor=factor)
    for name, (s, i) in results.items():
        check_topk(s, i, ref, tol, k, allowed, min_score)
        # the re-rank scores are the float32 path's scores, bit for bit
        with level(name):
            s32, i32 = topk(q, g, k, allow=allowed, min_score=min_score)
        np.testing.assert_array_equal(s, s32, err_msg=name)
        np.testing.assert_array_equal(i, i32, err_msg=name)


@pytest.mark.parametrize("name", LEVELS)
def test_int8_rerank_recall_on_gaussian_data(name):
    """The hardest case for int8: random Gaussian data, no structure. Recall@10 of int8 +
    re-rank (k' = 4k) against exact float32 must be >= 0.999."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal((30_000, 128)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((100, 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    with level(name):
        _, ids = topk(q, Gallery(g, "int8"), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist())])
    assert recall >= 0.999


@pytest.mark.parametrize("name", LEVELS)
def test_int8_rerank_gives_exact_ids_on_well_separated_data(name):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((50, 96)).astype(np.float32)
    g = np.repeat(centers, 40, axis=0) + 0.05 * rng.standard_normal((2000, 96)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = centers[:20] / np.linalg.norm(centers[:20], axis=1, keepdims=True)
    with level(name):
        s32, i32 = topk(q, g, 10)
        s8, i8 = topk(q, Gallery(g, "int8"), 10)
    np.testing.assert_array_equal(i8, i32)
    np.testing.assert_array_equal(s8, s32)


@pytest.mark.parametrize("d,nq", [(64, 8), (128, 16), (128, 17), (192, 33), (512, 40)])
def test_int8_tiles_agree_bit_for_bit(d, nq):
    """The shapes where the AMX level takes the int8 scan (dims a multiple of 64, 8+ queries;
    whole and partial tiles of 16 queries and 32 rows): every level gives the same bits."""
    rng = np.random.default_rng(d + nq)
    g = rng.standard_normal((1003, d)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    gal = Gallery(g, "int8", rerank=False)
    allowed = rng.random(1003) < 0.7
    results = run_all_levels(q, gal, 12, allow=allowed)
    first = results["scalar"]
    for name, (s, i) in results.items():
        np.testing.assert_array_equal(i, first[1], err_msg=name)
        np.testing.assert_array_equal(s, first[0], err_msg=name)


def test_every_level_was_exercised():
    assert "scalar" in LEVELS
    assert simd_level() == LEVELS[0], "the default is the best level"
