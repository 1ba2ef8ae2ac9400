"""The native INT8 conv front end of wav2vec2 / HuBERT / WavLM towers (``frontend.h``).

``NativeFrontEnd`` maps a waveform to the frames the bundle's ``audio_encoder.onnx`` reads
(the output of the feature projection), doing each conv layer in one pass: per-row int8
quantisation, an AMX / VNNI GEMM and the epilogue (scales, bias, norm, GELU) while the rows
are in cache. The same arithmetic as the exporter's per-row dynamic ONNX form
(``export/rowwise.py``), without its dozen passes over every [frames, channels] tensor.

Its weights live in one ``.npz`` file (no pickle: ``allow_pickle=False``) written by the
exporter (``export/native_frontend.py``): arrays ``layer<i>.<field>`` and
``projection.<field>``, and ``meta``, a UTF-8 JSON record of the shapes and options.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from clapedge.kernels import _native, simd
from clapedge.kernels.errors import KernelInputError

FORMAT = 1
NORMS = ("none", "group", "layer")
# SIMD levels on which the native front end is faster than the ONNX graph; elsewhere the
# runtime keeps audio.onnx (the scalar level exists for tests and as the reference).
FAST_LEVELS = ("amx", "avx512")
_LAYER_F32 = ("bias", "weight_scale", "norm_weight", "norm_bias")
_PROJ_F32 = ("ln_weight", "ln_bias", "weight_scale", "bias")


class FrontEndFileError(KernelInputError):
    """A native front-end file that cannot be read or does not describe a valid front end."""


def _f32(a: Any) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


class NativeFrontEnd:
    """A conv front end: ``layers`` (dicts: kernel, stride, cin, cout, weight (float32
    [kernel, cout] for the first layer, int8 [kernel*cin, cout] for the others),
    weight_scale, bias, norm ("none" | "group" (first layer only) | "layer"), norm_weight,
    norm_bias, norm_eps) and an optional ``projection`` (din, dout, layer_norm, ln_weight,
    ln_bias, ln_eps, weight int8 [din, dout], weight_scale, bias).
    ``normalize_waveform``: standardise the valid samples first (HF ``do_normalize``)."""

    def __init__(self, layers: list[dict], projection: dict | None = None,
                 normalize_waveform: bool = False) -> None:
        self.layers = [self._clean_layer(i, layer) for i, layer in enumerate(layers)]
        self.projection = None if projection is None else self._clean_projection(projection)
        self.normalize_waveform = bool(normalize_waveform)
        try:
            self._native = _native.FrontEnd(self.layers, self.projection)
        except ValueError as e:
            raise KernelInputError(str(e)) from None
        except (RuntimeError, TypeError) as e:  # nanobind: a value out of int64's range
            raise KernelInputError(f"front end: a value of the wrong type or out of range "
                                   f"({e})") from None

    @staticmethod
    def _clean_layer(i: int, layer: dict) -> dict:
        out = {k: int(layer[k]) for k in ("kernel", "stride", "cin", "cout")}
        w = np.asarray(layer["weight"])
        out["weight"] = np.ascontiguousarray(w, dtype=np.float32 if i == 0 else np.int8)
        if i > 0 and w.dtype != np.int8:
            raise KernelInputError(f"front end layer {i}: weight must be int8, got {w.dtype}")
        for k in _LAYER_F32:
            if layer.get(k) is not None:
                out[k] = _f32(layer[k])
        norm = str(layer.get("norm", "none"))
        if norm not in NORMS:
            raise KernelInputError(f"front end layer {i}: unknown norm {norm!r}")
        out["norm"] = norm
        out["norm_eps"] = float(layer.get("norm_eps", 1e-5))
        return out

    @staticmethod
    def _clean_projection(p: dict) -> dict:
        out: dict[str, Any] = {"din": int(p["din"]), "dout": int(p["dout"]),
                               "layer_norm": bool(p.get("layer_norm", False)),
                               "ln_eps": float(p.get("ln_eps", 1e-5))}
        w = np.asarray(p["weight"])
        if w.dtype != np.int8:
            raise KernelInputError(f"front end projection: weight must be int8, got {w.dtype}")
        out["weight"] = np.ascontiguousarray(w)
        for k in _PROJ_F32:
            if p.get(k) is not None:
                out[k] = _f32(p[k])
        return out

    # ---- shapes ----
    @property
    def out_channels(self) -> int:
        return int(self._native.out_channels)

    def frames(self, samples: int) -> int:
        return int(self._native.frames(int(samples)))

    # ---- running ----
    def __call__(self, wave: np.ndarray, lengths: np.ndarray | None = None, *,
                 threads: int | None = None, simd_level: str | None = None) -> np.ndarray:
        """wave float32 [batch, samples] (or [samples]); ``lengths`` [batch] valid samples
        (default: all). Returns float32 [batch, frames(samples), out_channels]; samples past
        a clip's length are treated as zeros, like the audio graph's padding mask."""
        wave = np.asarray(wave, dtype=np.float32)
        squeeze = wave.ndim == 1
        if squeeze:
            wave = wave[None]
        if wave.ndim != 2:
            raise KernelInputError(f"waveform must be [batch, samples], got shape {wave.shape}")
        batch, samples = wave.shape
        if lengths is None:
            lengths = np.full(batch, samples, np.int64)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if lengths.shape[0] != batch:
            raise KernelInputError(f"{lengths.shape[0]} lengths for a batch of {batch}")
        frames = self.frames(samples)
        if frames < 1:
            raise KernelInputError(f"{samples} samples are too few for one frame of the front end")
        out = np.empty((batch, frames, self.out_channels), np.float32)
        level = simd_level or simd.simd_level()
        n_threads = int(threads) if threads else max(1, os.cpu_count() or 1)
        for b in range(batch):
            n = int(min(max(lengths[b], 0), samples))
            x = wave[b]
            if n < samples or self.normalize_waveform:
                x = x.copy()
                x[n:] = 0.0
                if self.normalize_waveform and n > 0:
                    valid = x[:n].astype(np.float64)
                    x[:n] = ((valid - valid.mean()) / np.sqrt(valid.var() + 1e-7)).astype(np.float32)
            self._native.run(np.ascontiguousarray(x), n, out[b], n_threads, level)
        return out[0] if squeeze else out

    # ---- files ----
    def save(self, path: str | os.PathLike) -> None:
        """Writes the npz file (the caller makes it atomic: the exporter writes bundles into a
        temporary directory)."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"format": FORMAT, "normalize_waveform": self.normalize_waveform,
                                "layers": [], "projection": None}
        for i, layer in enumerate(self.layers):
            rec = {}
            for k, v in layer.items():
                if isinstance(v, np.ndarray):
                    arrays[f"layer{i}.{k}"] = v
                else:
                    rec[k] = v
            meta["layers"].append(rec)
        if self.projection is not None:
            rec = {}
            for k, v in self.projection.items():
                if isinstance(v, np.ndarray):
                    arrays[f"projection.{k}"] = v
                else:
                    rec[k] = v
            meta["projection"] = rec
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, data: bytes | None = None) -> "NativeFrontEnd":
        """Reads a front end written by ``save`` (``data``: its bytes, already read and
        checksummed by the bundle). Raises FrontEndFileError naming the file."""
        path = Path(path)
        try:
            source = io.BytesIO(data) if data is not None else path
            with np.load(source, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(bytes(arrays.pop("meta")).decode())
            if meta.get("format") != FORMAT:
                raise FrontEndFileError(f"{path}: native front end format {meta.get('format')!r}, "
                                        f"this runtime reads {FORMAT}")
            layers = []
            for i, rec in enumerate(meta["layers"]):
                layer = dict(rec)
                layer.update({k.split(".", 1)[1]: v for k, v in arrays.items()
                              if k.startswith(f"layer{i}.")})
                layers.append(layer)
            projection = None
            if meta.get("projection") is not None:
                projection = dict(meta["projection"])
                projection.update({k.split(".", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith("projection.")})
            return cls(layers, projection, bool(meta.get("normalize_waveform", False)))
        except FrontEndFileError:
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                OverflowError, RuntimeError, NotImplementedError, struct.error, zlib.error,
                zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError,
                json.JSONDecodeError) as e:
            # numpy's zip reader and np.load raise all of these on damaged archives
            # (truncated members, unsupported or "encrypted" entries, bad headers)
            raise FrontEndFileError(f"{path}: not a valid native front-end file: {e}") from None
