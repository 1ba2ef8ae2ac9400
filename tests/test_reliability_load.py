"""Load and concurrency: threads calling one Runtime get the serial results, bit for bit,
without errors and without memory growth (a small version of ``python -m
clapedge.bench.load``)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle  # noqa: E402

from clapedge.bench import load  # noqa: E402
from clapedge.runtime import Runtime  # noqa: E402


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("load") / "b", tagger_k=3)
    return Runtime(root, threads=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc (Linux)")
def test_threads_equal_serial_without_errors_or_growth(runtime, tmp_path):
    pool = load.make_pool(60, 20, min_s=0.1, max_s=10.0, seed=1, workdir=tmp_path)
    plans = load.make_calls(pool, threads=4, calls=200, mix=load.parse_mix(load.DEFAULT_MIX),
                            seed=1)
    result = load.run_load(runtime, pool, plans, sample_s=0.02)
    assert result.errors == []
    assert result.checked == 800 and result.mismatches == 0 and result.ok
    assert set(result.counts) == set(load.KINDS)
    # the pool has long audio (several windows), short audio (padded), files and arrays
    assert min(pool.seconds) < 0.5 and max(pool.seconds) > 3.0
    assert any(isinstance(a, str) for a in pool.audio) and any(
        isinstance(a, tuple) and a[0].dtype == np.int16 for a in pool.audio)
    assert len(result.samples) >= 3
    # after warm-up the process does not grow (tens of MiB would be a leak of the calls)
    assert result.growth(0.2, 1.0) < 16 * 2 ** 20, result.to_dict()["rss_mb"]


def test_a_mismatch_and_an_error_are_reported(runtime, tmp_path):
    pool = load.make_pool(3, 3, min_s=0.5, max_s=1.0, seed=2, workdir=tmp_path)
    plans = load.make_calls(pool, threads=2, calls=6, mix={"embed_audio": 1.0}, seed=2)

    class Flaky:
        """Serial pass correct; threaded calls off by one ulp or failing."""

        def __init__(self, rt):
            self.rt, self.n, self.lock = rt, 0, threading.Lock()

        def embed_audio(self, *a, **kw):
            with self.lock:  # each call gets its own number (threads call concurrently)
                self.n += 1
                n = self.n
            out = self.rt.embed_audio(*a, **kw)
            if n > 3 and n % 2:
                return np.nextafter(out, np.float32(2))
            if n == 4:
                raise RuntimeError("boom")
            return out

    result = load.run_load(Flaky(runtime), pool, plans, sample_s=0.01)
    assert not result.ok
    assert result.mismatches > 0 and 0 < result.max_abs_diff < 1e-6
    assert any("boom" in e for e in result.errors)


def test_identical_is_bitwise():
    a = np.array([0.0, 1.0], np.float32)
    assert load.identical(a, a.copy())
    assert not load.identical(a, np.array([-0.0, 1.0], np.float32))
    assert not load.identical(a, a.astype(np.float64))
