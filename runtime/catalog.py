"""The catalog of an embedding index: one SQLite database in WAL mode.

    meta        key -> value: format, format_version, bundle_sha256, dim, dtype,
                rerank_dtype, created, next_id, next_segment, generation, and the bundle
                path and model name the index was built with (informational)
    segments    id, name, count, id_min, id_max, created: the committed segments; a segment
                directory exists for readers only once its row is committed
    records     id, segment, path, sha256 (of the source file), start_s, end_s (the span
                within the file), duration_s (of the file), tags (JSON object or NULL)
    tombstones  id, segment: removed records whose vectors are still in a segment (the
                record's row is gone; compaction drops the vector and the tombstone)

Every change is one transaction that also increments ``generation``, so a reader sees either
the state before it or after it, and knows from ``generation`` when its view is stale.
Writes use ``synchronous=FULL``: a change that returned survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from clapedge.runtime.index_errors import IndexFormatError

log = logging.getLogger("clapedge.runtime")

CATALOG_FILE = "catalog.sqlite"
FORMAT = "clapedge.index"
FORMAT_VERSION = "1.0"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, count INTEGER NOT NULL,
    id_min INTEGER, id_max INTEGER, created REAL NOT NULL);
CREATE TABLE records (
    id INTEGER PRIMARY KEY, segment INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT,
    start_s REAL NOT NULL, end_s REAL NOT NULL, duration_s REAL NOT NULL, tags TEXT);
CREATE INDEX records_path ON records(path);
CREATE INDEX records_segment ON records(segment);
CREATE TABLE tombstones (id INTEGER PRIMARY KEY, segment INTEGER NOT NULL);
"""

RECORD_COLUMNS = "id, segment, path, sha256, start_s, end_s, duration_s, tags"


@dataclass(frozen=True)
class SegmentRow:
    id: int
    name: str
    count: int
    id_min: int | None
    id_max: int | None


@dataclass(frozen=True)
class RecordRow:
    id: int
    segment: int
    path: str
    sha256: str | None
    start_s: float
    end_s: float
    duration_s: float
    tags: dict[str, Any]

    @classmethod
    def from_sql(cls, row: tuple) -> "RecordRow":
        tags = json.loads(row[7]) if row[7] else {}
        return cls(int(row[0]), int(row[1]), row[2], row[3], float(row[4]), float(row[5]),
                   float(row[6]), tags)


def _connect(path: Path, writable: bool) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        conn.execute("PRAGMA journal_mode").fetchone()  # touches the file: fails early
    except sqlite3.Error:
        if writable:
            raise
        # a read-only directory: SQLite cannot create the WAL's shared-memory file
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30.0)
    if writable:
        conn.execute("PRAGMA synchronous=FULL")
    else:
        conn.execute("PRAGMA query_only=1")
    return conn


