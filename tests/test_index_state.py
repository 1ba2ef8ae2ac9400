"""Property test: after any sequence of add / remove / compact / reopen, search (by the writer
and by a reader opened before the changes) equals brute force over the live records.

Vectors and queries hold multiples of 1/4 in a few dimensions, so every inner product is
exact in float32 whatever the summation order: results must match id for id, ties broken
by the lower id, scores bit for bit."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clapedge.runtime.index import Filter, Index

DIM = 4
PATHS = ["/a/1.wav", "/a/2.wav", "/b/1.wav", "/b/c/2.wav"]

coords = st.integers(-4, 4).map(lambda v: v / 4)
vectors = st.lists(st.lists(coords, min_size=DIM, max_size=DIM), min_size=1, max_size=6)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="idx-state-"))
        self.index = Index.create(self.dir / "i", "ef" * 32, DIM, dtype="float32")
        self.reader = Index.open(self.dir / "i", readonly=True)
        self.live: dict[int, tuple[np.ndarray, str, float]] = {}

    def teardown(self):
        self.index.close()
        self.reader.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(rows=vectors, path=st.sampled_from(PATHS), duration=st.sampled_from([1.0, 5.0, 9.0]))
    def add(self, rows, path, duration):
        x = np.array(rows, dtype=np.float32)
        ids = self.index.add_embeddings(x, path, duration_s=duration)
        assert not set(ids.tolist()) & set(self.live)
        for i, v in zip(ids.tolist(), x):
            self.live[i] = (v, path, duration)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def remove_ids(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), max_size=4, unique=True))
        assert self.index.remove(ids) == len(ids)
        for i in ids:
            del self.live[i]

    @rule(prefix=st.sampled_from(["/a/", "/b/c/", "/b/1.wav", "/zzz"]))
    def remove_prefix(self, prefix):
        gone = [i for i, (_, p, _) in self.live.items() if p.startswith(prefix)]
        assert self.index.remove(path_prefix=prefix) == len(gone)
        for i in gone:
            del self.live[i]

    @rule()
    def compact(self):
        self.index.compact()

    @rule()
    def reopen(self):
        self.index.close()
        self.index = Index.open(self.dir / "i")

    @invariant()
    def search_equals_brute_force(self):
        rng = np.random.default_rng(len(self.live))
        q = (rng.integers(-4, 5, size=(3, DIM)) / 4).astype(np.float32)
        flt = Filter(path_prefix="/a/") if len(self.live) % 2 else Filter(max_duration=5.0)
        for f in (None, flt):
            keep = [i for i, (_, p, d) in sorted(self.live.items())
                    if f is None or (p.startswith("/a/") if f.path_prefix else d <= 5.0)]
            for idx in (self.index, self.reader):
                hits = idx.search(q, k=5, filter=f)
                for qi, row in enumerate(hits):
                    if keep:
                        ids = np.array(keep)
                        scores = np.stack([self.live[i][0] for i in keep]) @ q[qi]
                        order = np.lexsort((ids, -scores))[:5]
                        want = (ids[order].tolist(), scores[order].tolist())
                    else:
                        want = ([], [])
                    assert ([h.id for h in row], [h.score for h in row]) == want
        assert len(self.index) == len(self.live) == len(self.reader)


TestIndexStateMachine = IndexMachine.TestCase
TestIndexStateMachine.settings = settings(
    max_examples=30, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
