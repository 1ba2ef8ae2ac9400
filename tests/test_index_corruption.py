"""Damaged segments: truncated at random offsets or with random bytes flipped, every one is
detected and named, the index opens read-only without it, search answers exactly from the
rest, and repair (drop) makes it writable again."""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import clapedge.runtime.segment as segment_mod
from clapedge.runtime.index import (Index, IndexDamagedWarning, IndexReadOnlyError,
                                    SEGMENTS_DIR)
from clapedge.runtime.segment import GALLERY_FILE, SEGMENT_FILE

DIM = 8
SIZES = (17, 40, 9)


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An int8 index of three segments; returns (root, segment names, ids and vectors per
    segment)."""
    root = tmp_path_factory.mktemp("corrupt") / "base.index"
    parts = []
    with Index.create(root, "cd" * 32, DIM) as idx:
        for i, n in enumerate(SIZES):
            x = unit(n, i)
            ids = idx.add_embeddings(x, [f"/s{i}/{j}" for j in range(n)], duration_s=1.0)
            parts.append((ids, x))
        names = [seg.name for _, seg in idx._view.segments]
    return root, names, parts


def expected(parts, keep: list[int], q: np.ndarray, k: int):
    ids = np.concatenate([parts[i][0] for i in keep])
    x = np.concatenate([parts[i][1] for i in keep])
    scores = q @ x.T
    return [ids[np.lexsort((ids, -row))[:k]].tolist() for row in scores]


def damaged_copy(base, tmp: Path, victim: int, how, rng: random.Random) -> Path:
    root, names, _ = base
    copy = tmp / f"copy-{rng.random():.12f}"
    shutil.copytree(root, copy)
    how(copy / SEGMENTS_DIR / names[victim], rng)
    return copy


def truncate(seg_dir: Path, rng: random.Random) -> None:
    path = seg_dir / rng.choice([GALLERY_FILE, SEGMENT_FILE])
    size = path.stat().st_size
    os.truncate(path, rng.randrange(size))


def flip(seg_dir: Path, rng: random.Random) -> None:
    path = seg_dir / rng.choice([GALLERY_FILE, SEGMENT_FILE])
    data = bytearray(path.read_bytes())
    for _ in range(rng.choice([1, 1, 1, 2, 8])):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def check_detected(base, copy: Path, victim: int) -> None:
    _, names, parts = base
    with pytest.warns(IndexDamagedWarning, match=names[victim]):
        idx = Index.open(copy)
    with idx:
        assert [d.segment for d in idx.damaged] == [names[victim]]
        assert not idx.writable
        with pytest.raises(IndexReadOnlyError, match=names[victim]):
            idx.add_embeddings(unit(1, 99), "/x")
        q = unit(4, 123)
        keep = [i for i in range(len(parts)) if i != victim]
        assert [[h.id for h in row] for row in idx.search(q, k=6)] == expected(parts, keep, q, 6)
        assert len(idx) == sum(SIZES[i] for i in keep)


@pytest.mark.parametrize("how,trials", [(truncate, 60), (flip, 100)])
def test_every_damage_is_detected_and_excluded(base, tmp_path, how, trials):
    rng = random.Random(how.__name__)
    for trial in range(trials):
        victim = rng.randrange(len(SIZES))
        copy = damaged_copy(base, tmp_path, victim, how, rng)
        check_detected(base, copy, victim)
        shutil.rmtree(copy)


def test_repair_by_dropping_makes_the_index_writable(base, tmp_path):
    _, names, parts = base
    copy = damaged_copy(base, tmp_path, 1, flip, random.Random(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IndexDamagedWarning)
        with Index.open(copy) as idx:
            report = idx.repair()
            assert report.segments == [names[1]] and report.dropped == SIZES[1]
            assert report.reembedded == 0 and idx.writable and idx.verify() == []
            assert len(idx) == SIZES[0] + SIZES[2]
            assert idx.records(parts[1][0][:3].tolist()) == {}
            idx.add_embeddings(unit(2, 7), "/after")  # writable again
    assert not (copy / SEGMENTS_DIR / names[1]).exists()


def test_missing_and_swapped_segments_are_named(base, tmp_path):
    root, names, _ = base
    copy = tmp_path / "gone"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / SEGMENTS_DIR / names[2])
    with pytest.warns(IndexDamagedWarning, match=f"{names[2]}: missing"):
        Index.open(copy, readonly=True).close()
    copy = tmp_path / "swapped"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / SEGMENTS_DIR / names[0])
    shutil.copytree(copy / SEGMENTS_DIR / names[1], copy / SEGMENTS_DIR / names[0])
    with pytest.warns(IndexDamagedWarning, match=f"{names[0]}: .*names segment"):
        Index.open(copy, readonly=True).close()


def test_a_change_after_a_recorded_full_check_is_still_caught(base, tmp_path, monkeypatch):
    root, names, parts = base
    copy = tmp_path / "rec"
    shutil.copytree(root, copy)
    monkeypatch.setattr(segment_mod, "_SETTLE_S", 0.0)  # record even fresh files
    Index.open(copy, readonly=True).close()
    assert (copy / "verified-files.json").is_file()
    time.sleep(0.05)  # let the clock tick past the recorded change time
    gallery = copy / SEGMENTS_DIR / names[1] / GALLERY_FILE
    data = bytearray(gallery.read_bytes())
    data[-5] ^= 0x40  # in the re-rank copy: the header and sizes stay valid
    gallery.write_bytes(bytes(data))
    check_detected(base, copy, 1)


def test_quick_open_skips_the_data_checksum_and_verify_finds_it(base, tmp_path):
    root, names, _ = base
    copy = tmp_path / "quick"
    shutil.copytree(root, copy)
    gallery = copy / SEGMENTS_DIR / names[0] / GALLERY_FILE
    data = bytearray(gallery.read_bytes())
    data[-3] ^= 0x01
    gallery.write_bytes(bytes(data))
    with Index.open(copy, readonly=True, verify="quick") as idx:
        assert not idx.damaged
        problems = idx.verify()
        assert [p.segment for p in problems] == [names[0]]
        assert "checksum" in problems[0].reason
