"""Fuzzing the parsers of untrusted input: only clapedge's typed errors may escape.

    python -m clapedge.bench.fuzz [--seconds 60] [--targets audio,manifest,...]
                                  [--engine auto|atheris|hypothesis] [--json] [--keep DIR]

Targets (each takes the fuzzer's bytes; the first byte picks a mode):

- ``audio``: ``runtime/audio.py``'s decoder entry: the bytes as a file (``stream_audio``
  and ``load_audio``), or as a numpy array (dtype, channels and rate read from the first
  bytes), cut into the clip policy's segments (``SegmentStream``); outputs must be finite.
- ``manifest``: ``Manifest.from_json`` on the raw bytes, or on a valid manifest with fields
  replaced, deleted or added (structure-aware); a manifest that parses must survive
  ``to_json`` and parse back equal.
- ``segment``: ``runtime/segment.py``'s reader (``open_segment(verify="full")``): raw
  ``segment.bin`` bytes, a valid one whose header fields are replaced (checksum recomputed,
  so the fuzzer gets past it), or ``gallery.bin`` with fuzzed bytes or JSON header fields
  under a consistent segment header; a segment that opens is searched with the native
  top-k kernel.
- ``tokenizer``: ``TextTokenizer.encode`` with arbitrary Unicode (lone surrogates, control
  characters, any code point) and huge texts; ids must respect ``max_length``.
- ``onnx``: the bundle's ONNX check (``Bundle._check_model``: protobuf scan, external-data
  paths, offsets and lengths, sparse tensors) on raw bytes or on a model whose external-data
  location, offset and length come from the fuzzer.

A ``ClapEdgeError`` is the expected answer to bad input. Any other exception, a failed
invariant, an input that runs longer than ``--timeout`` seconds (a hang), a crash of the
process (a native fault) or memory past ``--rss-limit-mb`` is a finding, reported with its
input saved under ``--keep``.

Engines: ``atheris`` (coverage-guided libFuzzer; the clapedge modules on the way are
instrumented) runs each target in a child process, so a hang or a native crash is caught and
reported, and the child restarted for the rest of the time; ``hypothesis`` (random and
mutated seed inputs, in process) is the fallback where atheris is not installed (it has
wheels for Linux x86-64 only). ``auto`` picks atheris when it imports.

The test suite runs each target for a couple of seconds (tests/test_fuzz.py); this script
runs them as long as asked and prints iterations and findings.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from clapedge.errors import ClapEdgeError
from clapedge.subproc import fresh

TARGETS = ("audio", "manifest", "segment", "tokenizer", "onnx", "frontend")
_SELFTESTS = ("selftest_crash", "selftest_exception", "selftest_hang")
# Modules whose code the targets run: instrumented for atheris' coverage feedback.
_MODULES = ("clapedge.runtime.audio", "clapedge.runtime.manifest", "clapedge.runtime.segment",
            "clapedge.runtime.tokenizer", "clapedge.runtime.onnx_external",
            "clapedge.runtime.bundle", "clapedge.runtime.checksums", "clapedge.kernels.gallery",
            "clapedge.kernels.topk", "clapedge.kernels.frontend")
MAX_LEN = 1 << 14
RATE = 16000


class Invariant(AssertionError):
    """A target's output broke a property it must have (a finding)."""


@dataclass
class Finding:
    target: str
    kind: str  # exception | invariant | timeout | crash | oom
    signature: str
    message: str
    input_file: str | None = None


@dataclass
class TargetResult:
    target: str
    engine: str
    seconds: float
    iterations: int
    findings: list[Finding] = field(default_factory=list)
    coverage: int | None = None  # atheris: edges covered at the end
    restarts: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- fixtures

