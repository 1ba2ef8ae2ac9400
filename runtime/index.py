"""``Index``: an embedded, crash-safe embedding index (one directory, no server).

    INDEX/catalog.sqlite        metadata, committed segments, tombstones  (runtime/catalog.py)
    INDEX/segments/<name>/      immutable vector segments                 (runtime/segment.py)
    INDEX/LOCK                  the writer's lock (fcntl), holding its pid
    INDEX/verified-files.json   segments whose full checksum passed, by file identity

::

    rt = Runtime("BUNDLE")
    idx = Index.create("clips.index", bundle_fingerprint(rt.manifest), rt.embed_dim)
    ids = idx.add_embeddings(vectors, paths, start_s=starts, end_s=ends, duration_s=durs)
    idx.search_text(rt, "a calm low-pitched female voice", k=10)   # [[SearchHit]]
    idx.search(query_vectors, k=10, filter=Filter(path_prefix="/data/a/", max_duration=8))
    idx.remove(ids[:3]); idx.remove(path_prefix="/data/old/"); idx.compact()

Crash safety: an add writes its segment (temp dir, fsync, rename, fsync), then commits the
segment's row and its records in one SQLite transaction; only then does it return. A kill at
any point leaves either the old state or the new one (an uncommitted segment directory is
deleted by the next writer). Compaction and repair commit the same way and delete the
replaced directories only after the commit.

Concurrency: one writer (``LOCK``, fcntl: a second writer gets ``IndexLockedError``), any
number of readers, in other processes too. A reader answers each search from one consistent
catalog snapshot; it picks up new commits at its next search, and segments it has mapped stay
readable after a compaction deleted them.

Damage: a segment that fails its checks (``segment.py``) is excluded and named in a warning;
the index is then read-only until ``repair`` re-embeds the affected records from their source
files (``indexer.reembedder``) or drops them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clapedge.kernels import topk
from clapedge.runtime.catalog import CATALOG_FILE, FORMAT_VERSION, Catalog, RecordRow, SegmentRow
from clapedge.runtime.checksums import VerifiedFiles
from clapedge.runtime.index_errors import (ClapIndexError, IndexBundleMismatchError,
                                           IndexCorruptError, IndexDamagedWarning,
                                           IndexFormatError, IndexLockedError,
                                           IndexReadOnlyError, IndexWriteError)
from clapedge.runtime.manifest import Manifest
from clapedge.runtime.segment import TMP_PREFIX, Segment, open_segment, write_segment

log = logging.getLogger("clapedge.runtime")

SEGMENTS_DIR = "segments"
LOCK_FILE = "LOCK"
DTYPES = ("int8", "fp16", "float32")
VERIFY = ("auto", "full", "quick")
_TRASH_PREFIX = ".trash-"
_RETRIES = 4

__all__ = [
    "ClapIndexError", "Filter", "Index", "IndexBundleMismatchError", "IndexCorruptError",
    "IndexDamagedWarning", "IndexFormatError", "IndexInfo", "IndexLockedError",
    "IndexReadOnlyError", "IndexWriteError", "RepairReport", "SearchHit",
    "bundle_fingerprint",
]


def bundle_fingerprint(manifest: Manifest) -> str:
    """sha256 (hex) of what decides a bundle's embedding space: the audio and text towers'
    files (with their external data), the embedding size, the sample rate and the clip
    policy. Re-packing a bundle (banks, engines, quality record) keeps it; another export of
    any tower changes it."""
    towers = manifest.towers

    def files(spec):
        if spec is None:
            return None
        return [spec.sha256, sorted(x.sha256 for x in spec.external_data)]

    clip = manifest.clip
    identity = {
        "audio": files(towers.audio), "text": files(towers.text),
        "embed_dim": manifest.embed_dim, "sample_rate": manifest.sample_rate,
        "clip": [clip.min_seconds, clip.max_seconds, clip.window_seconds, clip.hop_seconds,
                 clip.bucket_seconds]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- value types

@dataclass(frozen=True)
class Filter:
    """Which records a search may return; applied inside the kernel as an allow-list.

    ``path_prefix``: the record's path starts with it. ``min_duration``/``max_duration``:
    bounds (seconds, inclusive) on the source file's duration. ``tags``: every key has this
    value in the record's tags (str, int, float or bool)."""

    path_prefix: str | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    tags: Mapping[str, Any] | None = None

    def __post_init__(self):
        for name in ("min_duration", "max_duration"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                raise IndexFormatError(f"filter {name}: {v!r} must be a number of seconds >= 0")
        if (self.min_duration is not None and self.max_duration is not None
                and self.min_duration > self.max_duration):
            raise IndexFormatError(f"filter: min_duration {self.min_duration} > max_duration "
                                   f"{self.max_duration}")
        if self.path_prefix is not None and not isinstance(self.path_prefix, str):
            raise IndexFormatError(f"filter path_prefix: {self.path_prefix!r} must be a string")
        for key, value in (self.tags or {}).items():
            _check_tag_key(key)
            if isinstance(value, (dict, list, tuple)) or value is None:
                raise IndexFormatError(f"filter tag {key!r}: {value!r} must be a string, a "
                                       f"number or a bool")

    @property
    def empty(self) -> bool:
        return (not self.path_prefix and self.min_duration is None
                and self.max_duration is None and not self.tags)

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition over ``records`` and its parameters."""
        clauses, params = [], []
        if self.path_prefix:
            clause, p = _prefix_clause(self.path_prefix)
            clauses.append(clause)
            params += p
        if self.min_duration is not None:
            clauses.append("duration_s >= ?")
            params.append(float(self.min_duration))
        if self.max_duration is not None:
            clauses.append("duration_s <= ?")
            params.append(float(self.max_duration))
        for key, value in sorted((self.tags or {}).items()):
            clauses.append("json_extract(tags, ?) = ?")
            params += [f'$."{key}"', int(value) if isinstance(value, bool) else value]
        return (" AND ".join(clauses) or "1"), params


def _prefix_clause(prefix: str) -> tuple[str, list[Any]]:
    # a range on the path index: UTF-8 keeps code point order, so [prefix, prefix with its
    # last character incremented) is exactly the strings that start with prefix
    last = ord(prefix[-1])
    if last < 0x10FFFF and not 0xD7FF <= last < 0xE000:
        return "path >= ? AND path < ?", [prefix, prefix[:-1] + chr(last + 1)]
    return "path >= ? AND substr(path, 1, ?) = ?", [prefix, len(prefix), prefix]


def _check_tag_key(key) -> None:
    if not isinstance(key, str) or not key or '"' in key or "\\" in key:
        raise IndexFormatError(f"tag key {key!r} must be a non-empty string without quotes "
                               f"or backslashes")


@dataclass(frozen=True)
class SearchHit:
    """One result: the record ``id``, its source ``path``, the span ``start``-``end``
    (seconds) within that file, the file's ``duration``, the ``score`` (inner product:
    cosine for normalised embeddings) and the record's ``tags``."""

    id: int
    path: str
    start: float
    end: float
    score: float
    tags: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "start": round(self.start, 6),
                "end": round(self.end, 6), "duration": round(self.duration, 6),
                "score": round(self.score, 6), "tags": self.tags}


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    count: int
    tombstones: int
    bytes: int


