"""Kill -9 loop over index writes: crash safety of ``clapedge.runtime.index``.

    python -m clapedge.bench.index_crash [--iterations 2000] [--seed 0] [--dir DIR]

A child process opens the index for writing and loops over random changes: add a batch of
vectors (70 %), remove a batch (15 %), compact (15 %); after each commit it reports the change
through a pipe (an acknowledgement). The parent kills it with SIGKILL at a random moment,
then opens the index and checks: it opens (the lock died with the child), no segment is
damaged, every acknowledged add is present and every acknowledged removal gone, every batch
is whole (no partial record is visible), each stored vector is the one that was added, and
search finds them; a reader opened at the start and kept open through all the kills (and the
compactions that delete the segments it maps) sees the same records. The change in flight at the kill may or may not have happened, but only
as a whole. Children are forked from a preloaded server (multiprocessing "forkserver"), so
an iteration costs milliseconds, not an interpreter start.

The test suite runs a few hundred iterations (tests/test_index_crash.py); this script runs
as many as asked and prints a summary.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIM = 8
_CTX = None


def batch_vectors(batch: int, n: int) -> np.ndarray:
    """The vectors of batch ``batch`` (deterministic, normalised)."""
    x = np.random.default_rng(batch).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _writer(root: str, seed: int, live: list[int], next_batch: int, conn) -> None:
    """The child: change the index until killed, acknowledging each commit."""
    from clapedge.runtime.index import Index

    rng = random.Random(seed)
    live = list(live)
    idx = Index.open(root)
    conn.send_bytes(b"open")
    while True:
        r = rng.random()
        if r < 0.15 and live:
            batch = live.pop(rng.randrange(len(live)))
            idx.remove(path_prefix=f"/b/{batch}/")
            conn.send_bytes(f"remove {batch}".encode())
        elif r < 0.30:
            idx.compact()
            conn.send_bytes(b"compact")
        else:
            batch, n = next_batch, rng.randint(1, 6)
            next_batch += 1
            idx.add_embeddings(batch_vectors(batch, n), [f"/b/{batch}/{i}" for i in range(n)],
                               duration_s=float(n), tags={"batch": batch, "n": n})
            live.append(batch)
            conn.send_bytes(f"add {batch} {n}".encode())


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["numpy", "numpy.random", "clapedge.runtime.index",
                                     "clapedge.bench.index_crash"])
    return _CTX


@dataclass
class CrashStats:
    iterations: int = 0
    acked_adds: int = 0
    acked_removes: int = 0
    acked_compactions: int = 0
    in_flight_applied: int = 0
    killed_before_open: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def check_index(root: str, live: dict[int, int], removed: set[int],
                next_batch: int) -> dict[int, int]:
    """Open the index after a kill and check it against the acknowledged changes; returns
    the batches present (batch -> size). The unacknowledged change may be an add of
    ``next_batch``, a removal of one live batch or a compaction, each only as a whole.
    Raises AssertionError describing any violation."""
    from clapedge.runtime.index import Index

    with Index.open(root) as idx:  # as the next writer: also clears a crashed one's debris
        assert not idx.damaged, f"damaged segments after a kill: {idx.damaged}"
        ids = idx.ids()
        records = idx.records(ids)
        assert len(records) == len(ids) == len(idx), \
            f"catalog has {len(ids)} live records, the segments {len(idx)}"
        stored = idx.vectors(ids) if len(ids) else np.zeros((0, DIM), np.float32)
        batches: dict[int, list[int]] = {}
        for rid, rec in records.items():
            batches.setdefault(int(rec.tags["batch"]), []).append(rid)
        gone = [b for b in live if b not in batches]
        assert len(gone) <= 1, f"acknowledged batches {gone} are missing"
        assert not (gone and next_batch in batches), "two changes in flight"
        for batch in removed:
            assert batch not in batches, f"removed batch {batch} is back"
        for batch, rids in batches.items():
            assert batch in live or batch == next_batch, \
                f"batch {batch} was never acknowledged"
            n = int(records[rids[0]].tags["n"])
            assert len(rids) == n, f"batch {batch} is partial: {len(rids)} of {n} records"
            order = sorted(rids, key=lambda i: int(records[i].path.rsplit("/", 1)[1]))
            got = stored[np.searchsorted(ids, order)]
            assert np.array_equal(got, batch_vectors(batch, n)), \
                f"batch {batch}: stored vectors differ"
        if batches:  # search finds a present batch's first vector as itself
            batch = sorted(batches)[len(batches) // 2]
            hit = idx.search(batch_vectors(batch, 1), k=1)[0][0]
            assert records[hit.id].tags["batch"] == batch and hit.score > 0.999
        return {b: len(r) for b, r in batches.items()}


def run_crash_loop(root: str | Path, iterations: int, *, seed: int = 0,
                   max_delay_s: float = 0.06, dtype: str = "int8") -> CrashStats:
    """Run ``iterations`` kill -9 cycles on a new index at ``root``; AssertionError on the
    first violation."""
    from clapedge.runtime.index import Index

    root = str(root)
    Index.create(root, "0" * 64, DIM, dtype=dtype).close()
    watcher = Index.open(root, readonly=True)  # a reader that lives through all the kills
    ctx = _context()
    rng = random.Random(seed)
    stats = CrashStats()
    live: dict[int, int] = {}
    removed: set[int] = set()
    next_batch = 1
    t0 = time.perf_counter()
    for it in range(iterations):
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_writer, args=(root, seed * 1_000_003 + it, sorted(live),
                                                  next_batch, writer), daemon=True)
        child.start()
        writer.close()
        # mostly wait for the child to be running its loop; sometimes kill it while it
        # starts (opening the index, clearing a crashed writer's debris)
        if rng.random() < 0.9 and reader.poll(5.0):
            messages = [reader.recv_bytes()]
            time.sleep(rng.random() * max_delay_s)
        else:
            messages = []
            time.sleep(rng.random() * 0.01)
        child.kill()
        child.join()
        while True:
            try:
                messages.append(reader.recv_bytes())
            except (EOFError, OSError):
                break
        reader.close()
        in_flight = None
        opened = False
        for raw in messages:
            parts = raw.decode().split()
            if parts[0] == "open":
                opened = True
            elif parts[0] == "add":
                batch, n = int(parts[1]), int(parts[2])
                live[batch] = n
                next_batch = batch + 1
                stats.acked_adds += 1
            elif parts[0] == "remove":
                batch = int(parts[1])
                live.pop(batch, None)
                removed.add(batch)
                stats.acked_removes += 1
            else:
                stats.acked_compactions += 1
        if not opened:
            stats.killed_before_open += 1
        present = check_index(root, live, removed, next_batch)
        n_present = sum(present.values())
        assert len(watcher.ids()) == n_present, "the reader's catalog view differs"
        if n_present:  # its next search moves it to the latest commit
            hits = watcher.search(batch_vectors(min(present), 1), k=n_present)[0]
            assert len(hits) == n_present and len(watcher) == n_present, \
                f"a long-lived reader sees {len(watcher)} records, {n_present} are live"
        if next_batch in present:
            live[next_batch] = present[next_batch]
            next_batch += 1
            stats.in_flight_applied += 1
        for batch in [b for b in live if b not in present]:
            live.pop(batch)
            removed.add(batch)
            stats.in_flight_applied += 1
        stats.iterations += 1
    watcher.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay-ms", type=float, default=60.0)
    ap.add_argument("--dtype", default="int8", choices=["int8", "fp16", "float32"])
    ap.add_argument("--dir", type=Path, default=None, help="Where to put the index "
                    "(default: a temporary directory, deleted afterwards).")
    args = ap.parse_args(argv)
    # the forkserver re-imports this module as __mp_main__ in every child: keep it quiet
    os.environ["PYTHONWARNINGS"] = "ignore::RuntimeWarning"
    base = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        stats = run_crash_loop(base / "crash.index", args.iterations, seed=args.seed,
                               max_delay_s=args.max_delay_ms / 1e3, dtype=args.dtype)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{stats.iterations} kill -9 iterations in {stats.seconds:.1f} s: "
          f"{stats.acked_adds} acknowledged adds, {stats.acked_removes} removals, "
          f"{stats.acked_compactions} compactions; the change in flight had happened "
          f"{stats.in_flight_applied} times; killed before opening {stats.killed_before_open} "
          f"times; no violation")


if __name__ == "__main__":
    main()
