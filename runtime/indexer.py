"""Audio files into an ``Index``: find, hash, skip the unchanged, cut, embed, add.

    rt = Runtime("BUNDLE")
    idx = open_or_create(Path("clips.index"), rt)
    report = Indexer(idx, rt).add(["/data/clips"])     # IngestReport

Files are found recursively (directories: files with an audio extension, hidden ones
skipped; files named explicitly are always tried, decoded by content). A file whose path is
indexed with the same content sha256 is skipped; a changed file replaces its old records in
the same commit. Each file becomes one record per window: the bundle's clip policy (files
up to ``clip.max_seconds`` are one record; longer ones are cut into ``window_seconds``
windows every ``hop_seconds``, the last ending at the end), or ``WindowPolicy(window_s,
hop_s)``. A file that cannot be decoded is reported and skipped. Work is committed every
``commit_records`` windows (one segment each), so an interrupted run keeps what it did.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from clapedge.errors import ClapEdgeError, ConfigError
from clapedge.runtime.audio import frame_windows, seconds_to_samples
from clapedge.runtime.catalog import RecordRow
from clapedge.runtime.index import Index, bundle_fingerprint

AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64", ".sph", ".voc", ".wv"})


@dataclass(frozen=True)
class WindowPolicy:
    """How a file is cut into records. ``window_s=None``: the bundle's clip policy.
    Otherwise files longer than ``window_s`` become windows of ``window_s`` every ``hop_s``
    (default ``window_s / 2``); ``window_s`` must fit the bundle's ``clip.max_seconds`` so a
    window is one model input."""

    window_s: float | None = None
    hop_s: float | None = None

    def __post_init__(self):
        for name in ("window_s", "hop_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0 or v != v or v == float("inf")):
                raise ConfigError(f"{name}: {v!r} must be a positive number of seconds")
        if self.hop_s is not None and self.window_s is None:
            raise ConfigError("hop_s needs window_s")
        if self.hop_s is not None and self.hop_s > self.window_s:
            raise ConfigError(f"hop_s {self.hop_s} must not exceed window_s {self.window_s}")

    def spans(self, n_samples: int, rate: int, clip) -> list[tuple[int, int]]:
        """[start, end) sample spans of a signal of ``n_samples``."""
        if self.window_s is None:
            if n_samples <= seconds_to_samples(clip.max_seconds, rate):
                return [(0, n_samples)]
            window, hop = clip.window_seconds, clip.hop_seconds
        else:
            window, hop = self.window_s, self.hop_s or self.window_s / 2
        return frame_windows(n_samples, seconds_to_samples(window, rate),
                             seconds_to_samples(hop, rate))


@dataclass
class IngestReport:
    files_added: int = 0
    files_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    records: int = 0
    seconds_audio: float = 0.0
    decode_s: float = 0.0
    embed_s: float = 0.0
    store_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["failed"] = [{"path": p, "error": e} for p, e in self.failed]
        return d


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Absolute paths: files named explicitly, and audio files under directories (recursive,
    sorted, hidden entries skipped). A path that does not exist is returned as is, so the
    caller reports it."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(os.path.abspath(p))
        found: list[Path]
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [Path(dirpath) / f for f in sorted(filenames)
                          if not f.startswith(".") and Path(f).suffix.lower() in AUDIO_EXTENSIONS]
        else:
            found = [path]
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def open_or_create(path: Path, runtime, *, dtype: str = "int8") -> Index:
    """Open the index at ``path`` for writing (checking it was built with this bundle), or
    create it for this bundle."""
    from clapedge.runtime.catalog import CATALOG_FILE

    if (path / CATALOG_FILE).exists():
        index = Index.open(path)
        try:
            index.check_bundle(runtime)
        except ClapEdgeError:
            index.close()
            raise
        return index
    return Index.create(path, bundle_fingerprint(runtime.manifest), runtime.embed_dim,
                        dtype=dtype, bundle_path=str(Path(runtime.bundle.root).resolve()),
                        model_name=runtime.manifest.model.name)


@dataclass
class _Pending:
    path: str
    sha256: str
    duration: float
    spans: list[tuple[int, int]]
    windows: list[np.ndarray]


class Indexer:
    """Adds audio files to ``index`` with ``runtime`` (the index's bundle)."""

    def __init__(self, index: Index, runtime, *, window: WindowPolicy | None = None,
                 tags: dict | None = None, batch_size: int = 8, commit_records: int = 256):
        index.check_bundle(runtime)
        index.require_writable("add files to")
        self.index, self.runtime = index, runtime
        self.window = window or WindowPolicy()
        clip = runtime.manifest.clip
        if self.window.window_s is not None and self.window.window_s > clip.max_seconds:
            raise ConfigError(f"window_s {self.window.window_s} exceeds the bundle's "
                              f"clip.max_seconds {clip.max_seconds}: a window must be one "
                              f"model input")
        self.tags = dict(tags or {})
        self.batch_size = batch_size
        self.commit_records = commit_records

    def add(self, paths: Iterable[str | os.PathLike],
            on_file: Callable[[str, str, str | None], None] | None = None) -> IngestReport:
        """Index the audio under ``paths``. ``on_file(path, status, error)`` is called once
        per file with status "added", "skipped" or "failed" (added: once committed)."""
        t0 = time.perf_counter()
        report = IngestReport()
        files = [str(p) for p in find_audio_files(paths)]
        known = self.index.file_hashes(files)
        pending: list[_Pending] = []
        n_windows = 0
        for path in files:
            status, error = self._prepare(path, known, report, pending)
            if status == "skipped":
                report.files_skipped += 1
            elif status == "failed":
                report.failed.append((path, error))
            if status != "queued" and on_file:
                on_file(path, status, error)
            if status == "queued":
                n_windows += len(pending[-1].windows)
                if n_windows >= self.commit_records:
                    self._flush(pending, report, on_file)
                    n_windows = 0
        self._flush(pending, report, on_file)
        report.total_s = time.perf_counter() - t0
        return report

    def _prepare(self, path: str, known: dict[str, set[str]], report: IngestReport,
                 pending: list[_Pending]) -> tuple[str, str | None]:
        t0 = time.perf_counter()
        try:
            sha = file_sha256(Path(path))
        except OSError as e:
            return "failed", f"{path}: cannot read ({e.strerror or e})"
        if known.get(path) == {sha}:
            return "skipped", None
        try:
            signal = self.runtime.load_audio(path)
        except ClapEdgeError as e:
            return "failed", str(e)
        rate = self.runtime.sample_rate
        spans = self.window.spans(len(signal), rate, self.runtime.manifest.clip)
        pending.append(_Pending(path, sha, len(signal) / rate, spans,
                                [signal[a:b] for a, b in spans]))
        report.decode_s += time.perf_counter() - t0
        return "queued", None

    def _flush(self, pending: list[_Pending], report: IngestReport, on_file) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        vectors, ok = self._embed(pending, report, on_file)
        t1 = time.perf_counter()
        kept = [p for p, good in zip(pending, ok) if good]
        if kept:
            rate = self.runtime.sample_rate
            self.index.add_embeddings(
                vectors,
                [p.path for p in kept for _ in p.spans],
                start_s=[a / rate for p in kept for a, _ in p.spans],
                end_s=[b / rate for p in kept for _, b in p.spans],
                duration_s=[p.duration for p in kept for _ in p.spans],
                sha256=[p.sha256 for p in kept for _ in p.spans],
                tags=self.tags or None, replace_paths=True)
        report.embed_s += t1 - t0
        report.store_s += time.perf_counter() - t1
        for p in kept:
            report.files_added += 1
            report.records += len(p.spans)
            report.seconds_audio += p.duration
            if on_file:
                on_file(p.path, "added", None)
        pending.clear()

    def _embed(self, pending: list[_Pending], report: IngestReport,
               on_file) -> tuple[np.ndarray, list[bool]]:
        rate = self.runtime.sample_rate
        windows = [(w, rate) for p in pending for w in p.windows]
        try:
            return self.runtime.embed_audio(windows, batch_size=self.batch_size), \
                [True] * len(pending)
        except ClapEdgeError:
            pass
        # one bad input fails the batch: embed file by file to name it
        parts, ok = [], []
        for p in pending:
            try:
                parts.append(self.runtime.embed_audio([(w, rate) for w in p.windows],
                                                      batch_size=self.batch_size))
                ok.append(True)
            except ClapEdgeError as e:
                ok.append(False)
                report.failed.append((p.path, str(e)))
                if on_file:
                    on_file(p.path, "failed", str(e))
        dim = self.runtime.embed_dim
        return (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)), ok


def reembedder(runtime) -> Callable[[list[RecordRow]], tuple[np.ndarray, np.ndarray]]:
    """For ``Index.repair``: embeds records again from their source files (the same span of
    each), when the file still has the content sha256 it was indexed with."""

    def reembed(records: Sequence[RecordRow]) -> tuple[np.ndarray, np.ndarray]:
        rate = runtime.sample_rate
        keep = np.zeros(len(records), dtype=np.bool_)
        inputs = []
        by_path: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_path.setdefault(r.path, []).append(i)
        for path, rows in by_path.items():
            try:
                if not Path(path).is_file() or file_sha256(Path(path)) != records[rows[0]].sha256:
                    continue
                signal = runtime.load_audio(path)
            except (OSError, ClapEdgeError):
                continue
            for i in rows:
                a, b = round(records[i].start_s * rate), round(records[i].end_s * rate)
                if 0 <= a < b <= len(signal):
                    keep[i] = True
                    inputs.append((i, signal[a:b]))
        inputs.sort(key=lambda t: t[0])
        if not inputs:
            return np.zeros((0, runtime.embed_dim), np.float32), keep
        vectors = runtime.embed_audio([(w, rate) for _, w in inputs])
        return vectors, keep

    return reembed
