"""Calibration and evaluation sources: a directory of audio files or a JSON-lines manifest.

A manifest line is an object with ``path`` (relative to the manifest's folder, or absolute)
and optionally ``attributes`` ({name: label}), ``split`` and ``duration``; the corpus written
by ``clap-corpus`` is such a manifest. Audio is decoded by the runtime's own frontend, so
calibration sees exactly what inference sees.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clapedge.errors import ClapEdgeError
from clapedge.runtime.audio import load_audio

log = logging.getLogger("clapedge.calib")

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


class CalibrationError(ClapEdgeError):
    """Calibration data that is missing, unreadable or too little."""


@dataclass(frozen=True)
class CalibItem:
    path: Path
    attributes: dict[str, str | None] = field(default_factory=dict)
    split: str | None = None
    captions: tuple[str, ...] = ()


def read_source(source: str | Path, *, split: str | None = None) -> list[CalibItem]:
    """Items of a directory (recursive, sorted) or of a ``.jsonl`` manifest (``split``
    filters manifest rows; a directory has no splits)."""
    source = Path(source)
    if source.is_dir():
        if (source / "manifest.jsonl").is_file():
            return read_manifest(source / "manifest.jsonl", split=split)
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS
                       and p.is_file())
        if not files:
            raise CalibrationError(f"{source}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        return [CalibItem(path=p) for p in files]
    if source.is_file():
        return read_manifest(source, split=split)
    raise CalibrationError(f"{source}: no such directory or manifest file")


def read_manifest(path: Path, *, split: str | None = None) -> list[CalibItem]:
    items: list[CalibItem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the manifest ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rel = row["path"]
            if not isinstance(rel, str):
                raise TypeError("path is not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CalibrationError(f"{path}:{number}: not a manifest row with a 'path' ({e})") \
                from None
        if split is not None and row.get("split") != split:
            continue
        attributes = row.get("attributes") or row.get("labels") or {}
        items.append(CalibItem(path=(path.parent / rel) if not Path(rel).is_absolute() else Path(rel),
                               attributes=dict(attributes), split=row.get("split"),
                               captions=tuple(row.get("captions") or ())))
    if not items:
        where = f" with split {split!r}" if split else ""
        raise CalibrationError(f"{path}: the manifest has no rows{where}")
    return items


def decode_items(items: list[CalibItem], sample_rate: int) -> list[tuple[CalibItem, np.ndarray]]:
    """Decodes every item with the runtime frontend; unreadable files are named in a warning
    and skipped. Raises when none is left."""
    decoded = []
    for item in items:
        try:
            decoded.append((item, load_audio(item.path, target_rate=sample_rate)))
        except ClapEdgeError as e:
            log.warning("skipping %s: %s", item.path, e)
    if not decoded:
        raise CalibrationError(f"none of the {len(items)} calibration files could be read")
    return decoded
