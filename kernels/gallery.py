"""A gallery in the storage form the top-k kernel scans, and its file format.

``Gallery(vectors, dtype="int8")`` quantises each row symmetrically (scale = max|x| / 127) into
the grouped layout the SIMD levels read (16 rows interleaved in 4-byte steps, see
kernels/gallery.h), with the per-row scales and the VNNI corrections, plus, by default, a
float32 copy for the exact re-rank. ``dtype="fp16"`` keeps half-precision rows (half the bytes
of float32, scores within about 1e-3), ``dtype="float32"`` an exact copy.

File format (``save`` / ``load``), one file so that it can be renamed into place atomically::

    8 bytes   magic b"CLAPGAL\\0"
    4 bytes   format version, uint32 little-endian (this code writes and reads 1)
    4 bytes   header length H, uint32 little-endian
    H bytes   header, UTF-8 JSON: dtype, n, dim, layout, rerank_dtype and, for every array,
              its numpy dtype, shape, byte offset from the start of the file, size and CRC-32
    ...       the arrays, each starting at a multiple of 64 bytes

``Gallery.load(path, mmap=True)`` memory-maps the arrays read-only, so opening a large
gallery costs nothing and the OS pages it in as the kernel scans it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from clapedge.kernels import _native
from clapedge.kernels.errors import GalleryFileError, KernelInputError

MAGIC = b"CLAPGAL\0"
FORMAT_VERSION = 1
INT8_LAYOUT = "int8-groups16x4"
DTYPES = ("int8", "fp16", "float32")
GROUP_ROWS = 16
_ALIGN = 64


def padded_dim(dim: int) -> int:
    return (dim + 3) // 4 * 4


def num_groups(n: int) -> int:
    return (n + GROUP_ROWS - 1) // GROUP_ROWS


def float_rows(x: np.ndarray, name: str) -> np.ndarray:
    """A 2-D real array as contiguous float32 rows. Contiguous float32 input is used as is;
    other real dtypes (float16/64, integers) are converted with one copy; anything else
    (complex, bool, object) is refused."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise KernelInputError(f"{name} must be a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating)
                                     or np.issubdtype(arr.dtype, np.integer)):
        raise KernelInputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise KernelInputError(f"{name} must have a positive dimension, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def first_non_finite_row(x: np.ndarray, chunk: int = 1 << 16) -> int | None:
    """Index of the first row holding NaN or Inf, scanning in chunks (no full-size mask)."""
    for start in range(0, x.shape[0], chunk):
        bad = ~np.isfinite(x[start:start + chunk]).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def quantize_int8(x: np.ndarray, *, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation as the kernel does it (for galleries and, on the
    fly, for queries): returns (codes int8 [n, dim] in [-127, 127], scales float32 [n]) with
    x ~= codes * scales[:, None]."""
    rows = float_rows(x, "x")
    bad = first_non_finite_row(rows)
    if bad is not None:
        raise KernelInputError(f"x contains NaN or Inf (first at row {bad})")
    codes = np.empty(rows.shape, dtype=np.int8)
    scales = np.empty(rows.shape[0], dtype=np.float32)
    _native.quantize_int8(rows, codes, scales, _threads(threads))
    return codes, scales


def _threads(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


class Gallery:
    """Gallery vectors stored for the top-k kernel (see the module docstring).

    Args:
        vectors: [n, dim] real array (normalised embeddings, for cosine scores).
        dtype: "int8", "fp16" or "float32".
        rerank: keep an exact copy to re-score the best candidates of the first pass with.
            Default: on for int8, off otherwise (float32 needs none).
        rerank_dtype: "float32" (exact scores) or "fp16" (half the memory).
        threads: threads for quantisation (0: all cores).
        copy: False keeps a reference to `vectors` instead of a copy where float32 rows are
            stored (dtype float32, or the float32 re-rank copy), when `vectors` is already
            C-contiguous float32. The caller must then not modify it.
    """

    def __init__(self, vectors: np.ndarray, dtype: str = "int8", rerank: bool | None = None,
                 rerank_dtype: str = "float32", *, threads: int = 0, copy: bool = True):
        dtype = _check_dtype(dtype, "dtype")
        rerank_dtype = _check_dtype(rerank_dtype, "rerank_dtype")
        if rerank_dtype == "int8":
            raise KernelInputError("rerank_dtype must be 'float32' or 'fp16'")
        if rerank is None:
            rerank = dtype == "int8"
        if rerank and dtype == "float32":
            raise KernelInputError("a float32 gallery is already exact: use rerank=False")
        x = float_rows(vectors, "gallery vectors")
        bad = first_non_finite_row(x)
        if bad is not None:
            raise KernelInputError(f"gallery vectors contain NaN or Inf (first at row {bad})")
        n, dim = x.shape
        arrays: dict[str, np.ndarray] = {}
        if dtype == "int8":
            codes = np.empty((n, dim), dtype=np.int8)
            scales = np.zeros(num_groups(n) * GROUP_ROWS, dtype=np.float32)
            _native.quantize_int8(x, codes, scales, _threads(threads))
            packed = aligned_empty((num_groups(n), padded_dim(dim) * GROUP_ROWS), np.int8)
            corrections = np.empty(num_groups(n) * GROUP_ROWS, dtype=np.int32)
            _native.pack_int8(codes, packed, corrections, _threads(threads))
            arrays.update(codes=packed, scales=scales, corrections=corrections)
        elif dtype == "fp16":
            arrays["vectors"] = _to_fp16(x, "gallery vectors")
        else:
            arrays["vectors"] = _aligned_copy(x) if copy else x
        if rerank:
            if rerank_dtype == "float32":
                arrays["rerank"] = _aligned_copy(x) if copy else x
            else:
                arrays["rerank"] = _to_fp16(x, "re-rank copy")
        self._init(dtype, n, dim, arrays, rerank_dtype if rerank else None)

    @classmethod
    def from_int8(cls, codes: np.ndarray, scales: np.ndarray, rerank: np.ndarray | None = None,
                  *, threads: int = 0) -> "Gallery":
        """An int8 gallery from codes already quantised elsewhere (e.g. an index segment):
        codes int8 [n, dim] in [-127, 127] (row i ~= codes[i] * scales[i]), scales float32 [n],
        and optionally the exact rows (float32 or float16 [n, dim]) for the re-rank."""
        codes = np.ascontiguousarray(codes)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] == 0:
            raise KernelInputError(f"codes must be int8 [n, dim], got {codes.dtype} {codes.shape}")
        if (codes == -128).any():
            raise KernelInputError("codes must lie in [-127, 127] (symmetric quantisation)")
        n, dim = codes.shape
        if scales.shape != (n,) or not np.isfinite(scales).all():
            raise KernelInputError(f"scales must be {n} finite float32 values, got shape {scales.shape}")
        padded_scales = np.zeros(num_groups(n) * GROUP_ROWS, dtype=np.float32)
        padded_scales[:n] = scales
        packed = aligned_empty((num_groups(n), padded_dim(dim) * GROUP_ROWS), np.int8)
        corrections = np.empty(num_groups(n) * GROUP_ROWS, dtype=np.int32)
        _native.pack_int8(codes, packed, corrections, _threads(threads))
        arrays = {"codes": packed, "scales": padded_scales, "corrections": corrections}
        rerank_dtype = None
        if rerank is not None:
            r = np.asarray(rerank)
            if r.shape != (n, dim) or r.dtype not in (np.float32, np.float16):
                raise KernelInputError(
                    f"rerank must be float32 or float16 [{n}, {dim}], got {r.dtype} {r.shape}")
            arrays["rerank"] = _aligned_copy(r)
            rerank_dtype = "float32" if r.dtype == np.float32 else "fp16"
        g = cls.__new__(cls)
        g._init("int8", n, dim, arrays, rerank_dtype)
        return g

    def _init(self, dtype: str, n: int, dim: int, arrays: dict[str, np.ndarray],
              rerank_dtype: str | None) -> None:
        self._dtype, self._n, self._dim = dtype, n, dim
        self._arrays = arrays
        self._rerank_dtype = rerank_dtype

    # -- what it holds --------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._dim)

    def __len__(self) -> int:
        return self._n

    @property
    def rerank_dtype(self) -> str | None:
        """dtype of the exact re-rank copy, or None when there is none."""
        return self._rerank_dtype

    @property
    def rerank_vectors(self) -> np.ndarray | None:
        """The exact re-rank copy [n, dim] (float32 or float16, read-only when memory-mapped),
        or None. Lets a caller rebuild or merge galleries without quantising twice."""
        arr = self._arrays.get("rerank")
        return None if arr is None else arr.reshape(self._n, self._dim)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self._arrays.values())

    @property
    def scales(self) -> np.ndarray:
        """int8 only: the per-row scales [n]."""
        self._require_int8("scales")
        return self._arrays["scales"][: self._n]

    def codes(self) -> np.ndarray:
        """int8 only: the codes as row-major int8 [n, dim] (a copy, out of the grouped layout)."""
        self._require_int8("codes")
        out = np.empty((self._n, self._dim), dtype=np.int8)
        _native.unpack_int8(self._arrays["codes"], self._n, self._dim, out)
        return out

    def decode(self) -> np.ndarray:
        """The stored vectors as float32 [n, dim] (dequantised for int8): what the first pass
        scores against."""
        if self._dtype == "int8":
            return self.codes().astype(np.float32) * self.scales[:, None]
        return np.asarray(self._arrays["vectors"]).view(
            np.float16 if self._dtype == "fp16" else np.float32).astype(np.float32)

    def __repr__(self) -> str:
        rerank = f", rerank={self._rerank_dtype}" if self._rerank_dtype else ""
        return (f"Gallery(n={self._n}, dim={self._dim}, dtype={self._dtype}{rerank}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    def _require_int8(self, what: str) -> None:
        if self._dtype != "int8":
            raise KernelInputError(f"{what} exist only for int8 galleries (this one is {self._dtype})")

    def _native_args(self) -> dict:
        """Arguments of _native.topk describing this gallery."""
        a = self._arrays
        vectors = a["codes"] if self._dtype == "int8" else a["vectors"]
        rerank = a.get("rerank")
        return dict(
            vectors=_raw(vectors), dtype=self._dtype, num_vectors=self._n,
            scales=a.get("scales"), corrections=a.get("corrections"),
            rerank=None if rerank is None else _raw(rerank),
            rerank_dtype=self._rerank_dtype or "float32")

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the gallery to one file, atomically (temp file, fsync, rename)."""
        path = Path(path)
        arrays = {name: np.ascontiguousarray(a) for name, a in self._arrays.items()}
        crcs = {name: zlib.crc32(_bytes(a)) for name, a in arrays.items()}
        data_start = _ALIGN
        while True:  # the header's own length moves the offsets: grow until it fits
            entries, offset = {}, data_start
            for name, arr in arrays.items():
                entries[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                                 "offset": offset, "nbytes": int(arr.nbytes),
                                 "crc32": crcs[name]}
                offset = _align(offset + arr.nbytes)
            header = {"format": "clapedge.gallery", "version": FORMAT_VERSION,
                      "dtype": self._dtype, "n": self._n, "dim": self._dim,
                      "layout": INT8_LAYOUT if self._dtype == "int8" else "rows",
                      "rerank_dtype": self._rerank_dtype, "arrays": entries}
            need = _align(16 + len(json.dumps(header, sort_keys=True).encode()))
            if need <= data_start:
                break
            data_start = need
        blob = json.dumps(header, sort_keys=True).encode()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(blob)) + blob)
            for name, arr in arrays.items():
                f.write(b"\0" * (entries[name]["offset"] - f.tell()))
                f.write(_bytes(arr))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = False) -> "Gallery":
        """Opens a saved gallery. mmap=True maps the arrays read-only (no copy, no read until
        searched); verify=True also checks every array's CRC-32 (reads the whole file)."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16 or head[:8] != MAGIC:
                    raise GalleryFileError(f"{path} is not a clapedge gallery file")
                version, hlen = struct.unpack("<II", head[8:])
                if version != FORMAT_VERSION:
                    raise GalleryFileError(
                        f"{path} has gallery format version {version}; this clapedge reads "
                        f"version {FORMAT_VERSION} (upgrade clapedge or rebuild the gallery)")
                header = json.loads(f.read(hlen).decode())
        except OSError as e:
            raise GalleryFileError(f"cannot read gallery {path}: {e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise GalleryFileError(f"{path}: the gallery header is corrupt") from None
        dtype, n, dim = header["dtype"], int(header["n"]), int(header["dim"])
        rerank_dtype = header.get("rerank_dtype")
        if dtype not in DTYPES or rerank_dtype not in (None, "float32", "fp16"):
            raise GalleryFileError(f"{path}: the gallery header names dtype {dtype!r}, "
                                   f"rerank_dtype {rerank_dtype!r}; the file is corrupt")
        arrays = {}
        for name, e in header["arrays"].items():
            if e["offset"] + e["nbytes"] > size:
                raise GalleryFileError(f"{path} is truncated (array {name!r} runs past the end)")
            try:  # numpy parses some dtype strings as Python literals: any error is corruption
                shape, adt = tuple(e["shape"]), np.dtype(e["dtype"])
            except (TypeError, ValueError, SyntaxError):
                raise GalleryFileError(f"{path}: array {name!r} has dtype {e['dtype']!r}; the "
                                       f"gallery header is corrupt") from None
            # each array has one dtype (a hostile header could ask for object or void
            # elements, which the kernel must never see) and exactly its bytes
            want = _array_dtype(name, dtype, rerank_dtype)
            if want is None or adt != want or any(not isinstance(d, int) or d < 0
                                                  for d in shape) \
                    or math.prod(shape) * adt.itemsize != e["nbytes"]:
                raise GalleryFileError(f"{path}: array {name!r} is {e['dtype']} {list(shape)} "
                                       f"in {e['nbytes']} bytes; the gallery header is corrupt")
            if e["nbytes"] == 0:
                arr = np.empty(shape, dtype=adt)
            elif mmap:
                arr = np.memmap(path, dtype=adt, mode="r", offset=e["offset"], shape=shape)
            else:
                arr = np.fromfile(path, dtype=adt, count=int(np.prod(shape)), offset=e["offset"])
                arr = arr.reshape(shape)
            if verify and zlib.crc32(_bytes(arr)) != e["crc32"]:
                raise GalleryFileError(f"{path}: array {name!r} fails its checksum (corrupt file)")
            arrays[name] = arr
        g = cls.__new__(cls)
        g._init(dtype, n, dim, arrays, rerank_dtype)
        g._check_shapes(path)
        return g

    def _check_shapes(self, where) -> None:
        a, n, dim = self._arrays, self._n, self._dim
        want = {"rerank": n * dim}
        if self._dtype == "int8":
            want.update(codes=num_groups(n) * padded_dim(dim) * GROUP_ROWS,
                        scales=num_groups(n) * GROUP_ROWS, corrections=num_groups(n) * GROUP_ROWS)
        else:
            want["vectors"] = n * dim
        for name, size in want.items():
            if name == "rerank" and self._rerank_dtype is None:
                continue  # no re-rank copy named (and _array_dtype refuses an unnamed one)
            if name not in a:
                raise GalleryFileError(f"{where}: array {name!r} is missing (the header names "
                                       f"it); the file is corrupt")
            if a[name].size != size:
                raise GalleryFileError(f"{where}: array {name!r} does not match {n} x {dim}")


def _array_dtype(name: str, dtype: str, rerank_dtype: str | None) -> np.dtype | None:
    """The element type a saved array must have (None: not an array of this gallery)."""
    fp = {"float32": np.dtype("<f4"), "fp16": np.dtype("<f2")}
    return {"codes": np.dtype("i1") if dtype == "int8" else None,
            "scales": np.dtype("<f4") if dtype == "int8" else None,
            "corrections": np.dtype("<i4") if dtype == "int8" else None,
            "vectors": fp.get(dtype),
            "rerank": fp.get(rerank_dtype) if rerank_dtype else None}.get(name)


def _check_dtype(dtype: str, what: str) -> str:
    d = {"float16": "fp16", "half": "fp16", "f32": "float32"}.get(str(dtype), str(dtype))
    if d not in DTYPES:
        raise KernelInputError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return d


def aligned_empty(shape: tuple[int, ...], dtype, align: int = _ALIGN) -> np.ndarray:
    """np.empty whose data starts on an `align`-byte boundary: 64-byte SIMD loads then never
    straddle two cache lines (numpy's own allocations are only 16-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _aligned_copy(x: np.ndarray) -> np.ndarray:
    out = aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out


def _to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    big = np.abs(x).max(initial=0.0)
    if big > 65504.0:
        raise KernelInputError(f"{what}: values up to {big:g} overflow float16 (max 65504)")
    out = aligned_empty(x.shape, np.float16)
    out[...] = x
    return out


def _raw(arr: np.ndarray) -> np.ndarray:
    """float16 crosses into C++ as its raw uint16 bits."""
    return arr.view(np.uint16) if arr.dtype == np.float16 else arr


def _bytes(arr: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array (any shape, empty included), without a copy."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _align(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN
