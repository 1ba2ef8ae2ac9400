"""Faults: kill -9 during clap-export, disk full (ENOSPC, simulated) during index writes
and during export. Longer runs: python -m clapedge.bench.export_crash, python -m
clapedge.bench.disk_full (a real full file system), python -m clapedge.bench.index_crash."""

from __future__ import annotations

import errno
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, tone  # noqa: E402

from clapedge.kernels import gallery as gallery_module  # noqa: E402
from clapedge.runtime import segment as segment_module  # noqa: E402
from clapedge.runtime.cli_index import main as index_cli  # noqa: E402
from clapedge.runtime.index import SEGMENTS_DIR, Index, IndexWriteError  # noqa: E402

DIM = 8


def vectors(seed: int, n: int = 5) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FullDisk:
    """``open`` for the index's writers whose files raise ENOSPC from the ``n``-th write on
    (counted over all files), as a full disk does."""

    def __init__(self, n: int):
        self.n, self.writes, self.failed = n, 0, 0

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return f
        disk, write = self, f.write

        def failing(data):
            disk.writes += 1
            if disk.writes >= disk.n:
                disk.failed += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(data)

        f.write = failing
        return f


@pytest.fixture
def full_disk(monkeypatch):
    def install(n: int) -> FullDisk:
        disk = FullDisk(n)
        monkeypatch.setattr(segment_module, "open", disk.open, raising=False)
        monkeypatch.setattr(gallery_module, "open", disk.open, raising=False)
        return disk

    return install


def _check_acknowledged(root: Path, acked: dict[int, np.ndarray]) -> None:
    """Every acknowledged batch is there, whole, searchable; nothing else; no damage."""
    with Index.open(root, readonly=True) as idx:
        assert not idx.damaged
        assert len(idx) == sum(len(v) for v in acked.values())
        records = idx.records(idx.ids())
        assert {int(r.path.split("/")[2]) for r in records.values()} == set(acked)
        for batch, x in acked.items():
            hit = idx.search(x[:1], k=1)[0][0]
            assert hit.path == f"/b/{batch}/0" and hit.score > 0.99


def _no_debris(idx: Index) -> None:
    """Only committed segment directories (a failed write cleaned up after itself)."""
    on_disk = sorted(p.name for p in (idx.root / SEGMENTS_DIR).iterdir())
    assert on_disk == sorted(s.name for s in idx.info().segments)


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_index_add_and_compact_on_a_full_disk(tmp_path, full_disk, monkeypatch, dtype):
    root = tmp_path / "x.index"
    idx = Index.create(root, "0" * 64, DIM, dtype=dtype)
    acked = {}
    for batch in range(3):
        x = vectors(batch)
        idx.add_embeddings(x, [f"/b/{batch}/{i}" for i in range(5)])
        acked[batch] = x
    # the disk fills at every write of the next add in turn: first, second, ... write
    for nth in range(1, 40):
        disk = full_disk(nth)
        try:
            idx.add_embeddings(vectors(100 + nth), [f"/b/{100 + nth}/{i}" for i in range(5)])
        except IndexWriteError as e:
            assert str(root) in str(e) and "no space left on device" in str(e)
            assert "acknowledged" in str(e)
        else:
            acked[100 + nth] = vectors(100 + nth)
        monkeypatch.undo()
        if disk.failed == 0:
            break
        assert len(idx) == sum(len(v) for v in acked.values())
        _no_debris(idx)
    assert disk.failed == 0, "an add needs more writes than the loop tried"
    idx.remove(path_prefix="/b/1/")
    acked.pop(1)
    full_disk(1)
    with pytest.raises(IndexWriteError, match="cannot compact: no space left on device"):
        idx.compact()
    monkeypatch.undo()
    assert len(idx.info().segments) > 1  # not compacted, nothing lost
    _no_debris(idx)
    idx.close()
    _check_acknowledged(root, acked)
    with Index.open(root) as idx:  # space again: writes work
        idx.compact()
        idx.add_embeddings(vectors(999), [f"/b/999/{i}" for i in range(5)])
    _check_acknowledged(root, {**acked, 999: vectors(999)})


