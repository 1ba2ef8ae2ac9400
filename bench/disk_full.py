"""Disk full, for real: index writes and ``clap-export`` on a file system that runs out.

    sudo python -m clapedge.bench.disk_full            # mounts small tmpfs file systems
    python -m clapedge.bench.disk_full --dir /mnt/small  # or any small file system you made

Index: on a nearly full file system (a filler file leaves 0 .. ``--max-free-kb`` KiB free, in
``--step-kb`` steps), a writer adds batches, removes one and compacts until the disk is full.
Every failure must be ``IndexWriteError`` saying "no space left on device"; after each one
the index must hold exactly the acknowledged records (in the writer and when reopened), no
damaged segment, no segment directory that is not committed; once the filler is deleted the
same writer adds and compacts again.

Export: ``clap-export`` of a tiny model into file systems of several sizes (so that the disk
fills at different steps): it must exit 1 with "no space left on device" and no traceback,
leave nothing where the bundle would be (no partial bundle, no temporary directory), or,
with enough space, write a bundle that verifies.

The test suite simulates the same with failing writes (tests/test_reliability_faults.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIM = 64


@contextlib.contextmanager
def small_fs(size_kb: int, where: Path | None):
    """A directory on a file system of ``size_kb`` KiB: a tmpfs mounted for the purpose
    (needs root), or ``where`` as given."""
    if where is not None:
        yield where
        return
    mnt = Path(tempfile.mkdtemp(prefix="clapedge-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


def fill(root: Path, leave_bytes: int) -> Path:
    filler = root / "filler"
    st = os.statvfs(root)
    size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * size)
    return filler


def batch(i: int, n: int) -> np.ndarray:
    x = np.random.default_rng(i).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass
class IndexStats:
    cases: int = 0
    acked: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    messages: set = field(default_factory=set)


def _check(idx, root: Path, acked: dict[int, int]) -> None:
    from clapedge.runtime.index import SEGMENTS_DIR, Index

    want = sum(acked.values())
    assert len(idx) == want, f"writer sees {len(idx)} records, {want} acknowledged"
    on_disk = sorted(p.name for p in (root / SEGMENTS_DIR).iterdir())
    committed = sorted(s.name for s in idx.info().segments)
    assert on_disk == committed, f"uncommitted segment directories: {on_disk} vs {committed}"
    with Index.open(root, readonly=True) as r:
        assert not r.damaged, r.damaged
        assert len(r) == want
        present = Counter(int(rec.path.split("/")[2]) for rec in r.records(r.ids()).values())
        assert dict(present) == {b: n for b, n in acked.items() if n}, "records differ"
        for b in list(acked)[:3]:
            hit = r.search(batch(b, acked[b])[:1], k=1)[0][0]
            assert hit.path == f"/b/{b}/0" and hit.score > 0.99


def index_case(mnt: Path, free_bytes: int, stats: IndexStats, dtype: str) -> None:
    from clapedge.runtime.index import Index, IndexWriteError

    root = mnt / "x.index"
    shutil.rmtree(root, ignore_errors=True)
    Index.create(root, "0" * 64, DIM, dtype=dtype).close()
    idx = Index.open(root)
    acked: dict[int, int] = {}
    for b in range(4):
        idx.add_embeddings(batch(b, 30), [f"/b/{b}/{i}" for i in range(30)])
        acked[b] = 30
    filler = fill(mnt, free_bytes)
    ops = ["add"] * 6 + ["remove", "add", "compact", "add"]
    for step, op in enumerate(ops):
        b = 100 + step
        try:
            if op == "add":
                idx.add_embeddings(batch(b, 20), [f"/b/{b}/{i}" for i in range(20)],
                                   tags={"pad": "x" * 200})
                acked[b] = 20
            elif op == "remove":
                idx.remove(path_prefix="/b/1/")
                acked.pop(1, None)
            else:
                idx.compact()
            stats.acked[op] += 1
        except IndexWriteError as e:
            stats.failed[op] += 1
            assert "no space left on device" in str(e) and str(root) in str(e), str(e)
            stats.messages.add(str(e).replace(str(root), "INDEX"))
        _check(idx, root, acked)
    filler.unlink()
    idx.add_embeddings(batch(999, 5), [f"/b/999/{i}" for i in range(5)])
    acked[999] = 5
    idx.compact()
    _check(idx, root, acked)
    idx.close()
    stats.cases += 1


@dataclass
class ExportCase:
    size_kb: int
    code: int
    step: str
    outcome: str
    message: str


def export_case(model: Path, size_kb: int, where: Path | None) -> ExportCase:
    from clapedge.bench.export_crash import export_command
    from clapedge.runtime.bundle import Bundle

    with small_fs(size_kb, where) as mnt:
        out = mnt / "out" / "bundle"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [c for c in export_command(model, out) if c != "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"})
        text = proc.stderr + proc.stdout
        assert "Traceback" not in text, text[-3000:]
        steps = [ln.split("]", 1)[-1].rsplit("cli.py", 1)[0].strip()
                 for ln in proc.stderr.splitlines() if "cli.py:" in ln]
        step = steps[-1] if steps else "starting"
        left = sorted(p.name for p in out.parent.iterdir() if p != out)
        assert not left, f"leftovers after a failed export: {left}"
        if proc.returncode == 0:
            Bundle.load(out, providers="cpu", preload=("audio", "text"))
            return ExportCase(size_kb, 0, step, "bundle (verified)", "")
        assert proc.returncode == 1, text[-2000:]
        assert "no space left on device" in text, text[-2000:]
        assert not out.exists(), "a failed export left a bundle"
        message = next((ln for ln in text.splitlines() if ln.startswith("error:")), "")
        return ExportCase(size_kb, proc.returncode, step, "error, nothing written",
                          message.replace(str(mnt), "FS"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None,
                    help="a small file system to use (default: mount tmpfs, needs root)")
    ap.add_argument("--max-free-kb", type=int, default=320)
    ap.add_argument("--step-kb", type=int, default=4)
    ap.add_argument("--export-sizes-kb", default="64,512,1024,1536,2048,3072,4096,8192")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--skip-export", action="store_true")
    args = ap.parse_args(argv)
    if args.dir is None and (not sys.platform.startswith("linux") or os.geteuid() != 0):
        print("needs root to mount tmpfs, or --dir on a small file system", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for dtype in ("int8", "float32"):
        stats = IndexStats()
        with small_fs(8192, args.dir) as mnt:
            for free_kb in range(0, args.max_free_kb + 1, args.step_kb):
                index_case(mnt, free_kb * 1024, stats, dtype)
        print(f"index ({dtype}): {stats.cases} nearly-full file systems (0..{args.max_free_kb} "
              f"KiB free): acknowledged {dict(stats.acked)}, refused with IndexWriteError "
              f"{dict(stats.failed)}; after every failure the acknowledged records were all "
              f"there (writer and reopened), no damage, no uncommitted segment directory; "
              f"after freeing space every writer added and compacted again")
        for m in sorted(stats.messages)[:3]:
            print(f"  e.g. {m}")
    if not args.skip_export:
        with tempfile.TemporaryDirectory() as tmp:
            from clapedge.bench.export_crash import make_tiny_model

            model = args.model or make_tiny_model(Path(tmp))
            for size in [int(s) for s in args.export_sizes_kb.split(",")]:
                case = export_case(model, size, args.dir)
                print(f"export into {size} KiB: exit {case.code}, last step "
                      f"'{case.step}': {case.outcome} {case.message}", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s; no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