class Catalog:
    """SQL of the index, nothing else (the ``Index`` decides what to do)."""

    def __init__(self, path: Path, *, writable: bool):
        self.path = path
        self.writable = writable
        if not path.is_file():
            raise IndexFormatError(f"{path.parent} is not a clapedge index (no {CATALOG_FILE})")
        try:
            self.conn = _connect(path, writable)
            self._meta = self._read_meta()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{path}: cannot read the index catalog ({e})") from None
        _check_format(path, self._meta)

    @staticmethod
    def create(path: Path, meta: dict[str, Any]) -> None:
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)  # the index is built in a temp dir: no partial state
            conn.execute("BEGIN")
            full = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": f"{time.time():.3f}", "next_id": "0", "next_segment": "1",
                    "generation": "0", **{k: str(v) for k, v in meta.items() if v is not None}}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(full.items()))
            conn.execute("COMMIT")
        finally:
            conn.close()

    def close(self) -> None:
        self.conn.close()

    # -- transactions

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """A consistent snapshot for the statements inside (WAL: never blocks the writer)."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[int]:
        """One atomic change; yields the new generation number."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            generation = self.generation() + 1
            yield generation
            self.set_meta("generation", generation)
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL on commit does): a second
            # ROLLBACK would fail and hide the error that matters
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error as e:
                    log.warning("%s: rollback failed: %s", self.path, e)
            with contextlib.suppress(sqlite3.Error):
                self._meta = self._read_meta()  # set_meta ran ahead of the rolled-back change
            raise
        self._meta["generation"] = str(generation)

    # -- meta

    def _read_meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._meta)

    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0])

    def counter(self, key: str) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
        self._meta[key] = str(value)

    # -- segments

    def segments(self) -> list[SegmentRow]:
        rows = self.conn.execute(
            "SELECT id, name, count, id_min, id_max FROM segments ORDER BY id").fetchall()
        return [SegmentRow(*r) for r in rows]

    def insert_segment(self, name: str, count: int, id_min: int | None,
                       id_max: int | None) -> int:
        cur = self.conn.execute(
            "INSERT INTO segments (name, count, id_min, id_max, created) VALUES (?,?,?,?,?)",
            (name, count, id_min, id_max, time.time()))
        return int(cur.lastrowid)

    def delete_segments(self, seg_ids: Sequence[int]) -> None:
        self.conn.executemany("DELETE FROM segments WHERE id=?", [(int(s),) for s in seg_ids])
        self.conn.executemany("DELETE FROM tombstones WHERE segment=?",
                              [(int(s),) for s in seg_ids])

    # -- records

    def insert_records(self, seg_id: int, ids: np.ndarray, paths: Sequence[str],
                       sha256: Sequence[str | None], start_s: np.ndarray, end_s: np.ndarray,
                       duration_s: np.ndarray, tags: Sequence[str | None]) -> None:
        self.conn.executemany(
            f"INSERT INTO records ({RECORD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            zip(ids.tolist(), [seg_id] * len(ids), paths, sha256, start_s.tolist(),
                end_s.tolist(), duration_s.tolist(), tags))

    def ids_where(self, where: str, params: Sequence[Any] = ()) -> np.ndarray:
        """Sorted int64 ids of the live records matching ``where`` (an SQL condition)."""
        rows = self.conn.execute(f"SELECT id FROM records WHERE {where}", params).fetchall()
        return np.sort(np.array(rows, dtype=np.int64).reshape(-1))  # faster than ORDER BY

    def records(self, ids: Sequence[int]) -> dict[int, RecordRow]:
        out: dict[int, RecordRow] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM records WHERE id IN ({marks})", chunk):
                out[int(row[0])] = RecordRow.from_sql(row)
        return out

    def records_of_segment(self, seg_id: int) -> list[RecordRow]:
        return [RecordRow.from_sql(r) for r in self.conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE segment=? ORDER BY id", (seg_id,))]

    def file_hashes(self, paths: Sequence[str]) -> dict[str, set[str]]:
        """path -> sha256 values of its live records."""
        out: dict[str, set[str]] = {}
        paths = list(paths)
        for start in range(0, len(paths), 500):
            chunk = paths[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for path, sha in self.conn.execute(
                    f"SELECT DISTINCT path, sha256 FROM records WHERE path IN ({marks})", chunk):
                out.setdefault(path, set()).add(sha)
        return out

    def tombstone(self, ids: np.ndarray) -> int:
        """Turn live records into tombstones; returns how many there were."""
        n = 0
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"INSERT OR IGNORE INTO tombstones SELECT id, segment FROM "
                              f"records WHERE id IN ({marks})", chunk)
            n += self.conn.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk).rowcount
        return n

    def tombstones(self) -> dict[int, np.ndarray]:
        """segment id -> sorted ids of its tombstones."""
        out: dict[int, list[int]] = {}
        for rid, seg in self.conn.execute("SELECT id, segment FROM tombstones ORDER BY id"):
            out.setdefault(seg, []).append(rid)
        return {s: np.asarray(v, dtype=np.int64) for s, v in out.items()}

    def move_records(self, from_segments: Sequence[int], to_segment: int) -> None:
        self.conn.executemany("UPDATE records SET segment=? WHERE segment=?",
                              [(to_segment, int(s)) for s in from_segments])

    def delete_records(self, ids: Sequence[int]) -> None:
        self.conn.executemany("DELETE FROM records WHERE id=?", [(int(i),) for i in ids])

    def counts(self) -> dict[str, int]:
        one = lambda sql: int(self.conn.execute(sql).fetchone()[0])  # noqa: E731
        return {"records": one("SELECT COUNT(*) FROM records"),
                "files": one("SELECT COUNT(DISTINCT path) FROM records"),
                "tombstones": one("SELECT COUNT(*) FROM tombstones"),
                "segments": one("SELECT COUNT(*) FROM segments")}

    def quick_check(self) -> str:
        return str(self.conn.execute("PRAGMA quick_check").fetchone()[0])


def _check_format(path: Path, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise IndexFormatError(f"{path.parent} is not a clapedge index")
    version = meta.get("format_version", "?")
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise IndexFormatError(
            f"{path.parent}: index format version {version}; this clapedge reads "
            f"{FORMAT_VERSION.split('.')[0]}.x (upgrade clapedge or rebuild the index)")