class _FullCatalog:
    """A SQLite connection whose COMMIT fails as on a full disk (SQLITE_FULL)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT" and self._conn.in_transaction \
                and getattr(self, "armed", True):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_index_commit_on_a_full_disk(tmp_path):
    root = tmp_path / "x.index"
    idx = Index.create(root, "0" * 64, DIM)
    idx.add_embeddings(vectors(0), [f"/b/0/{i}" for i in range(5)])
    real = idx._catalog.conn
    idx._catalog.conn = _FullCatalog(real)
    with pytest.raises(IndexWriteError) as info:
        idx.add_embeddings(vectors(1), [f"/b/1/{i}" for i in range(5)])
    message = str(info.value)
    assert "no space left on device" in message and "catalog.sqlite" in message
    assert "rollback" not in message  # the cause, not a failed ROLLBACK
    with pytest.raises(IndexWriteError, match="cannot remove records"):
        idx.remove(path_prefix="/b/0/")
    idx._catalog.conn = real
    assert len(idx) == 5
    _no_debris(idx)  # the uncommitted segment's directory is gone at once
    idx.add_embeddings(vectors(2), [f"/b/2/{i}" for i in range(5)])
    idx.close()
    _check_acknowledged(root, {0: vectors(0), 2: vectors(2)})


def test_clap_index_add_on_a_full_disk_exits_cleanly(tmp_path, full_disk):
    bundle, _ = build_bundle(tmp_path / "bundle")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i in range(3):
        sf.write(wavs / f"{i}.wav", tone(1.0 + i, seed=i), RATE, subtype="PCM_16")
    full_disk(1)
    result = CliRunner().invoke(index_cli, ["add", str(tmp_path / "x.index"), "--bundle",
                                            str(bundle), str(wavs)])
    assert result.exit_code == 2, result.output
    assert "no space left on device" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    with Index.open(tmp_path / "x.index") as idx:  # created, empty, consistent
        assert len(idx) == 0 and not idx.damaged


# --------------------------------------------------------------------------- export

def test_export_on_a_full_disk_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    from clapedge.export import pipeline
    from clapedge.export.cli import main as export_cli
    from clapedge.export.errors import ExportError

    def no_space(module, args, path, **kwargs):
        Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "export_module", no_space)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError) as info:
        pipeline.export_bundle(tiny_model_dir("default"), out,
                               pipeline.ExportOptions(precision="fp32", banks="none"))
    message = str(info.value)
    assert str(out) in message and "no space left on device" in message
    assert not out.exists() and list(out.parent.iterdir()) == []  # temp dir removed too
    result = CliRunner().invoke(export_cli, [str(tiny_model_dir("default")), "-o", str(out),
                                             "--banks", "none"])
    assert result.exit_code == 1 and "no space left on device" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_clear_stale_removes_dead_leftovers_and_restores_an_aside_bundle(tmp_path):
    from clapedge.export.pipeline import clear_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target = tmp_path / "b"
    (tmp_path / f".b.partial-{dead}-abc").mkdir()          # a killed export's temp dir
    (tmp_path / f".b.partial-{__import__('os').getpid()}-x").mkdir()  # a live one's
    (tmp_path / f".b.old-{dead}").mkdir()                  # killed between two renames
    (tmp_path / f".b.old-{dead}" / "manifest.json").write_text("{}")
    (tmp_path / ".c.partial-1-x").mkdir()                  # another bundle's: not ours
    removed = clear_stale(target)
    assert [p.name for p in removed] == [f".b.partial-{dead}-abc"]
    assert (target / "manifest.json").exists()  # the old bundle is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".c.partial-1-x", f".b.partial-{__import__('os').getpid()}-x", "b"])


def test_replace_swaps_atomically(tmp_path):
    from clapedge.export.pipeline import _replace_dir
    from clapedge.export.errors import ExportError

    old, new = tmp_path / "b", tmp_path / "staged"
    old.mkdir()
    (old / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    with pytest.raises(ExportError, match="--force"):
        _replace_dir(new, old, force=False)
    _replace_dir(new, old, force=True)
    assert (old / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["b"], ["b", "staged"])


def test_kill_9_during_export_never_leaves_a_partial_bundle(tiny_model_dir, tmp_path):
    """One clap-export killed right around its final write, then a re-run (the bench runs
    many: python -m clapedge.bench.export_crash)."""
    from clapedge.bench import export_crash

    model = tiny_model_dir("default")
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    rng = random.Random()
    outcome, step, killed = export_crash.kill_once(
        model, out, rng, mode="write", full_s=60.0, write_s=0.05, must_exist=False)
    assert outcome in ("absent", "new bundle")
    for entry in export_crash.leftovers(out):
        assert entry.name.startswith(".bundle.partial-")
    export_crash.full_export(model, out)
    assert export_crash.check_output(out, must_exist=True) == "bundle"
    assert export_crash.leftovers(out) == []  # the killed run's temp dir was cleaned