@dataclass(frozen=True)
class IndexInfo:
    path: str
    format_version: str
    bundle_sha256: str
    model_name: str | None
    bundle_path: str | None
    dim: int
    dtype: str
    rerank_dtype: str | None
    records: int
    files: int
    tombstones: int
    segments: list[SegmentInfo]
    damaged: list[tuple[str, str]]
    generation: int
    disk_bytes: int
    writable: bool

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["segments"] = [s.__dict__.copy() for s in self.segments]
        d["damaged"] = [{"segment": n, "reason": r} for n, r in self.damaged]
        return d


@dataclass
class RepairReport:
    """What ``repair`` did: per damaged segment, how many records were re-embedded into a new
    segment and how many were dropped (source missing, changed or unreadable)."""

    segments: list[str] = field(default_factory=list)
    reembedded: int = 0
    dropped: int = 0
    problems: list[str] = field(default_factory=list)


# A re-embedder takes the records of a damaged segment and returns (vectors [n, D] for the
# records it could embed again, a boolean mask [len(records)] saying which those are).
Reembedder = Callable[[list[RecordRow]], tuple[np.ndarray, np.ndarray]]


@dataclass
class _View:
    generation: int
    segments: list[tuple[int, Segment]]
    deleted: dict[int, np.ndarray]
    damaged: list[IndexCorruptError]
    live: int


class _Vanished(Exception):
    """A committed segment directory disappeared while loading: a newer commit replaced it."""


# --------------------------------------------------------------------------- the lock

