"""Checksums of bundle files: sha256 over a memory map, and a record of verified files.

Hashing a 100 MB INT8 tower takes 60-150 ms on small CPUs, as long as creating its ONNX
Runtime session; a cold load that must stay near 150 ms cannot pay it every time. With a
cache directory, ``VerifiedFiles`` remembers each file that hashed correctly under its
identity (device, inode, size, mtime, ctime); while that identity holds, the file is not
hashed again. Any write, truncation, copy or replacement changes the identity (ctime
cannot be set back from user space), so the record only skips work for files nobody has
touched. Without a cache directory every file is hashed on every load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

log = logging.getLogger("clapedge.runtime")

RECORD_NAME = "verified-files.json"


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's contents without a copy (an mmap; ``b""`` for an empty file)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm


def _identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """Files whose sha256 was checked, keyed by real path and file identity."""

    def __init__(self, cache_dir: Path | None):
        self.path = None if cache_dir is None else Path(cache_dir) / RECORD_NAME
        self._records: dict[str, list] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list]:
        if self._records is None:
            self._records = {}
            if self.path is not None and self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if isinstance(data, dict):
                        self._records = data
                except (OSError, ValueError):
                    log.warning("ignoring an unreadable checksum record %s", self.path)
        return self._records

    def check(self, path: Path, sha256: str) -> tuple[bool, list[int] | None]:
        """(whether ``path`` was verified to have ``sha256`` and is unchanged since, its
        identity now). Take the identity before hashing and hand it to ``remember``."""
        if self.path is None:
            return False, None
        try:
            identity = _identity(path)
        except OSError:
            return False, None
        with self._lock:
            record = self._load().get(str(path.resolve()))
        return record == identity + [sha256], identity

    def remember(self, path: Path, identity: list[int] | None, sha256: str) -> None:
        if self.path is None or identity is None:
            return
        with self._lock:
            records = self._load()
            records[str(path.resolve())] = identity + [sha256]
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(records, f)
                os.replace(tmp, self.path)
            except OSError as e:  # the record only saves time
                log.warning("cannot write the checksum record %s: %s", self.path, e)
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