def _wav(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(n: int, channels: int = 1) -> np.ndarray:
    x = 0.3 * np.sin(np.arange(n) * 0.07)
    return x if channels == 1 else np.stack([x] * channels, 1)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(number: int, value) -> bytes:
    """One protobuf field: an int (varint) or bytes/str (length-delimited)."""
    if isinstance(value, int):
        return _pb_varint(number << 3) + _pb_varint(value)
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    return _pb_varint(number << 3 | 2) + _pb_varint(len(value)) + value


def external_model(location: str, offset: str | None = "0", length: str | None = "64",
                   n: int = 16) -> bytes:
    """A ModelProto (hand-encoded; no ``onnx`` needed) whose one initializer keeps its
    ``n`` floats in external data at ``location``."""
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", offset))
    if length is not None:
        entries.append(("length", length))
    tensor = _pb(1, n) + _pb(2, 1) + _pb(8, "w") + b"".join(
        _pb(13, _pb(1, k) + _pb(2, v)) for k, v in entries) + _pb(14, 1)
    node = _pb(1, "w") + _pb(2, "y") + _pb(4, "Identity")
    graph = _pb(1, node) + _pb(2, "g") + _pb(5, tensor)
    return _pb(1, 8) + _pb(7, graph) + _pb(8, _pb(2, 17))


class Harness:
    """The targets and the fixtures they need, built once in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike):
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self._tokenizer_cache = None
        self._segment_cache = None
        self._bundle_cache = None
        from clapedge.runtime.manifest import ClipPolicy

        # small windows, so that short fuzz inputs reach the windowed path
        self.clip = ClipPolicy(min_seconds=0.01, max_seconds=0.05, window_seconds=0.04,
                               hop_seconds=0.015)

    def run(self, target: str, data: bytes) -> None:
        getattr(self, f"_{target}")(data)

    # -- the harness's own check (tests/test_fuzz.py): each kind of finding is reported

    def _selftest_crash(self, data: bytes) -> None:
        if data.startswith(b"X"):
            raise KeyError("an unexpected exception")
        if data.startswith(b"S"):
            import ctypes

            ctypes.string_at(0)  # a native fault (SIGSEGV)

    _selftest_exception = _selftest_crash

    def _selftest_hang(self, data: bytes) -> None:
        if data.startswith(b"H"):
            time.sleep(60)

    # -- audio

    def _audio(self, data: bytes) -> None:
        from clapedge.runtime.audio import load_audio, stream_audio

        mode, body = (data[0] % 3, data[1:]) if data else (0, b"")
        if mode == 1:
            source, rate = self._array(body)
            if source is None:
                return
            self._consume(stream_audio(source, rate, target_rate=RATE))
            return
        path = self.work / "input.audio"
        path.write_bytes(body)
        if mode == 0:
            self._consume(stream_audio(path, target_rate=RATE))
        else:
            y = load_audio(path, target_rate=RATE)
            if y.dtype != np.float32 or y.ndim != 1 or not len(y) or \
                    not np.isfinite(y).all():
                raise Invariant(f"load_audio returned {y.dtype} {y.shape}, finite: "
                                f"{bool(np.isfinite(y).all())}")

    _DTYPES = ("int16", "int32", "float32", "float64", "int8", "uint8", "float16",
               "complex64", "bool", "int64")
    _RATES = (8000, 16000, 22050, 44100, 48000, 96000, 192000, 1000, 768000, 999, 768001, 0)

    def _array(self, body: bytes):
        if len(body) < 7:
            return None, None
        dtype = np.dtype(self._DTYPES[body[0] % len(self._DTYPES)])
        channels = body[1] % 10  # 0: a 1-D array
        rate: object = self._RATES[body[2] % len(self._RATES)] if body[3] & 1 else \
            int.from_bytes(body[3:7], "little")
        if body[3] & 2 == 2 and body[3] & 1:
            rate = None if body[2] & 4 else float(rate)  # no rate, or a float one
        raw = body[7:]
        arr = np.frombuffer(raw[:len(raw) // dtype.itemsize * dtype.itemsize], dtype=dtype)
        if channels:
            arr = arr[:len(arr) // channels * channels].reshape(-1, channels)
            if body[1] & 0x80:
                arr = arr.T  # [channels, samples]: must be refused, not misread
        return arr, rate

    def _consume(self, chunks: Iterator[np.ndarray]) -> None:
        from clapedge.runtime.audio import SegmentStream, seconds_to_samples

        stream = SegmentStream(chunks, RATE, self.clip)
        head = stream.head()
        pieces = [head] if head is not None else list(stream.windows())
        window = seconds_to_samples(self.clip.window_seconds, RATE)
        for piece in pieces:
            if piece.dtype != np.float32 or not np.isfinite(piece).all():
                raise Invariant(f"a segment is {piece.dtype}, finite: "
                                f"{bool(np.isfinite(piece).all())}")
            if head is None and len(piece) != window:
                raise Invariant(f"a window of {len(piece)} samples, expected {window}")
        if stream.n == 0:
            raise Invariant("a signal without samples was accepted")

    # -- manifest

    def _manifest(self, data: bytes) -> None:
        from clapedge.runtime.manifest import Manifest

        mode, body = (data[0] % 2, data[1:]) if data else (0, b"")
        text = body if mode == 0 else json.dumps(
            _mutate_json(json.loads(seed_manifest()), body), allow_nan=True)
        m = Manifest.from_json(text, source="fuzz/manifest.json")
        again = Manifest.from_json(m.to_json(), source="fuzz/manifest.json")
        if again != m:
            raise Invariant("a manifest does not parse back equal after to_json")
        m.files()

    # -- segment

    def _segment_seed(self):
        if self._segment_cache is None:
            from clapedge.runtime.segment import write_segment

            parent = self.work / "seeds"
            parent.mkdir(exist_ok=True)
            rng = np.random.default_rng(0)
            seeds = []
            for i, (dtype, rerank) in enumerate((("int8", "float32"), ("fp16", None),
                                                 ("float32", None), ("int8", None))):
                vectors = rng.standard_normal((5 + i, 8)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                seg = write_segment(parent, f"seg-{i:06d}", np.arange(1, 6 + i) * 3, vectors,
                                    dtype=dtype, rerank_dtype=rerank,
                                    bundle_sha256="0" * 64, durable=False)
                seeds.append(((seg.path / "segment.bin").read_bytes(),
                              (seg.path / "gallery.bin").read_bytes()))
            self._segment_cache = seeds
        return self._segment_cache

    def _segment(self, data: bytes) -> None:
        from clapedge.kernels import topk
        from clapedge.runtime.segment import MAGIC, SEGMENT_FILE, open_segment

        seeds = self._segment_seed()
        mode, body = (data[0] % 4, data[1:]) if data else (0, b"")
        seg_bin, gallery = seeds[(data[1] if len(data) > 1 else 0) % len(seeds)]
        directory = self.work / "seg-000009"
        directory.mkdir(exist_ok=True)
        if mode == 0:
            seg_bin = body
        elif mode == 1:
            hlen = struct.unpack("<I", seg_bin[12:16])[0]
            header = _mutate_json(json.loads(seg_bin[16:16 + hlen]), body[1:])
            if isinstance(header, dict):
                header["name"] = directory.name
            seg_bin = _segment_file(header, seg_bin, MAGIC)
        else:
            if mode == 2:
                gallery = _splice(gallery, body[1:])
            else:  # the gallery's JSON header, edited field by field, its data kept in place
                glen = struct.unpack("<I", gallery[12:16])[0]
                blob = json.dumps(_mutate_json(json.loads(gallery[16:16 + glen]), body[1:]),
                                  allow_nan=True).encode()
                blob += b" " * max(0, glen - len(blob))
                gallery = gallery[:8] + struct.pack("<II", 1, len(blob)) + blob + \
                    gallery[16 + glen:]
            hlen = struct.unpack("<I", seg_bin[12:16])[0]
            header = json.loads(seg_bin[16:16 + hlen])
            head = 16 + struct.unpack("<I", gallery[12:16])[0] if len(gallery) >= 16 else 0
            head = min(head, len(gallery))
            header["name"] = directory.name
            header["gallery"].update(size=len(gallery), crc32=zlib.crc32(gallery),
                                     head_nbytes=head, head_crc32=zlib.crc32(gallery[:head]))
            seg_bin = _segment_file(header, seg_bin, MAGIC)
        (directory / SEGMENT_FILE).write_bytes(seg_bin)
        (directory / "gallery.bin").write_bytes(gallery)
        seg = open_segment(directory, verify="full")
        if len(seg) and seg.header.dim:
            q = np.ones((1, seg.header.dim), np.float32)
            scores, rows = topk(q, seg.gallery, min(3, len(seg)))
            if rows.shape != (1, min(3, len(seg))) or ((rows < 0) | (rows >= len(seg))).any():
                raise Invariant(f"top-k rows {rows} out of range for {len(seg)} rows")
            seg.exact_vectors()

    # -- tokenizer

    def _tokenizer_obj(self):
        if self._tokenizer_cache is None:
            from clapedge.runtime.manifest import TokenizerSpec
            from clapedge.runtime.tokenizer import TextTokenizer

            spec = TokenizerSpec("tokenizer.json", "0" * 64, max_length=32, pad_id=0)
            self._tokenizer_cache = TextTokenizer(tokenizer_json(), spec, "fuzz/tokenizer.json")
        return self._tokenizer_cache

    def _tokenizer(self, data: bytes) -> None:
        tok = self._tokenizer_obj()
        mode, body = (data[0] % 4, data[1:]) if data else (0, b"")
        if mode == 0:
            text = body.decode("utf-8", errors="replace")
        elif mode == 1:
            text = body.decode("utf-8", errors="surrogateescape")  # lone surrogates
        elif mode == 2:
            text = body[:len(body) // 4 * 4].decode("utf-32-le", errors="replace") + \
                body[:len(body) // 2 * 2].decode("utf-16-le", errors="surrogatepass")
        else:
            unit = body[1:].decode("utf-8", errors="replace") or "a"
            text = unit * min(1 + (body[0] if body else 0) * 997, 4_000_000 // len(unit))
        ids = tok.encode([text, text[:7]])
        if any(len(x) > tok.spec.max_length for x in ids):
            raise Invariant(f"{max(map(len, ids))} ids, more than max_length "
                            f"{tok.spec.max_length}")
        if all(ids):
            input_ids, mask = tok.pad_batch(ids)
            if input_ids.shape != mask.shape or mask.sum() != sum(map(len, ids)):
                raise Invariant("pad_batch shapes or mask disagree with the ids")

    # -- onnx

    _LOCATIONS = ("w.data", "../w.data", "/etc/passwd", "sub/../w.data", "w.data\0x", "",
                  "outside.data", "sub", "./w.data", "w.data/", "C:\\w.data", "\\\\s\\w",
                  "x" * 300, "sub/inner.data", "%2e%2e/w.data", "w.data\n", "listed-missing",
                  "ñ.data")

    def _onnx_bundle(self):
        if self._bundle_cache is None:
            from clapedge.runtime import Bundle
            from clapedge.runtime.manifest import (ClipPolicy, FileRef, Manifest, ModelInfo,
                                                   TensorSpec, TowerSpec, Towers, sha256_file,
                                                   write_manifest)

            root = self.work / "onnx-bundle"
            (root / "sub").mkdir(parents=True, exist_ok=True)
            (root / "w.data").write_bytes(bytes(64))
            (root / "sub" / "inner.data").write_bytes(bytes(128))
            outside = self.work / "secret.data"
            outside.write_bytes(b"secret" * 20)
            if not (root / "outside.data").is_symlink():
                (root / "outside.data").symlink_to(outside)
            (root / "audio.onnx").write_bytes(external_model("w.data"))
            refs = [FileRef(rel, sha256_file(root / rel), (root / rel).stat().st_size)
                    for rel in ("w.data", "sub/inner.data")]
            refs.append(FileRef("listed-missing", "0" * 64))
            refs.append(FileRef("outside.data", sha256_file(outside)))
            audio = TowerSpec("audio.onnx", sha256_file(root / "audio.onnx"), "fp32",
                              [TensorSpec("waveform", "float32", ("batch", "samples"))],
                              [TensorSpec("embedding", "float32", ("batch", 8))],
                              external_data=refs)
            write_manifest(root, Manifest(
                sample_rate=RATE, embed_dim=8, logit_scale=10.0,
                clip=ClipPolicy(0.5, 3.0, 2.0, 1.0), towers=Towers(audio=audio),
                model=ModelInfo("fuzz")))
            self._bundle_cache = Bundle.load(root, providers="cpu", preload=())
        return self._bundle_cache

    def _onnx(self, data: bytes) -> None:
        bundle = self._onnx_bundle()
        spec = bundle.manifest.towers.audio
        mode, body = (data[0] % 2, data[1:]) if data else (0, b"")
        if mode == 0:
            model = body
        else:
            b = body + bytes(max(0, 20 - len(body)))
            location = self._LOCATIONS[b[0] % len(self._LOCATIONS)] if b[1] & 1 else \
                b[4:4 + b[2] % 16].decode("utf-8", errors="replace")
            offset = str(int.from_bytes(b[4:12], "little") >> (b[3] % 64)) if b[1] & 2 else \
                (None if b[1] & 4 else b[12:16].decode("latin-1"))
            length = str(int.from_bytes(b[12:20], "little") >> (b[2] % 64)) if b[1] & 8 else \
                (None if b[1] & 16 else "64")
            model = external_model(location, offset, length, n=1 + b[3] % 64)
        bundle._check_model(bundle.root / "audio.onnx", model, spec)


    # -- native front end files (audio_frontend.native.npz)

    def _frontend_seed(self) -> bytes:
        if getattr(self, "_frontend_cache", None) is None:
            from clapedge.kernels.frontend import NativeFrontEnd

            rng = np.random.default_rng(0)
            layers = [dict(kernel=10, stride=5, cin=1, cout=16, norm="group",
                           weight=rng.standard_normal((10, 16)).astype(np.float32),
                           norm_weight=np.ones(16, np.float32), norm_bias=np.zeros(16, np.float32)),
                      dict(kernel=3, stride=2, cin=16, cout=16, norm="layer",
                           weight=rng.integers(-127, 128, (48, 16)).astype(np.int8),
                           weight_scale=np.full(16, 0.01, np.float32),
                           bias=np.zeros(16, np.float32))]
            proj = dict(din=16, dout=32, layer_norm=True,
                        weight=rng.integers(-127, 128, (16, 32)).astype(np.int8),
                        weight_scale=np.full(32, 0.02, np.float32), bias=np.zeros(32, np.float32))
            path = self.work / "frontend-seed.npz"
            NativeFrontEnd(layers, proj).save(path)
            self._frontend_cache = path.read_bytes()
        return self._frontend_cache

    def _frontend(self, data: bytes) -> None:
        """A native front-end file, raw or with its JSON record mutated or bytes spliced:
        loading it is a FrontEndFileError or a front end that runs on a short clip."""
        import io

        from clapedge.kernels.frontend import NativeFrontEnd

        mode, body = (data[0] % 3, data[1:]) if data else (0, b"")
        seed = self._frontend_seed()
        if mode == 0:
            blob = body
        elif mode == 1:
            with np.load(io.BytesIO(seed), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = _mutate_json(json.loads(bytes(arrays["meta"]).decode()), body)
            arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), np.uint8)
            out = io.BytesIO()
            np.savez(out, **arrays)
            blob = out.getvalue()
        else:
            blob = _splice(seed, body)
        front = NativeFrontEnd.load(self.work / "fuzz.npz", blob)  # or FrontEndFileError
        wave = np.sin(np.arange(4000, dtype=np.float32) / 7.0)
        out = front(wave, threads=1)  # or KernelInputError (a clip too short for the stack)
        if out.shape != (front.frames(4000), front.out_channels):
            raise Invariant(f"front end output {out.shape} is not [frames, channels]")


def _splice(seed: bytes, edits: bytes) -> bytes:
    """The seed with the fuzzer's edits: (position, byte) pairs and a truncation."""
    out = bytearray(seed)
    if edits and edits[0] & 1:
        out = out[:int.from_bytes(edits[:2], "little") % (len(out) + 1)]
    for i in range(2, len(edits) - 2, 3):
        if out:
            out[int.from_bytes(edits[i:i + 2], "little") % len(out)] = edits[i + 2]
    return bytes(out)


def _segment_file(header, old: bytes, magic: bytes) -> bytes:
    """A segment.bin with ``header`` (checksum recomputed) and the ids of ``old``."""
    blob = json.dumps(header, sort_keys=True, allow_nan=True).encode()
    hlen_old = struct.unpack("<I", old[12:16])[0]
    ids = old[_align(20 + hlen_old):]
    head = magic + struct.pack("<II", 1, len(blob)) + blob
    head += struct.pack("<I", zlib.crc32(head))
    offset = header.get("ids", {}).get("offset") if isinstance(header, dict) and \
        isinstance(header.get("ids"), dict) else None
    if not isinstance(offset, int) or isinstance(offset, bool) or \
            not len(head) <= offset <= len(head) + 4096:
        offset = _align(len(head))
    return head + bytes(offset - len(head)) + ids


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


_PALETTE = (None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, 0.5, -0.0,
            1e308, float("nan"), float("inf"), "", "x", "../x", "/etc/passwd", "a" * 64,
            "0" * 64, "1.0", "2.0", "1.99", "float32", "int64", "batch", "fp16", "int8",
            "|V3", "O", "<i8", ">f4", "<f2", "|i1", "<U5", "|b1", [2 ** 40], [-1, 8], [3, 0],
            [], [1], [1.5],
            ["a"], [None], {}, {"a": 1}, {"x": [1, 2]}, [[1]], "\ud800", "\0")


def _mutate_json(tree, data: bytes):
    """Up to 8 edits of a JSON tree steered by ``data``: replace a node with a palette
    value or a fragment of another node, delete it, or add an unknown key."""
    pos = 0

    def byte() -> int:
        nonlocal pos
        pos += 1
        return data[pos - 1] if pos <= len(data) else 0

    for _ in range(min(8, len(data) // 4)):
        parent, key, node = None, None, tree
        while isinstance(node, (dict, list)) and node and byte() % 4:
            keys = sorted(node) if isinstance(node, dict) else range(len(node))
            keys = list(keys)
            key = keys[byte() % len(keys)]
            parent, node = node, node[key]
        action = byte() % 5
        value = copy.deepcopy(_PALETTE[byte() % len(_PALETTE)])
        if parent is None:
            if action == 0:
                tree = value
            continue
        if action in (0, 1):
            parent[key] = value
        elif action == 2:
            del parent[key]
        elif action == 3 and isinstance(parent, dict):
            parent[f"k{byte()}"] = value
        elif action == 4:
            parent[key] = copy.deepcopy(tree if byte() % 8 == 0 else [node, node])
    return tree


def seed_manifest() -> str:
    """A valid manifest that uses every field (the structure-aware mode's starting point)."""
    from clapedge.runtime.manifest import (ClipPolicy, EngineSpec, FileRef, LabelBank, Manifest,
                                           ModelInfo, ShapeRange, TensorSpec, TokenizerSpec,
                                           TowerSpec, Towers)

    sha = "ab" * 32
    audio_in = [TensorSpec("waveform", "float32", ("batch", "samples")),
                TensorSpec("attention_mask", "int64", ("batch", "samples"))]
    audio = TowerSpec("audio.onnx", sha, "int8", audio_in,
                      [TensorSpec("embedding", "float32", ("batch", 8)),
                       TensorSpec("head_sex", "float32", ("batch", 2))],
                      heads={"sex": ("female", "male")},
                      external_data=[FileRef("audio.onnx.data", sha, 64)], size=100)
    text = TowerSpec("text.onnx", sha, "fp32",
                     [TensorSpec("input_ids", "int64", ("batch", "tokens")),
                      TensorSpec("attention_mask", "int64", ("batch", "tokens"))],
                     [TensorSpec("embedding", "float32", ("batch", 8))])
    tagger = TowerSpec("tagger.onnx", sha, "int8", audio_in,
                       [TensorSpec("scores", "float32", ("batch", 2)),
                        TensorSpec("indices", "int64", ("batch", 2))], bank="emotion", k=2)
    banks = {"emotion": LabelBank(("calm", "angry", "sad"), "banks/emotion.npy", sha,
                                  prompts={x: (f"a {x} voice",) for x in ("calm", "angry", "sad")}),
             "style": LabelBank(("fast", "slow"), "banks/style.npy", sha, multi_label=True,
                                thresholds={"fast": 0.1, "slow": 0.2}),
             "arousal": LabelBank(("low", "high"), "banks/arousal.npy", sha, kind="ordinal",
                                  values={"low": 0.0, "high": 1.0}, size=256)}
    engine = EngineSpec("audio.plan", sha, "audio", "10.0", "H100", profiles=[
        {"waveform": ShapeRange((1, 16000), (1, 80000), (4, 160000))}])
    return Manifest(sample_rate=RATE, embed_dim=8, logit_scale=14.3,
                    clip=ClipPolicy(1.0, 10.0, 4.0, 2.0, 0.5),
                    towers=Towers(audio=audio, text=text, tagger=tagger),
                    model=ModelInfo("fuzz", sha, {"note": "seed"}),
                    tokenizer=TokenizerSpec("tokenizer.json", sha, 32, 0, 1000), banks=banks,
                    default_bank="emotion", calibration={"method": "entropy"},
                    quality={"cosine": 0.99}, engines=[engine]).to_json()


def tokenizer_json() -> bytes:
    """The default model's tokenizer when the source tree has it (a real BERT WordPiece
    vocabulary), else a small WordPiece tokenizer with BERT's normaliser and splitter."""
    import clapedge.models

    real = Path(clapedge.models.__file__).parent / "default" / "tokenizer.json"
    if real.is_file():
        return real.read_bytes()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in ("a", "calm", "voice", "low", "high", "##er", "##ly", "speak", "##ing", "é", "中"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str().encode()


def seeds(target: str, harness: Harness) -> list[bytes]:
    """Valid (and a few borderline) inputs to start from."""
    if target == "audio":
        out = []
        for i, (rate, ch, fmt, sub) in enumerate((
                (8000, 1, "WAV", "PCM_16"), (16000, 2, "WAV", "PCM_U8"),
                (11025, 1, "WAV", "FLOAT"), (8000, 3, "WAV", "PCM_24"),
                (16000, 1, "FLAC", "PCM_16"), (16000, 1, "OGG", "VORBIS"),
                (16000, 1, "MP3", "MPEG_LAYER_III"), (8000, 1, "AIFF", "PCM_16"),
                (8000, 1, "AU", "ULAW"), (8000, 2, "WAV", "DOUBLE"),
                (8000, 1, "WAV", "IMA_ADPCM"), (8000, 1, "CAF", "ALAW"))):
            try:
                out.append(bytes([i % 3 == 2 and 2 or 0]) + _wav(_tone(rate // 10, ch), rate,
                                                                  fmt, sub))
            except Exception:  # a format this libsndfile build cannot write
                pass
        for dt in range(len(Harness._DTYPES)):
            out.append(bytes([1, dt, 2, 1, 1, 0, 0, 0]) + _tone(2000).astype(
                np.float32).tobytes())
        return out
    if target == "manifest":
        text = seed_manifest().encode()
        return [b"\0" + text, b"\1" + bytes(range(64)), b"\0{}", b"\0[]"]
    if target == "segment":
        out = []
        for i, (seg_bin, gallery) in enumerate(harness._segment_seed()):
            out += [b"\0" + seg_bin, bytes([1, i]) + bytes(range(40)), bytes([2, i, 0, 0]),
                    bytes([3, i]) + bytes(range(7, 47))]
        return out
    if target == "tokenizer":
        return [b"\0a calm, low-pitched female voice", b"\1caf\xc3\xa9 \xed\xa0\x80 x",
                b"\2" + "é中\U0001F600\u202e\0".encode("utf-16-le"), b"\3\x05calm "]
    if target == "onnx":
        return [b"\0" + external_model("w.data"), b"\0" + external_model("sub/inner.data"),
                b"\1" + bytes(range(1, 21)), b"\1\0\3" + bytes(18)]
    if target == "frontend":
        seed = harness._frontend_seed()
        return [b"\0" + seed, b"\1" + bytes(range(64)), b"\2" + bytes(range(0, 90, 3)),
                b"\2\1\2"]
    if target == "selftest_crash":  # libFuzzer runs the seeds shortest first
        return [b"o", b"X", b"SSS"]
    if target == "selftest_exception":
        return [b"o", b"X"]
    if target == "selftest_hang":
        return [b"o", b"HHH"]
    raise ValueError(f"unknown target {target!r}")


# --------------------------------------------------------------------------- findings

class Recorder:
    """Turns an unexpected exception into a ``Finding`` (one per signature), saving the
    input that raised it."""

    def __init__(self, target: str, keep: Path):
        self.target, self.keep = target, keep
        self.findings: dict[str, Finding] = {}

    def __call__(self, exc: BaseException, data: bytes) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "clapedge" in f.filename or "/runtime/" in f.filename
                or "/kernels/" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        kind = "invariant" if isinstance(exc, Invariant) else "exception"
        signature = f"{type(exc).__name__} at {where}"
        if signature in self.findings:
            return
        self.keep.mkdir(parents=True, exist_ok=True)
        path = self.keep / f"{self.target}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        message = f"{type(exc).__name__}: {exc}"[:500]
        self.findings[signature] = Finding(self.target, kind, signature, message, str(path))
        with open(self.keep / "findings.jsonl", "a") as f:
            f.write(json.dumps(asdict(self.findings[signature])) + "\n")


def guarded(harness: Harness, target: str, record: Recorder) -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        try:
            harness.run(target, data)
        except ClapEdgeError:
            pass
        except Exception as e:  # a finding: record it and keep fuzzing
            record(e, data)
    return one


# --------------------------------------------------------------------------- engines

def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _instrument(module_name: str) -> None:
    import atheris

    module = importlib.import_module(module_name)
    for obj in list(vars(module).values()):
        if isinstance(obj, types.FunctionType) and obj.__module__ == module_name:
            atheris.instrument_func(obj)
        elif inspect.isclass(obj) and obj.__module__ == module_name:
            for member in vars(obj).values():
                func = member.__func__ if isinstance(member, (classmethod, staticmethod)) \
                    else member.fget if isinstance(member, property) else member
                if isinstance(func, types.FunctionType):
                    atheris.instrument_func(func)


def _child(target: str, seconds: float, runs: int, corpus: Path, keep: Path, timeout: int,
           rss_limit_mb: int) -> None:
    """The atheris process: instrument, seed the corpus, fuzz until time or runs are up."""
    import atheris

    for name in _MODULES:
        _instrument(name)
    harness = Harness(keep.parent / f"work-{target}")
    corpus.mkdir(parents=True, exist_ok=True)
    for data in seeds(target, harness):
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
    args = [sys.argv[0], f"-max_total_time={max(1, int(round(seconds)))}",
            f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}", f"-max_len={MAX_LEN}",
            "-print_final_stats=1", f"-artifact_prefix={keep}/{target}-", str(corpus)]
    if runs:
        args.insert(1, f"-runs={runs}")
    keep.mkdir(parents=True, exist_ok=True)
    atheris.Setup(args, guarded(harness, target, Recorder(target, keep)))
    atheris.Fuzz()


def fuzz_atheris(target: str, seconds: float, workdir: Path, *, runs: int = 0,
                 timeout: int = 10, rss_limit_mb: int = 2048,
                 max_restarts: int = 5) -> TargetResult:
    """Fuzz ``target`` with atheris in child processes (restarted after a hang or a
    crash) for ``seconds``; iterations summed over the children."""
    keep, corpus = workdir / "findings", workdir / f"corpus-{target}"
    result = TargetResult(target, "atheris", 0.0, 0)
    seen: set[str] = set()
    t0 = time.monotonic()
    while True:
        left = seconds - (time.monotonic() - t0)
        if left < 1 and result.iterations:
            break
        before = {p.name for p in keep.glob(f"{target}-*")} if keep.exists() else set()
        cmd = [sys.executable, "-m", "clapedge.bench.fuzz", "--child", target,
               "--seconds", str(max(1.0, left)), "--runs", str(runs), "--keep", str(keep),
               "--corpus", str(corpus), "--timeout", str(timeout),
               "--rss-limit-mb", str(rss_limit_mb)]
        proc = subprocess.run(fresh(cmd), capture_output=True, text=True,
                              timeout=max(60, left * 3 + timeout * 3 + 60))
        log = proc.stderr
        done = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        executed = int(done[-1]) if done else max(
            [int(x) for x in re.findall(r"^#(\d+)\s", log, re.M)] or [0])
        result.iterations += executed
        cov = re.findall(r"\bcov: (\d+)", log)
        if cov:
            result.coverage = max(result.coverage or 0, int(cov[-1]))
        for finding in _read_findings(keep, target):
            if finding.signature not in seen:
                seen.add(finding.signature)
                result.findings.append(finding)
        artifacts = sorted(p for p in keep.glob(f"{target}-*")
                           if p.name not in before and re.match(
                               rf"{target}-(crash|timeout|oom|leak)-", p.name))
        for art in artifacts:
            kind = art.name.split("-")[1]
            summary = re.findall(r"^(?:==\d+== )?ERROR: libFuzzer: .*$|^SUMMARY: .*$", log,
                                 re.M)
            result.findings.append(Finding(target, kind, f"{kind} ({art.name})",
                                           " / ".join(summary)[:500] or log[-500:], str(art)))
        if proc.returncode != 0 and not artifacts and not done:
            result.findings.append(Finding(target, "crash", f"child exit {proc.returncode}",
                                           log[-800:]))
        if proc.returncode == 0 or runs or result.restarts >= max_restarts:
            break
        result.restarts += 1
    result.seconds = time.monotonic() - t0
    return result


def _read_findings(keep: Path, target: str) -> list[Finding]:
    path = keep / "findings.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d["target"] == target:
            out.append(Finding(**d))
    return out


def fuzz_hypothesis(target: str, seconds: float, workdir: Path, *, examples: int = 0,
                    timeout: float = 10.0) -> TargetResult:
    """Fuzz ``target`` in process with hypothesis: random bytes and mutated seeds, in
    rounds of 200 examples until ``seconds`` (or ``examples``) are used up. An input slower
    than ``timeout`` is a finding (it cannot be interrupted in process)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keep = workdir / "findings"
    harness = Harness(workdir / f"work-{target}")
    record = Recorder(target, keep)
    one = guarded(harness, target, record)
    seed_list = seeds(target, harness)
    edits = st.lists(st.tuples(st.integers(0, MAX_LEN), st.integers(0, 255)), max_size=16)
    mutated = st.builds(lambda s, e, cut: _edit(s, e, cut), st.sampled_from(seed_list), edits,
                        st.integers(0, MAX_LEN))
    count = 0

    @settings(max_examples=min(200, examples) if examples else 200, deadline=None,
              database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(mutated, st.binary(max_size=512), st.sampled_from(seed_list)))
    def prop(data: bytes) -> None:
        nonlocal count
        count += 1
        t = time.monotonic()
        one(data)
        if time.monotonic() - t > timeout:
            record(Invariant(f"took {time.monotonic() - t:.1f} s (timeout {timeout} s)"), data)

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not (examples and count >= examples):
        prop()
    return TargetResult(target, "hypothesis", time.monotonic() - t0, count,
                        list(record.findings.values()))


def _edit(seed: bytes, edits, cut: int) -> bytes:
    out = bytearray(seed)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[:cut]) if cut < len(out) and cut % 3 == 0 else bytes(out)


def run_target(target: str, seconds: float, workdir: str | os.PathLike, *,
               engine: str = "auto", runs: int = 0, timeout: int = 10,
               rss_limit_mb: int = 2048, max_restarts: int = 5) -> TargetResult:
    """Fuzz one target for ``seconds`` (or ``runs`` inputs) with ``engine``."""
    if target not in TARGETS + _SELFTESTS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    workdir = Path(workdir)
    if engine == "auto":
        engine = "atheris" if atheris_available() else "hypothesis"
    if engine == "atheris":
        return fuzz_atheris(target, seconds, workdir, runs=runs, timeout=timeout,
                            rss_limit_mb=rss_limit_mb, max_restarts=max_restarts)
    if engine == "hypothesis":
        return fuzz_hypothesis(target, seconds, workdir, examples=runs, timeout=timeout)
    raise ValueError(f"unknown engine {engine!r} (auto, atheris, hypothesis)")


# --------------------------------------------------------------------------- CLI

def _print(results: list[TargetResult]) -> None:
    print(f"{'target':10} {'engine':10} {'seconds':>8} {'iterations':>11} {'coverage':>9} "
          f"{'restarts':>8}  findings")
    for r in results:
        print(f"{r.target:10} {r.engine:10} {r.seconds:8.1f} {r.iterations:11d} "
              f"{r.coverage if r.coverage is not None else '-':>9} {r.restarts:8d}  "
              f"{len(r.findings)}")
        for f in r.findings:
            print(f"    {f.kind}: {f.signature}: {f.message[:200]}  [{f.input_file}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clapedge.bench.fuzz", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="per target")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--engine", default="auto", choices=("auto", "atheris", "hypothesis"))
    p.add_argument("--runs", type=int, default=0, help="stop each target after N inputs")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--keep", default=None, help="directory for corpora and findings "
                                                "(default: a temporary one, deleted)")
    p.add_argument("--json", action="store_true", help="one JSON line per target")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.seconds, args.runs, Path(args.corpus), Path(args.keep),
               args.timeout, args.rss_limit_mb)
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; targets: {', '.join(TARGETS)}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clapedge-fuzz-"))
    try:
        results = []
        for target in targets:
            r = run_target(target, args.seconds, work, engine=args.engine, runs=args.runs,
                           timeout=args.timeout, rss_limit_mb=args.rss_limit_mb)
            results.append(r)
            if args.json:
                print(json.dumps(r.to_dict()), flush=True)
        if not args.json:
            _print(results)
        return 1 if any(r.findings for r in results) else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