class _WriterLock:
    """fcntl lock on INDEX/LOCK; the kernel drops it when the process dies."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IndexReadOnlyError(f"cannot open {root} for writing ({e.strerror}): open it "
                                     f"read-only (Index.open(path, readonly=True))") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise IndexLockedError(
                f"{root} is open for writing by another writer ({holder}); an index has one "
                f"writer at a time: wait for it to finish or close it (searching works "
                f"meanwhile, e.g. Index.open(path, readonly=True))") from None
        try:  # who holds it, for the message of a refused writer; a full disk only loses that
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      .encode(), 0)
        except OSError as e:
            log.warning("cannot write the writer's pid into %s: %s", self.path, e)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- the index

class Index:
    """An embedding index directory (see the module docstring). Use ``Index.create`` or
    ``Index.open``; close it (or use ``with``) to release the writer's lock."""

    def __init__(self, root: Path, catalog: Catalog, lock: _WriterLock | None, *,
                 verify: str, threads: int):
        self.root = root
        self._catalog = catalog
        self._lock = lock
        self._verify = verify
        self.threads = threads
        meta = catalog.meta
        self.dim = int(meta["dim"])
        self.bundle_sha256 = meta["bundle_sha256"]
        self.dtype = meta["dtype"]
        self.rerank_dtype = None if meta.get("rerank_dtype", "none") == "none" \
            else meta["rerank_dtype"]
        self.model_name = meta.get("model_name")
        self.bundle_path = meta.get("bundle_path")
        self._mutex = threading.RLock()
        self._cache: dict[str, Segment] = {}
        self._warned: set[str] = set()
        self._view: _View | None = None
        self._verified = VerifiedFiles(root) if os.access(root, os.W_OK) else None
        if lock is not None:
            self._collect_garbage()
        self._refresh(force=True)

    # -- creating and opening

    @classmethod
    def create(cls, path: str | os.PathLike, bundle_sha256: str, dim: int, *,
               dtype: str = "int8", rerank_dtype: str | None = "default",
               bundle_path: str | None = None, model_name: str | None = None,
               threads: int = 0) -> "Index":
        """Create an empty index (atomically: built beside ``path`` and renamed into place)
        and open it for writing.

        ``bundle_sha256``: ``bundle_fingerprint(manifest)`` of the bundle whose embeddings
        it will hold; ``dim``: their size. ``dtype``: storage the kernel scans, "int8"
        (per-row scale, default), "fp16" or "float32". ``rerank_dtype``: the exact copy kept
        to re-score int8 candidates ("float32" by default for int8, "fp16", or None).
        """
        root = Path(path)
        _check_sha(bundle_sha256)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise IndexFormatError(f"dim: {dim!r} must be a positive integer")
        if dtype not in DTYPES:
            raise IndexFormatError(f"dtype: {dtype!r} must be one of {', '.join(DTYPES)}")
        if rerank_dtype == "default":
            rerank_dtype = "float32" if dtype == "int8" else None
        if rerank_dtype not in (None, "float32", "fp16") or (
                dtype == "float32" and rerank_dtype is not None):
            raise IndexFormatError(f"rerank_dtype: {rerank_dtype!r} must be 'float32', 'fp16' "
                                   f"or None (and None for a float32 index)")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            kind = "an index" if (root / CATALOG_FILE).exists() else "a non-empty path"
            raise IndexFormatError(f"{root} already exists ({kind}); open it with Index.open "
                                   f"or choose a new path")
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = root.parent / f".{root.name}{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as e:
            raise IndexWriteError(_write_error(root, "create the index", e)) from None
        try:
            (tmp / SEGMENTS_DIR).mkdir()
            Catalog.create(tmp / CATALOG_FILE, {
                "bundle_sha256": bundle_sha256, "dim": int(dim), "dtype": dtype,
                "rerank_dtype": rerank_dtype or "none", "bundle_path": bundle_path,
                "model_name": model_name})
            _fsync_dir(tmp)
            try:
                os.rename(tmp, root)
            except OSError as e:  # created meanwhile by someone else
                raise IndexFormatError(f"{root} already exists ({e.strerror}); open it with "
                                       f"Index.open") from None
            _fsync_dir(root.parent)
        except (OSError, sqlite3.Error) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise IndexWriteError(_write_error(root, "create the index", e)) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(root, threads=threads)

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False, *, verify: str = "auto",
             threads: int = 0) -> "Index":
        """Open an index: for writing (takes the writer's lock; ``IndexLockedError`` if
        another writer holds it) or ``readonly`` (never refused).

        ``verify``: "auto" checks every segment's structure and the full checksum of those
        not recorded as verified and untouched since; "full" checksums every byte; "quick"
        only the structure (sizes, headers, ids). Damaged segments are excluded with an
        ``IndexDamagedWarning``, and the index is read-only until ``repair``.
        """
        if verify not in VERIFY:
            raise IndexFormatError(f"verify: {verify!r} must be one of {', '.join(VERIFY)}")
        root = Path(path)
        if not (root / CATALOG_FILE).is_file():
            raise IndexFormatError(f"{root} is not a clapedge index (no {CATALOG_FILE}); "
                                   f"create one with Index.create or `clap-index add`")
        lock = None if readonly else _WriterLock(root)
        try:
            catalog = Catalog(root / CATALOG_FILE, writable=not readonly)
            return cls(root, catalog, lock, verify=verify, threads=threads)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        with self._mutex:
            self._catalog.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            self._cache.clear()
            self._view = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts

    @property
    def writable(self) -> bool:
        """Open for writing and undamaged."""
        return self._lock is not None and not self.damaged

    @property
    def damaged(self) -> list[IndexCorruptError]:
        """Segments excluded at the last refresh, each naming the segment and the reason."""
        return list(self._view.damaged) if self._view is not None else []

    @property
    def generation(self) -> int:
        return self._view.generation if self._view is not None else -1

    def __len__(self) -> int:
        """Live records in the loaded segments."""
        return self._view.live if self._view is not None else 0

    def __repr__(self) -> str:
        mode = "writer" if self._lock is not None else "reader"
        return (f"Index({str(self.root)!r}, {len(self)} records, dim={self.dim}, "
                f"{self.dtype}, {mode})")

    def check_bundle(self, manifest_or_runtime) -> None:
        """Raise ``IndexBundleMismatchError`` unless the bundle is the one this index was
        built with (same towers, dimension, rate and clip policy)."""
        manifest = getattr(manifest_or_runtime, "manifest", manifest_or_runtime)
        fp = bundle_fingerprint(manifest)
        if fp != self.bundle_sha256:
            where = getattr(getattr(manifest_or_runtime, "bundle", None), "root", None)
            built = f"{self.model_name or 'unknown model'}"
            if self.bundle_path:
                built += f" at {self.bundle_path}"
            raise IndexBundleMismatchError(
                f"{self.root} was built with bundle {self.bundle_sha256[:12]} ({built}); the "
                f"bundle given{f' ({where})' if where else ''} is {fp[:12]} "
                f"({manifest.model.name}): its embeddings live in another space. Search with "
                f"the bundle the index was built with, or build a new index for this one.")

    # -- changes

    def add_embeddings(self, vectors: np.ndarray, paths: str | Sequence[str], *,
                       start_s: float | Sequence[float] = 0.0,
                       end_s: float | Sequence[float] | None = None,
                       duration_s: float | Sequence[float] | None = None,
                       tags: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                       sha256: str | Sequence[str | None] | None = None,
                       replace_paths: bool = False) -> np.ndarray:
        """Add precomputed embeddings (one row each) as one new segment, atomically; returns
        their record ids (int64, increasing).

        Per-row metadata (a scalar applies to every row): ``paths`` (the source), ``start_s``
        and ``end_s`` (the span within it; ``end_s`` defaults to ``duration_s``),
        ``duration_s`` (of the source; defaults to ``end_s``), ``tags`` (a JSON-able dict),
        ``sha256`` (of the source's content). ``replace_paths``: in the same transaction,
        remove the live records of these paths first (a re-indexed file).
        """
        with self._mutex, self._writing("add embeddings"):
            self.require_writable("add embeddings to")
            x = self._check_vectors(vectors, "vectors")
            n = len(x)
            cols = _metadata_columns(n, paths, start_s, end_s, duration_s, tags, sha256)
            if n == 0:
                return np.zeros(0, dtype=np.int64)
            cat = self._catalog
            first, seq = cat.counter("next_id"), cat.counter("next_segment")
            ids = np.arange(first, first + n, dtype=np.int64)
            name = _segment_name(seq)
            seg = self._write_segment(name, ids, x)
            with self._uncommitted(seg), cat.write():
                if replace_paths:
                    unique = sorted(set(cols["paths"]))
                    cat.tombstone(_ids_of_paths(cat, unique))
                sid = cat.insert_segment(name, n, int(ids[0]), int(ids[-1]))
                cat.insert_records(sid, ids, cols["paths"], cols["sha256"], cols["start_s"],
                                   cols["end_s"], cols["duration_s"], cols["tags"])
                cat.set_meta("next_id", first + n)
                cat.set_meta("next_segment", seq + 1)
            self._cache[name] = seg
            self._refresh()
            return ids

    def remove(self, ids: Sequence[int] | np.ndarray | None = None, *,
               path_prefix: str | None = None, paths: Sequence[str] | None = None) -> int:
        """Remove records by id, by path prefix and/or by exact paths (tombstones: searches
        stop returning them at once, ``compact`` reclaims their space). Returns how many
        live records were removed."""
        with self._mutex, self._writing("remove records"):
            self.require_writable("remove records from")
            cat = self._catalog
            targets = [np.asarray([] if ids is None else ids, dtype=np.int64).reshape(-1)]
            with cat.write():
                if path_prefix:
                    clause, params = _prefix_clause(path_prefix)
                    targets.append(cat.ids_where(clause, params))
                if paths:
                    targets.append(_ids_of_paths(cat, sorted(set(paths))))
                n = cat.tombstone(np.unique(np.concatenate(targets)))
            self._refresh()
            return n

    def compact(self) -> dict[str, int]:
        """Merge all segments into one and drop the tombstoned vectors. Readers keep
        searching the old segments until their next search. Returns counts before/after."""
        with self._mutex, self._writing("compact"):
            self.require_writable("compact")
            view = self._view
            before = {"segments": len(view.segments),
                      "tombstones": sum(int(m.sum()) for m in view.deleted.values())}
            if before["segments"] <= 1 and before["tombstones"] == 0:
                return {**before, "records": view.live, "segments_after": before["segments"]}
            ids_parts, vec_parts = [], []
            for sid, seg in view.segments:
                deleted = view.deleted.get(sid)
                rows = None if deleted is None else np.flatnonzero(~deleted)
                ids_parts.append(seg.ids if rows is None else seg.ids[rows])
                vec_parts.append(seg.exact_vectors(rows))
            ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
            order = None if (np.diff(ids) > 0).all() else np.argsort(ids, kind="stable")
            ids = ids if order is None else ids[order]
            old = [sid for sid, _ in view.segments]
            old_names = [seg.name for _, seg in view.segments]
            cat = self._catalog
            new_seg = None
            if len(ids):
                vectors = np.concatenate(vec_parts)
                vectors = vectors if order is None else vectors[order]
                del vec_parts
                seq = cat.counter("next_segment")
                new_seg = self._write_segment(_segment_name(seq), ids, vectors)
                del vectors
            with self._uncommitted(new_seg), cat.write():
                if new_seg is not None:
                    sid = cat.insert_segment(new_seg.name, len(ids), int(ids[0]), int(ids[-1]))
                    cat.move_records(old, sid)
                    cat.set_meta("next_segment", seq + 1)
                cat.delete_segments(old)
            if new_seg is not None:
                self._cache[new_seg.name] = new_seg
            self._discard(old_names)
            self._refresh()
            return {**before, "records": len(ids), "segments_after": int(new_seg is not None)}

    def repair(self, reembed: Reembedder | None = None) -> RepairReport:
        """Fix damaged segments: checks every segment in full first, then replaces each
        damaged one by a new segment holding the records ``reembed`` could embed again from
        their sources (same ids and metadata), and drops the rest. Without ``reembed`` the
        damaged segments' records are dropped. Needs the writer's lock."""
        with self._mutex, self._writing("repair"):
            if self._lock is None:
                raise IndexReadOnlyError(f"{self.root} is open read-only: open it for writing "
                                         f"to repair it")
            self._cache.clear()
            verify, self._verify = self._verify, "full"
            try:
                self._refresh(force=True)
            finally:
                self._verify = verify
            report = RepairReport()
            cat = self._catalog
            rows = {r.name: r for r in cat.segments()}
            for problem in self.damaged:
                row = rows[problem.segment]
                records = cat.records_of_segment(row.id)
                keep = np.zeros(len(records), dtype=np.bool_)
                vectors = np.zeros((0, self.dim), np.float32)
                if reembed is not None and records:
                    vectors, keep = reembed(records)
                    keep = np.asarray(keep, dtype=np.bool_)
                kept_ids = np.asarray([r.id for r, k in zip(records, keep) if k], np.int64)
                dropped = [r.id for r, k in zip(records, keep) if not k]
                new_seg, seq = None, cat.counter("next_segment")
                if len(kept_ids):
                    new_seg = self._write_segment(_segment_name(seq), kept_ids,
                                                  self._check_vectors(vectors, "re-embedded"))
                with self._uncommitted(new_seg), cat.write():
                    if new_seg is not None:
                        sid = cat.insert_segment(new_seg.name, len(kept_ids),
                                                 int(kept_ids[0]), int(kept_ids[-1]))
                        cat.move_records([row.id], sid)
                        cat.set_meta("next_segment", seq + 1)
                    cat.delete_records(dropped)
                    cat.delete_segments([row.id])
                self._discard([row.name])
                report.segments.append(row.name)
                report.reembedded += len(kept_ids)
                report.dropped += len(dropped)
                report.problems.append(str(problem))
            self._refresh(force=True)
            return report

    # -- search

    def search(self, queries: np.ndarray, k: int = 10, *, filter: Filter | None = None,
               threads: int | None = None) -> list[list[SearchHit]]:
        """Top-``k`` records per query (rows of ``queries`` [Q, D], or one [D]) by inner
        product, over every live segment in one merged top-k; ``filter`` is applied inside
        the kernel as an allow-list. Returns one list of ``SearchHit`` per query, best
        first (ties: lower id first); fewer than k when fewer records qualify."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise IndexFormatError(f"k: {k!r} must be a positive integer")
        q = self._check_vectors(np.atleast_2d(np.asarray(queries)), "queries")
        flt = filter or Filter()
        threads = self.threads if threads is None else threads
        with self._mutex:
            for attempt in range(_RETRIES):
                try:
                    with self._catalog.read():
                        self._ensure_view(final=attempt == _RETRIES - 1)
                        allowed = None if flt.empty else self._catalog.ids_where(*flt.where())
                        scores, ids = self._topk(q, int(k), allowed, threads)
                        found = ids[ids >= 0]
                        records = self._catalog.records(np.unique(found)) if len(found) else {}
                    break
                except _Vanished:
                    continue
        return [[_hit(records[i], s) for s, i in zip(srow, irow) if i >= 0 and i in records]
                for srow, irow in zip(scores.tolist(), ids.tolist())]

    def search_text(self, runtime, texts: str | Sequence[str], k: int = 10, *,
                    filter: Filter | None = None) -> list[list[SearchHit]]:
        """Search by description(s) through the bundle's text tower."""
        self.check_bundle(runtime)
        return self.search(runtime.embed_text(texts), k, filter=filter)

    def search_audio(self, runtime, audio, k: int = 10, *, filter: Filter | None = None,
                     sample_rate: int | None = None) -> list[list[SearchHit]]:
        """"More like this": search by audio (a path, an array, or a list) through the audio
        tower (long audio: the pooled embedding of its windows)."""
        self.check_bundle(runtime)
        return self.search(runtime.embed_audio(audio, sample_rate), k, filter=filter)

    def _topk(self, q: np.ndarray, k: int, allowed: np.ndarray | None,
              threads: int) -> tuple[np.ndarray, np.ndarray]:
        scores_parts, id_parts = [], []
        for sid, seg in self._view.segments:
            if len(seg) == 0:
                continue
            if allowed is not None:  # live records only: tombstones are already out
                mask = seg.mask_of(allowed)
            else:
                deleted = self._view.deleted.get(sid)
                mask = None if deleted is None else ~deleted
            if mask is not None and not mask.any():
                continue
            s, rows = topk(q, seg.gallery, min(k, len(seg)), allow=mask, threads=threads)
            scores_parts.append(s)
            id_parts.append(np.where(rows >= 0, seg.ids[np.maximum(rows, 0)], -1))
        if not scores_parts:
            return (np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64))
        scores = np.concatenate(scores_parts, axis=1)
        ids = np.concatenate(id_parts, axis=1)
        if len(scores_parts) > 1:
            order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores),
                               axis=-1)[:, :k]
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        return scores, ids

    # -- looking things up

    def ids(self, filter: Filter | None = None) -> np.ndarray:
        """Sorted ids (int64) of the live records matching ``filter`` (default: all)."""
        with self._mutex:
            return self._catalog.ids_where(*(filter or Filter()).where())

    def records(self, ids: Sequence[int]) -> dict[int, RecordRow]:
        """Metadata of live records by id."""
        with self._mutex:
            return self._catalog.records(ids)

    def file_hashes(self, paths: Sequence[str]) -> dict[str, set[str]]:
        """path -> content sha256 values of its live records (to skip unchanged files)."""
        with self._mutex:
            return self._catalog.file_hashes(paths)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of live records (float32 [n, D], in the order of ``ids``; as
        exact as stored: the re-rank copy of an int8 index)."""
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.full((len(want), self.dim), np.nan, dtype=np.float32)
        with self._mutex:
            self._refresh()
            alive = set(self._catalog.records(want.tolist()))
            for sid, seg in self._view.segments:
                pos = np.searchsorted(seg.ids, want)
                pos = np.minimum(pos, max(len(seg.ids) - 1, 0))
                hit = (seg.ids[pos] == want) if len(seg.ids) else np.zeros(len(want), bool)
                if hit.any():
                    out[hit] = seg.exact_vectors(pos[hit])
        missing = [int(i) for i, row in zip(want, out) if int(i) not in alive or
                   np.isnan(row).any()]
        if missing:
            raise ClapIndexError(f"{self.root}: no live records with ids {missing[:10]}")
        return out

    def info(self) -> IndexInfo:
        with self._mutex:
            self._refresh()
            meta, counts = self._catalog.meta, self._catalog.counts()
            view = self._view
            segments = [SegmentInfo(seg.name, len(seg),
                                    int(view.deleted[sid].sum()) if sid in view.deleted else 0,
                                    _dir_bytes(seg.path))
                        for sid, seg in view.segments]
            return IndexInfo(
                path=str(self.root), format_version=meta.get("format_version", FORMAT_VERSION),
                bundle_sha256=self.bundle_sha256, model_name=self.model_name,
                bundle_path=self.bundle_path, dim=self.dim, dtype=self.dtype,
                rerank_dtype=self.rerank_dtype, records=counts["records"],
                files=counts["files"], tombstones=counts["tombstones"], segments=segments,
                damaged=[(d.segment, d.reason) for d in view.damaged],
                generation=view.generation, disk_bytes=_dir_bytes(self.root),
                writable=self.writable)

    def verify(self) -> list[IndexCorruptError]:
        """Check every byte of every committed segment (and the catalog's own structure);
        returns the problems found (empty: all good). Does not change the index."""
        with self._mutex:
            problems = []
            quick = self._catalog.quick_check()
            if quick != "ok":
                problems.append(IndexCorruptError(CATALOG_FILE, f"SQLite quick_check: {quick}"))
            for row in self._catalog.segments():
                try:
                    self._open(row, verify="full")
                except IndexCorruptError as e:
                    problems.append(e)
            return problems

    # -- internals

    def require_writable(self, what: str = "change") -> None:
        """Raise ``IndexReadOnlyError`` (saying why and what to do) unless writable."""
        if self._lock is None:
            raise IndexReadOnlyError(f"cannot {what} {self.root}: it is open read-only "
                                     f"(Index.open(path) opens it for writing)")
        if self.damaged:
            names = ", ".join(f"{d.segment} ({d.reason})" for d in self.damaged)
            raise IndexReadOnlyError(
                f"cannot {what} {self.root}: damaged segments {names}; it is read-only until "
                f"repaired: `clap-index repair {self.root}` (re-embeds from the sources) or "
                f"Index.repair()")

    def _check_vectors(self, vectors, what: str) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim != 2 or (len(x) and x.shape[1] != self.dim) or (x.ndim == 2 and x.shape[1] == 0):
            raise IndexFormatError(f"{what}: expected shape [n, {self.dim}], got "
                                   f"{tuple(x.shape)}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) \
                or x.dtype == np.bool_:
            raise IndexFormatError(f"{what}: expected real numbers, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise IndexFormatError(f"{what}: contains NaN or Inf")
        return x

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Around a change: a failed write (disk full, I/O error) becomes
        ``IndexWriteError`` naming the index and the cause; the change is not applied."""
        try:
            yield
        except (OSError, sqlite3.Error) as e:
            raise IndexWriteError(_write_error(self.root, what, e)) from None

    @contextlib.contextmanager
    def _uncommitted(self, seg: Segment | None):
        """Around the commit of a segment just written: if the commit fails, delete the
        directory at once, so that it does not hold its disk space until the next writer's
        clean-up (kept when the catalog, read again, names it after all)."""
        try:
            yield
        except BaseException:
            if seg is not None:
                try:
                    committed = self._catalog.conn.execute(
                        "SELECT 1 FROM segments WHERE name=?", (seg.name,)).fetchone()
                except sqlite3.Error:
                    committed = True  # cannot tell: leave it to the next writer's clean-up
                if not committed:
                    self._cache.pop(seg.name, None)
                    shutil.rmtree(self.root / SEGMENTS_DIR / seg.name, ignore_errors=True)
            raise

    def _write_segment(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> Segment:
        return write_segment(self.root / SEGMENTS_DIR, name, ids, vectors, dtype=self.dtype,
                             rerank_dtype=self.rerank_dtype, bundle_sha256=self.bundle_sha256)

    def _open(self, row: SegmentRow, verify: str | None = None) -> Segment:
        seg = open_segment(self.root / SEGMENTS_DIR / row.name, verify=verify or self._verify,
                           verified=self._verified,
                           expect={"count": row.count, "dim": self.dim, "dtype": self.dtype,
                                   "rerank_dtype": self.rerank_dtype,
                                   "bundle_sha256": self.bundle_sha256})
        if row.count and (int(seg.ids[0]) != row.id_min or int(seg.ids[-1]) != row.id_max):
            raise IndexCorruptError(row.name, f"holds ids {seg.ids[0]}..{seg.ids[-1]}, the "
                                              f"catalog {row.id_min}..{row.id_max}")
        return seg

    def _refresh(self, force: bool = False) -> None:
        for attempt in range(_RETRIES):
            try:
                with self._catalog.read():
                    self._ensure_view(force=force, final=attempt == _RETRIES - 1)
                return
            except _Vanished:
                continue

    def _ensure_view(self, *, force: bool = False, final: bool = False) -> None:
        """Inside a read transaction: make the view match the catalog's generation."""
        generation = self._catalog.generation()
        if not force and self._view is not None and self._view.generation == generation:
            return
        rows = self._catalog.segments()
        tombstones = self._catalog.tombstones()
        segments, damaged, cache = [], [], {}
        for row in rows:
            seg = self._cache.get(row.name)
            if seg is None:
                try:
                    seg = self._open(row)
                except IndexCorruptError as e:
                    if e.missing and not final:
                        raise _Vanished from None
                    damaged.append(e)
                    continue
            cache[row.name] = seg
            segments.append((row.id, seg))
        deleted = {sid: seg.mask_of(tombstones[sid]) for sid, seg in segments
                   if sid in tombstones}
        live = sum(len(seg) for _, seg in segments) - sum(int(m.sum()) for m in deleted.values())
        self._cache = cache
        self._view = _View(generation, segments, deleted, damaged, live)
        fresh = [d for d in damaged if d.segment not in self._warned]
        if fresh:
            self._warned.update(d.segment for d in fresh)
            message = (f"{self.root}: damaged segments excluded, the index is read-only until "
                       f"repaired (`clap-index repair`): " + "; ".join(str(d) for d in fresh))
            log.warning(message)
            warnings.warn(message, IndexDamagedWarning, stacklevel=4)

    def _discard(self, names: Sequence[str]) -> None:
        """Delete replaced segment directories (after their replacement committed): renamed
        out of the way first, so a reader sees a segment whole or not at all."""
        base = self.root / SEGMENTS_DIR
        for name in names:
            self._cache.pop(name, None)
            src = base / name
            if not src.exists():
                continue
            trash = base / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(src, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError as e:  # the next writer's clean-up retries
                log.warning("cannot delete replaced segment %s: %s", src, e)

    def _collect_garbage(self) -> None:
        """Writer only: delete segment directories no committed row names (a crashed add,
        compaction or repair), and temporary or trashed ones."""
        base = self.root / SEGMENTS_DIR
        with self._catalog.read():
            committed = {r.name for r in self._catalog.segments()}
        for entry in base.iterdir() if base.is_dir() else []:
            if entry.name not in committed:
                log.info("removing uncommitted segment directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------- helpers

def _write_error(root: Path, what: str, e: OSError | sqlite3.Error) -> str:
    if isinstance(e, sqlite3.Error):
        full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL \
            or "disk is full" in str(e)
        where, detail = root / CATALOG_FILE, str(e)
    else:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where, detail = e.filename or root / SEGMENTS_DIR, e.strerror or str(e)
    reason = "no space left on device" if full else detail
    return (f"{root}: cannot {what}: {reason} (writing {where}); this change was not "
            f"applied, every change acknowledged before it is intact"
            + ("; free some space and try again" if full else ""))


def _segment_name(seq: int) -> str:
    return f"s{seq:08d}"


def _check_sha(value) -> None:
    if not isinstance(value, str) or len(value) != 64 or \
            any(c not in "0123456789abcdef" for c in value):
        raise IndexFormatError(f"bundle_sha256: {value!r} is not a sha256 (64 lowercase hex "
                               f"digits); use bundle_fingerprint(runtime.manifest)")


def _ids_of_paths(cat: Catalog, paths: Sequence[str]) -> np.ndarray:
    parts = [np.zeros(0, np.int64)]
    for start in range(0, len(paths), 500):
        chunk = list(paths[start:start + 500])
        parts.append(cat.ids_where(f"path IN ({','.join('?' * len(chunk))})", chunk))
    return np.unique(np.concatenate(parts))


def _column(value, n: int, name: str, kind) -> list:
    if value is None or isinstance(value, (str, bytes, int, float, dict)) or np.isscalar(value):
        return [value] * n
    out = list(value)
    if len(out) != n:
        raise IndexFormatError(f"{name}: {len(out)} values for {n} vectors")
    return out


def _floats(values: list, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise IndexFormatError(f"{name}: expected numbers of seconds") from None
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise IndexFormatError(f"{name}: expected finite seconds >= 0")
    return arr


def _metadata_columns(n: int, paths, start_s, end_s, duration_s, tags, sha256) -> dict:
    path_col = _column(paths, n, "paths", str)
    if not all(isinstance(p, str) and p for p in path_col):
        raise IndexFormatError("paths: expected non-empty strings")
    start = _floats(_column(start_s, n, "start_s", float), "start_s")
    end_src = end_s if end_s is not None else duration_s
    end = start.copy() if end_src is None else _floats(_column(end_src, n, "end_s", float),
                                                         "end_s")
    duration = end.copy() if duration_s is None else _floats(
        _column(duration_s, n, "duration_s", float), "duration_s")
    if (end < start).any():
        raise IndexFormatError("end_s: a span ends before it starts")
    tag_col = []
    for t in _column(tags, n, "tags", dict):
        if t is None or t == {}:
            tag_col.append(None)
            continue
        if not isinstance(t, Mapping):
            raise IndexFormatError(f"tags: expected a dict per vector, got {type(t).__name__}")
        for key in t:
            _check_tag_key(key)
        try:
            tag_col.append(json.dumps(dict(t), sort_keys=True, ensure_ascii=False,
                                      allow_nan=False))
        except (TypeError, ValueError) as e:
            raise IndexFormatError(f"tags: not JSON-serialisable ({e})") from None
    sha_col = _column(sha256, n, "sha256", str)
    return {"paths": path_col, "start_s": start, "end_s": end, "duration_s": duration,
            "tags": tag_col, "sha256": sha_col}


def _hit(row: RecordRow, score: float) -> SearchHit:
    return SearchHit(row.id, row.path, row.start_s, row.end_s, float(score), row.tags,
                     row.duration_s)


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
