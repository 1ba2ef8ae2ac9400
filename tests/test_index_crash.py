"""Crash safety: a writer killed with SIGKILL at random moments (bench/index_crash.py holds
the loop; `python -m clapedge.bench.index_crash` runs a longer one)."""

from __future__ import annotations

import pytest

from clapedge.bench.index_crash import run_crash_loop

ITERATIONS = 200


@pytest.mark.parametrize("seed", [0])
def test_kill_minus_9_loop_keeps_every_acknowledged_change(tmp_path, seed):
    # run_crash_loop asserts after every kill: the index opens (the lock died with the
    # writer), nothing is damaged, acknowledged adds are present and whole with the vectors
    # that were added, acknowledged removals stay gone, the change in flight is all or nothing
    stats = run_crash_loop(tmp_path / "crash.index", ITERATIONS, seed=seed)
    assert stats.iterations == ITERATIONS
    # the kills landed between and inside commits of every kind (how many were mid-start or
    # caught a change in flight depends on timing: the bench script prints those counts)
    assert stats.acked_adds >= ITERATIONS // 4
    assert stats.acked_removes > 0 and stats.acked_compactions > 0
