"""Immutable vector segments of an embedding index: one directory per segment.

    SEGMENT/gallery.bin   the vectors, a ``clapedge.kernels.Gallery`` file (int8 + per-row
                          scale + exact re-rank copy, or fp16 / float32), memory-mapped
    SEGMENT/segment.bin   what the segment is, and the record id of every row

``segment.bin`` (format version 1)::

    8 bytes   magic b"CLAPSEG\\0"
    4 bytes   format version, uint32 little-endian
    4 bytes   header length H, uint32 little-endian
    H bytes   header, UTF-8 JSON with sorted keys: name, count, dim, dtype, rerank_dtype,
              bundle_sha256, created, ids {offset, nbytes, crc32}, gallery {file, size,
              crc32 (whole file), head_nbytes, head_crc32 (its magic + header)}
    4 bytes   CRC-32 of the 16 + H bytes before it
    ...       ids: int64 little-endian [count], strictly increasing, at ids.offset (64-aligned)

Every byte of both files is covered by a checksum; the gallery's size is recorded, so a torn
tail is seen without reading the data. A segment is written into a temporary directory
(each file fsynced), the directory fsynced and renamed to its name, and the parent fsynced;
it exists for readers only once the catalog commits its row (``runtime/catalog.py``).

Opening checks the structure (magic, version, header checksum, ids checksum, sizes, the
gallery header's checksum, agreement with the catalog) and, unless the verified-files record
says the file is untouched since a full check (``checksums.VerifiedFiles``: device, inode,
size, mtime, ctime), the CRC-32 of the whole gallery file. A failure raises
``IndexCorruptError`` naming the segment.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clapedge.kernels import Gallery, GalleryFileError
from clapedge.runtime.checksums import VerifiedFiles, mapped
from clapedge.runtime.index_errors import IndexCorruptError

MAGIC = b"CLAPSEG\0"
FORMAT_VERSION = 1
GALLERY_FILE = "gallery.bin"
SEGMENT_FILE = "segment.bin"
TMP_PREFIX = ".tmp-"
_ALIGN = 64
_CRC_BLOCK = 1 << 24
# A file verified less than this long after its last change is not recorded as verified:
# file times are coarse (a clock tick), so a change in the same tick would keep its identity.
_SETTLE_S = 2.0

# Exceptions that a corrupt file can make the parsers raise; all become IndexCorruptError.
_PARSE_ERRORS = (OSError, ValueError, KeyError, TypeError, struct.error, GalleryFileError,
                 OverflowError, AttributeError, RecursionError, MemoryError)


@dataclass(frozen=True)
class SegmentHeader:
    name: str
    count: int
    dim: int
    dtype: str
    rerank_dtype: str | None
    bundle_sha256: str
    created: float
    ids_offset: int
    ids_crc32: int
    gallery_size: int
    gallery_crc32: int
    gallery_head_nbytes: int
    gallery_head_crc32: int

    def to_json(self) -> dict:
        d = asdict(self)
        return {
            "name": d["name"], "count": d["count"], "dim": d["dim"], "dtype": d["dtype"],
            "rerank_dtype": d["rerank_dtype"], "bundle_sha256": d["bundle_sha256"],
            "created": d["created"],
            "ids": {"offset": d["ids_offset"], "nbytes": 8 * d["count"],
                    "crc32": d["ids_crc32"]},
            "gallery": {"file": GALLERY_FILE, "size": d["gallery_size"],
                        "crc32": d["gallery_crc32"], "head_nbytes": d["gallery_head_nbytes"],
                        "head_crc32": d["gallery_head_crc32"]}}

    @classmethod
    def from_json(cls, h: dict) -> "SegmentHeader":
        ids, gal = h["ids"], h["gallery"]
        header = cls(
            name=str(h["name"]), count=_int(h["count"]), dim=_int(h["dim"]),
            dtype=str(h["dtype"]),
            rerank_dtype=None if h["rerank_dtype"] is None else str(h["rerank_dtype"]),
            bundle_sha256=str(h["bundle_sha256"]), created=float(h["created"]),
            ids_offset=_int(ids["offset"]), ids_crc32=_int(ids["crc32"]),
            gallery_size=_int(gal["size"]), gallery_crc32=_int(gal["crc32"]),
            gallery_head_nbytes=_int(gal["head_nbytes"]),
            gallery_head_crc32=_int(gal["head_crc32"]))
        if _int(ids["nbytes"]) != 8 * header.count or gal["file"] != GALLERY_FILE:
            raise ValueError("inconsistent header")
        return header


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


@dataclass(frozen=True)
class Segment:
    """An open segment: its header, the record id of each row (int64, increasing) and the
    memory-mapped gallery the kernel scans."""

    header: SegmentHeader
    ids: np.ndarray
    gallery: Gallery
    path: Path

    @property
    def name(self) -> str:
        return self.header.name

    def __len__(self) -> int:
        return self.header.count

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows holding ``ids`` (sorted int64); ids not in this segment are left out."""
        if len(ids) == 0 or len(self.ids) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        return pos[self.ids[pos] == ids]

    def mask_of(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask [count]: True on the rows holding one of ``ids`` (sorted int64)."""
        mask = np.zeros(len(self.ids), dtype=np.bool_)
        mask[self.rows_of(ids)] = True
        return mask

    def exact_vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The stored vectors as float32 [rows, dim], as exact as the segment holds them:
        the re-rank copy of an int8 gallery, the fp16/float32 rows otherwise (an int8
        gallery without re-rank copy: the dequantised rows, which re-quantise to the same
        codes)."""
        rerank = _rerank_copy(self.gallery)
        if rerank is not None:
            out = np.asarray(rerank if rows is None else rerank[rows])
            return out.astype(np.float32, copy=False)  # float32: the mapped rows, no copy
        decoded = self.gallery.decode()
        return decoded if rows is None else decoded[rows]


def _rerank_copy(gallery: Gallery) -> np.ndarray | None:
    # compaction rebuilds a segment from the exact re-rank copy, without a second
    # quantisation
    return gallery.rerank_vectors


# --------------------------------------------------------------------------- writing

def write_segment(parent: Path, name: str, ids: np.ndarray, vectors: np.ndarray, *,
                  dtype: str, rerank_dtype: str | None, bundle_sha256: str,
                  durable: bool = True) -> Segment:
    """Write a segment directory ``parent/name`` atomically and return it opened.

    ``ids``: int64, strictly increasing, one per row of ``vectors`` [count, dim].
    ``durable=False`` skips the fsyncs (tests and benches of other things only).
    """
    ids = np.ascontiguousarray(ids, dtype="<i8")
    if ids.ndim != 1 or len(ids) != len(vectors) or (len(ids) > 1 and
                                                     not (np.diff(ids) > 0).all()):
        raise ValueError("ids must be strictly increasing, one per vector")
    tmp = parent / f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        rerank = rerank_dtype is not None
        gallery = Gallery(vectors, dtype=dtype, rerank=rerank,
                          rerank_dtype=rerank_dtype or "float32")
        gallery.save(tmp / GALLERY_FILE)  # temp file + fsync + rename inside tmp
        size = (tmp / GALLERY_FILE).stat().st_size
        head_nbytes = _gallery_head_nbytes(tmp / GALLERY_FILE)
        with mapped(tmp / GALLERY_FILE) as buf:
            head_crc = zlib.crc32(buf[:head_nbytes])
            full_crc = _crc32(buf)
        header = SegmentHeader(
            name=name, count=len(ids), dim=int(vectors.shape[1]), dtype=gallery.dtype,
            rerank_dtype=gallery.rerank_dtype, bundle_sha256=bundle_sha256,
            created=time.time(), ids_offset=0, ids_crc32=zlib.crc32(ids.view(np.uint8)),
            gallery_size=size, gallery_crc32=full_crc, gallery_head_nbytes=head_nbytes,
            gallery_head_crc32=head_crc)
        _write_segment_file(tmp / SEGMENT_FILE, header, ids, durable)
        if durable:
            _fsync_dir(tmp)
        final = parent / name
        if final.exists():  # an uncommitted leftover of a crashed writer
            shutil.rmtree(final)
        os.rename(tmp, final)
        if durable:
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_segment(final, expect_name=name, verify="quick")


def _write_segment_file(path: Path, header: SegmentHeader, ids: np.ndarray,
                        durable: bool) -> None:
    # the header holds the ids' offset, which depends on the header's length: grow to fit
    offset = _ALIGN
    while True:
        header = _with_offset(header, offset)
        blob = json.dumps(header.to_json(), sort_keys=True).encode()
        need = _align(16 + len(blob) + 4)
        if need <= offset:
            break
        offset = need
    head = MAGIC + struct.pack("<II", FORMAT_VERSION, len(blob)) + blob
    with open(path, "wb") as f:
        f.write(head + struct.pack("<I", zlib.crc32(head)))
        f.write(b"\0" * (offset - f.tell()))
        f.write(ids.tobytes())
        f.flush()
        if durable:
            os.fsync(f.fileno())


def _with_offset(h: SegmentHeader, offset: int) -> SegmentHeader:
    d = asdict(h)
    d["ids_offset"] = offset
    return SegmentHeader(**d)


def _gallery_head_nbytes(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16:
        raise GalleryFileError(f"{path}: too short")
    return 16 + struct.unpack("<I", head[12:16])[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(buf) -> int:
    crc = 0
    view = memoryview(buf)
    for start in range(0, len(view), _CRC_BLOCK):
        crc = zlib.crc32(view[start:start + _CRC_BLOCK], crc)
    view.release()
    return crc


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# --------------------------------------------------------------------------- reading

def read_header(directory: Path) -> tuple[SegmentHeader, np.ndarray]:
    """Parse and check ``segment.bin``: (header, ids). Raises ``IndexCorruptError``."""
    name = directory.name
    path = directory / SEGMENT_FILE
    if not directory.is_dir() or not path.is_file():
        raise IndexCorruptError(name, f"missing ({path} does not exist)", missing=True)
    try:
        data = path.read_bytes()
        if len(data) < 20 or data[:8] != MAGIC:
            raise IndexCorruptError(name, f"{SEGMENT_FILE} is not a segment file (bad magic "
                                          f"or truncated to {len(data)} bytes)")
        version, hlen = struct.unpack("<II", data[8:16])
        if version != FORMAT_VERSION:
            raise IndexCorruptError(name, f"segment format version {version}; this clapedge "
                                          f"reads version {FORMAT_VERSION}")
        if 16 + hlen + 4 > len(data):
            raise IndexCorruptError(name, f"{SEGMENT_FILE} is truncated (header runs past "
                                          f"the end)")
        (crc,) = struct.unpack("<I", data[16 + hlen:20 + hlen])
        if zlib.crc32(data[:16 + hlen]) != crc:
            raise IndexCorruptError(name, f"{SEGMENT_FILE} header fails its checksum")
        header = SegmentHeader.from_json(json.loads(data[16:16 + hlen].decode()))
        end = header.ids_offset + 8 * header.count
        if header.ids_offset < 20 + hlen or len(data) != end:
            raise IndexCorruptError(name, f"{SEGMENT_FILE} has {len(data)} bytes, expected "
                                          f"{end} (truncated or extended)")
        if any(data[20 + hlen:header.ids_offset]):
            raise IndexCorruptError(name, f"{SEGMENT_FILE} padding is not zero (corrupt)")
        raw = data[header.ids_offset:end]
        if zlib.crc32(raw) != header.ids_crc32:
            raise IndexCorruptError(name, f"{SEGMENT_FILE} ids fail their checksum")
        ids = np.frombuffer(raw, dtype="<i8").astype(np.int64)
    except IndexCorruptError:
        raise
    except _PARSE_ERRORS as e:
        raise IndexCorruptError(name, f"{SEGMENT_FILE} is corrupt ({type(e).__name__}: "
                                      f"{e})") from None
    if header.name != name:
        raise IndexCorruptError(name, f"{SEGMENT_FILE} names segment {header.name!r}")
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise IndexCorruptError(name, "record ids are not increasing")
    return header, ids


def open_segment(directory: Path, *, expect_name: str | None = None,
                 expect: dict | None = None, verify: str = "auto",
                 verified: VerifiedFiles | None = None) -> Segment:
    """Open (memory-map) a segment after checking it; see the module docstring.

    ``expect``: header fields that must match (count, dim, dtype, bundle_sha256, ...).
    ``verify``: "auto" (full checksum unless ``verified`` records the file untouched since
    one), "full" (always) or "quick" (structure and headers only).
    """
    name = directory.name
    header, ids = read_header(directory)
    for key, want in (expect or {}).items():
        have = getattr(header, key)
        if have != want:
            raise IndexCorruptError(name, f"header says {key}={have!r}, the catalog "
                                          f"{want!r}")
    gpath = directory / GALLERY_FILE
    try:
        size = gpath.stat().st_size
    except FileNotFoundError:
        raise IndexCorruptError(name, f"missing {GALLERY_FILE}", missing=True) from None
    except OSError as e:
        raise IndexCorruptError(name, f"cannot read {GALLERY_FILE}: {e}") from None
    if size != header.gallery_size:
        raise IndexCorruptError(name, f"{GALLERY_FILE} has {size} bytes, expected "
                                      f"{header.gallery_size} (torn tail or truncated)")
    try:
        with open(gpath, "rb") as f:
            head = f.read(header.gallery_head_nbytes)
        if zlib.crc32(head) != header.gallery_head_crc32:
            raise IndexCorruptError(name, f"{GALLERY_FILE} header fails its checksum")
        if verify != "quick":
            _verify_gallery(gpath, header, verify, verified)
        gallery = Gallery.load(gpath, mmap=True)
    except IndexCorruptError:
        raise
    except _PARSE_ERRORS as e:
        raise IndexCorruptError(name, f"{GALLERY_FILE} is corrupt ({type(e).__name__}: "
                                      f"{e})") from None
    if gallery.shape != (header.count, header.dim) or gallery.dtype != header.dtype or \
            gallery.rerank_dtype != header.rerank_dtype:
        raise IndexCorruptError(name, f"{GALLERY_FILE} holds {gallery!r}, the header says "
                                      f"{header.count} x {header.dim} {header.dtype}")
    return Segment(header, ids, gallery, directory)


def _verify_gallery(path: Path, header: SegmentHeader, verify: str,
                    verified: VerifiedFiles | None) -> None:
    token = f"crc32:{header.gallery_crc32:08x}"
    record = verified if verify == "auto" else None
    known, identity = (record.check(path, token) if record is not None else (False, None))
    if known:
        return
    with mapped(path) as buf:
        crc = _crc32(buf)
    if crc != header.gallery_crc32:
        raise IndexCorruptError(path.parent.name, f"{GALLERY_FILE} fails its checksum "
                                                  f"(corrupt data)")
    if record is not None and identity is not None and \
            time.time() - identity[4] / 1e9 > _SETTLE_S:
        record.remember(path, identity, token)


def verify_segment(directory: Path) -> None:
    """Full check of one segment (every byte); raises ``IndexCorruptError``."""
    open_segment(directory, verify="full")
