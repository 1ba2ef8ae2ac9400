"""runtime/index: the Index API on synthetic embeddings (search vs brute force, filters inside
the kernel, removals, compaction, the writer lock, read-only opening, bundle identity)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from clapedge.runtime.catalog import CATALOG_FILE
from clapedge.runtime.index import (Filter, Index, IndexBundleMismatchError, IndexFormatError,
                                    IndexLockedError, IndexReadOnlyError, SearchHit,
                                    bundle_fingerprint)

SHA = "ab" * 32
DIM = 16


def unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = queries @ vectors.T
    out = []
    for row in scores:
        order = np.lexsort((ids, -row))[:k]
        out.append((ids[order].tolist(), row[order]))
    return out


@pytest.fixture
def index(tmp_path):
    idx = Index.create(tmp_path / "a.index", SHA, DIM, dtype="float32")
    yield idx
    idx.close()


def fill(idx: Index, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = unit(n, seed)
    paths = [f"/data/{'a' if i % 3 else 'b'}/clip{i:04d}.wav" for i in range(n)]
    ids = idx.add_embeddings(x, paths, start_s=[i % 7 for i in range(n)],
                             end_s=[i % 7 + 2 for i in range(n)],
                             duration_s=[float(i % 20) for i in range(n)],
                             tags=[{"speaker": f"s{i % 4}", "odd": bool(i % 2)}
                                   for i in range(n)])
    return x, ids


def test_search_equals_brute_force_across_segments(index):
    x1, ids1 = fill(index, 200, seed=1)
    x2 = unit(150, 2)
    ids2 = index.add_embeddings(x2, "/data/c.wav", duration_s=3.0)
    assert ids2[0] == ids1[-1] + 1 and len(index) == 350
    q = unit(5, 3)
    hits = index.search(q, k=7)
    allx, allids = np.concatenate([x1, x2]), np.concatenate([ids1, ids2])
    for row, (want_ids, want_scores) in zip(hits, brute(q, allx, allids, 7)):
        assert [h.id for h in row] == want_ids
        np.testing.assert_allclose([h.score for h in row], want_scores, atol=1e-5)


def test_hits_carry_metadata(index):
    x, ids = fill(index, 30)
    (hit,) = index.search(x[4], k=1)[0]
    assert isinstance(hit, SearchHit)
    assert hit.id == ids[4] and hit.path == "/data/a/clip0004.wav"
    assert (hit.start, hit.end, hit.duration) == (4.0, 6.0, 4.0)
    assert hit.tags == {"speaker": "s0", "odd": False}
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert set(hit.to_dict()) == {"id", "path", "start", "end", "duration", "score", "tags"}


def test_int8_index_rescores_exactly_and_finds_the_neighbours(tmp_path):
    x = unit(2000, 5, dim=32)
    with Index.create(tmp_path / "q.index", SHA, 32) as idx:  # int8 + float32 re-rank copy
        assert (idx.dtype, idx.rerank_dtype) == ("int8", "float32")
        idx.add_embeddings(x[:1200], "/a")
        idx.add_embeddings(x[1200:], "/b")
        q = unit(20, 6, dim=32)
        hits = idx.search(q, k=10)
        exact = brute(q, x, np.arange(2000), 10)
        found = sum(len({h.id for h in row} & set(want)) for row, (want, _) in zip(hits, exact))
        assert found >= 0.98 * 200
        for row, qv in zip(hits, q):  # the scores are the exact inner products
            np.testing.assert_allclose([h.score for h in row], x[[h.id for h in row]] @ qv,
                                       atol=1e-5)
        np.testing.assert_array_equal(idx.vectors([3, 1500]), x[[3, 1500]])


def test_filters_are_an_allow_list_inside_the_kernel(index):
    x, ids = fill(index, 300)
    q = unit(3, 9)

    def check(flt: Filter, keep) -> None:
        allowed = np.array([i for i in range(300) if keep(i)])
        hits = index.search(q, k=5, filter=flt)
        for row, (want, _) in zip(hits, brute(q, x[allowed], ids[allowed], 5)):
            assert [h.id for h in row] == want

    check(Filter(path_prefix="/data/b/"), lambda i: i % 3 == 0)
    check(Filter(min_duration=5, max_duration=6), lambda i: 5 <= i % 20 <= 6)
    check(Filter(tags={"speaker": "s1"}), lambda i: i % 4 == 1)
    check(Filter(tags={"odd": True, "speaker": "s3"}), lambda i: i % 4 == 3)
    check(Filter(path_prefix="/data/a/", max_duration=0.5), lambda i: i % 3 and i % 20 == 0)
    # a rare match still fills k from the whole index: no over-fetching
    hits = index.search(q, k=50, filter=Filter(path_prefix="/data/a/clip001"))
    assert [len(row) for row in hits] == [7, 7, 7]  # clip0010..19 but 12, 15, 18 (in b/)
    assert index.search(q, k=3, filter=Filter(path_prefix="/nowhere")) == [[], [], []]


def test_remove_and_compact(index):
    x, ids = fill(index, 120)
    x2 = unit(30, 4)
    ids2 = index.add_embeddings(x2, "/data/z.wav")
    assert index.remove(ids[:10]) == 10
    assert index.remove(ids[:12]) == 2  # already removed ones do not count
    assert index.remove(path_prefix="/data/b/") == 36  # 40 b's, 4 of them already gone
    assert index.remove(paths=["/data/z.wav"]) == 30
    live = np.array([i for i in range(120) if i >= 12 and i % 3])
    assert len(index) == len(live)
    q = unit(4, 8)

    def same() -> None:
        for row, (want, _) in zip(index.search(q, k=6), brute(q, x[live], ids[live], 6)):
            assert [h.id for h in row] == want

    same()
    stats = index.compact()
    assert stats["segments"] == 2 and stats["segments_after"] == 1
    assert stats["records"] == len(live)
    assert index.info().tombstones == 0 and len(index.info().segments) == 1
    same()  # ids survive compaction
    np.testing.assert_array_equal(index.vectors(ids[live[:3]]), x[live[:3]])
    del ids2


def test_replace_paths_swaps_a_files_records_in_one_commit(index):
    index.add_embeddings(unit(3, 1), "/x.wav", sha256="old")
    new = index.add_embeddings(unit(2, 2), "/x.wav", sha256="new", replace_paths=True)
    assert index.file_hashes(["/x.wav"]) == {"/x.wav": {"new"}}
    assert index.ids().tolist() == new.tolist()


def test_second_writer_is_refused_and_readers_are_not(index):
    fill(index, 20)
    with pytest.raises(IndexLockedError, match="open for writing by another writer"):
        Index.open(index.root)
    with Index.open(index.root, readonly=True) as reader:
        assert len(reader) == 20
        with pytest.raises(IndexReadOnlyError, match="read-only"):
            reader.add_embeddings(unit(1, 0), "/y")
        with pytest.raises(IndexReadOnlyError):
            reader.compact()
    index.close()
    with Index.open(index.root) as again:  # the lock is released on close
        assert again.writable


def test_readers_keep_working_across_appends_and_compaction(index):
    x, ids = fill(index, 100)
    reader = Index.open(index.root, readonly=True)
    old = reader._view.segments[0][1]
    index.add_embeddings(unit(10, 3), "/new")
    index.remove(ids[:50])
    index.compact()  # deletes the segment the reader has mapped
    assert not old.path.exists()
    assert old.gallery.decode().shape == (100, DIM)  # still readable through its map
    hits = reader.search(x[60], k=1)[0]  # the next search sees the new state
    assert hits[0].id == ids[60] and len(reader) == 60
    assert reader.search(x[10], k=1)[0][0].id != ids[10]
    reader.close()


def test_create_and_open_refuse_bad_input(tmp_path):
    with pytest.raises(IndexFormatError, match="sha256"):
        Index.create(tmp_path / "a", "nope", 8)
    with pytest.raises(IndexFormatError, match="dim"):
        Index.create(tmp_path / "a", SHA, 0)
    with pytest.raises(IndexFormatError, match="dtype"):
        Index.create(tmp_path / "a", SHA, 8, dtype="int4")
    with pytest.raises(IndexFormatError, match="not a clapedge index"):
        Index.open(tmp_path)
    Index.create(tmp_path / "a", SHA, 8).close()
    with pytest.raises(IndexFormatError, match="already exists"):
        Index.create(tmp_path / "a", SHA, 8)
    with Index.open(tmp_path / "a") as idx:
        with pytest.raises(IndexFormatError, match=r"shape \[n, 8\]"):
            idx.add_embeddings(np.zeros((2, 7)), "/p")
        with pytest.raises(IndexFormatError, match="NaN"):
            idx.add_embeddings(np.full((1, 8), np.nan), "/p")
        with pytest.raises(IndexFormatError, match="3 values for 2 vectors"):
            idx.add_embeddings(np.zeros((2, 8)), ["/a", "/b", "/c"])
        with pytest.raises(IndexFormatError, match="ends before it starts"):
            idx.add_embeddings(np.zeros((1, 8)), "/a", start_s=2, end_s=1)
        with pytest.raises(IndexFormatError, match="k"):
            idx.search(np.zeros(8), k=0)
        idx._catalog.conn.execute("UPDATE meta SET value='2.0' WHERE key='format_version'")
    with pytest.raises(IndexFormatError, match="format version 2.0"):
        Index.open(tmp_path / "a")
    with pytest.raises(IndexFormatError, match="min_duration"):
        Filter(min_duration=3, max_duration=1)
    assert (tmp_path / "a" / CATALOG_FILE).is_file()


def test_an_empty_index_answers_empty(index):
    assert index.search(unit(2, 0), k=3) == [[], []]
    assert index.compact()["segments_after"] == 0
    assert len(index.add_embeddings(np.zeros((0, DIM)), [])) == 0


def test_bundle_identity(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _runtime_bundles import build_bundle
    from clapedge.runtime import Runtime

    a, _ = build_bundle(tmp_path / "a", seed=0)
    b, _ = build_bundle(tmp_path / "b", seed=1)
    ra, rb = Runtime(a), Runtime(b)
    fa = bundle_fingerprint(ra.manifest)
    assert fa == bundle_fingerprint(Runtime(build_bundle(tmp_path / "a2", seed=0)[0]).manifest)
    assert fa != bundle_fingerprint(rb.manifest)
    with Index.create(tmp_path / "i", fa, ra.embed_dim, model_name="tiny-test",
                      bundle_path=str(a)) as idx:
        idx.add_embeddings(ra.embed_text(["a calm voice", "an angry shout"]), ["/1", "/2"])
        assert idx.search_text(ra, "a calm voice", k=1)[0][0].path == "/1"
        with pytest.raises(IndexBundleMismatchError, match="was built with bundle") as e:
            idx.search_text(rb, "a calm voice")
        assert "another space" in str(e.value) and str(a) in str(e.value)


def test_info_and_verify(index):
    fill(index, 40)
    index.remove([0, 1])
    info = index.info()
    assert (info.records, info.files, info.tombstones, info.dim) == (38, 38, 2, DIM)
    assert info.bundle_sha256 == SHA and info.writable and not info.damaged
    assert info.segments[0].count == 40 and info.segments[0].tombstones == 2
    assert info.to_dict()["segments"][0]["name"] == info.segments[0].name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert index.verify() == []


def test_index_modules_import_on_a_device_install():
    import subprocess

    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'transformers', 'onnx', 'safetensors'}:\n"
        "            raise ImportError('blocked in a device install: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n")
    modules = ["index", "index_errors", "segment", "catalog", "indexer", "cli_index",
               "cli_search"]
    code = blocker + "".join(f"import clapedge.runtime.{m}\n" for m in modules) + "print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
