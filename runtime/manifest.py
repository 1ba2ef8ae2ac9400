"""The bundle manifest: the contract between the exporter and the runtime.

A bundle is a directory with ``manifest.json`` beside the files it names::

    BUNDLE/manifest.json    this module's ``Manifest``, written sorted and indented
    BUNDLE/audio.onnx       towers.audio   (required)
    BUNDLE/text.onnx        towers.text    (optional; needs ``tokenizer``)
    BUNDLE/tagger.onnx      towers.tagger  (optional; audio tower + one baked bank + TopK)
    BUNDLE/tokenizer.json   tokenizer      (HF ``tokenizers`` file)
    BUNDLE/banks/<name>.npy banks[name]    (float32 [n_labels, embed_dim], rows L2-normalised)
    BUNDLE/*.plan           engines        (TensorRT; valid only for the recorded TRT + GPU)
    BUNDLE/*_ctx.onnx       engines.context (optional, format 1.3; EP-context model of a plan)
    BUNDLE/audio_frontend.onnx stream.frontend (optional, format 1.2; the audio tower cut
    BUNDLE/audio_encoder.onnx  stream.encoder   in two for streaming, see ``StreamSpec``)
    BUNDLE/audio_step.onnx     stream.step      (optional, format 1.4; causal models only:
                                                 the encoder one hop at a time, see below)
    BUNDLE/audio_frontend.native.npz native_frontend (optional, format 1.5; INT8 bundles
                                                 with a split: the conv front end's weights
                                                 for the native kernel, kernels/frontend.py;
                                                 it replaces stream.frontend offline)

Every file is named by a relative POSIX path inside the bundle and carries its sha256 and
(format 1.1) its size in bytes; the runtime verifies each file when it opens it, the size
first, so a truncated, extended or replaced file is refused before it is read.

Tower I/O naming convention (the exporter writes these names, the runtime feeds and reads
them; ``batch``, ``samples`` and ``tokens`` are named dynamic dimensions)::

    audio   in   waveform        float32 [batch, samples]  mono, at ``sample_rate``, in [-1, 1]
            in   attention_mask  int64   [batch, samples]  1 = real sample, 0 = padding
                                                           (optional: omit it if the model
                                                           ignores padding masks)
            out  embedding       float32 [batch, embed_dim]  L2-normalised
            out  head_<name>     float32 [batch, n_labels]   optional attribute-head logits;
                                                             labels in ``heads[name]``
    text    in   input_ids       int64   [batch, tokens]
            in   attention_mask  int64   [batch, tokens]
            out  embedding       float32 [batch, embed_dim]  L2-normalised
    tagger  in   as audio
            out  scores          float32 [batch, k]   cosine similarity to the rows of
                                                      ``banks[tagger.bank]``, descending
            out  indices         int64   [batch, k]   row indices into that bank
            out  embedding       float32 [batch, embed_dim]  optional
    stream.frontend  in   waveform (+ attention_mask)   as audio
                     out  frames    float32 [batch, frames, channels]
    stream.encoder   in   frames    float32 [batch, frames, channels]
                     in   attention_mask  int64 [batch, samples]  (the window's samples)
                     out  as audio
    stream.step      in   frames     float32 [1, frames, H]   new encoder-input frames
                     in   context    float32 [1, C, H]        the C frames before them
                     in   past_key, past_value  float32 [layers, 1, L, H]  last L frames
                     in   past_valid int64 [1]    how many of the L cached frames exist
                     in   past_sum   float32 [1, H]  sum of the window's older final states
                     in   past_count float32 [1]  how many there are
                     out  as audio, then new_key, new_value [layers, 1, frames, H] and
                          new_hidden [1, frames, H]  (``export/stream_step.py``)

Each ONNX file should also describe itself in ``metadata_props`` (as sherpa-onnx models
do), so a file separated from its bundle stays usable: ``role`` (audio|text|tagger),
``sample_rate``, ``embed_dim``, ``precision``, ``format_version``; for the tagger also
``bank`` and ``k``. The runtime checks ``sample_rate`` and ``embed_dim`` against the
manifest where present.

fp16 and int8 towers keep float32 inputs and outputs (the runtime casts to whatever dtype
a tower declares, so a float16 input also works, but float32 I/O is the convention).

Versioning: ``format_version`` is ``"MAJOR.MINOR"`` (1.1 added the optional ``size`` of
every file, 1.2 the optional ``stream`` split, 1.3 an engine's optional EP-context model,
1.4 the optional causal streaming step ``stream.step``, 1.5 the optional native front end
``native_frontend``; older bundles still load). The runtime
refuses another major version. A newer minor version may add fields: unknown keys are then
ignored; with the same or an older minor version an unknown key is an error (it is a typo or
a corrupt file).

Construction validates every field (``ConfigError`` naming the field); reading a manifest
file turns any problem into ``BundleError`` naming the file and the field path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from clapedge.errors import BundleError, ConfigError

FORMAT_VERSION = "1.5"
STEP_INPUTS = ("frames", "context", "past_key", "past_value", "past_valid", "past_sum",
               "past_count")
STEP_OUTPUTS = ("new_key", "new_value", "new_hidden")
MANIFEST_NAME = "manifest.json"
# A manifest is a few KB (prompt lists make it a few hundred); refuse absurd ones unread.
MAX_MANIFEST_BYTES = 64 << 20

PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
BANK_KINDS = ("categorical", "ordinal")
TOWER_ROLES = ("audio", "text", "tagger")

# The I/O naming convention (see the module docstring).
WAVEFORM = "waveform"
ATTENTION_MASK = "attention_mask"
EMBEDDING = "embedding"
INPUT_IDS = "input_ids"
SCORES = "scores"
INDICES = "indices"
FRAMES = "frames"
HEAD_PREFIX = "head_"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


# --------------------------------------------------------------------------- checks

def _fail(field_name: str, problem: str) -> None:
    raise ConfigError(f"{field_name}: {problem}")


def _check_relpath(field_name: str, value: str) -> None:
    """Bundle files are relative POSIX paths that stay inside the bundle."""
    if not isinstance(value, str) or not value:
        _fail(field_name, "must be a non-empty relative path")
    p = PurePosixPath(value)
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or p.is_absolute():
        _fail(field_name, f"{value!r} is absolute; bundle paths are relative to the bundle")
    if "\\" in value or any(part in ("..", "") for part in value.split("/")):
        _fail(field_name, f"{value!r} must be a plain relative POSIX path without '..'")


def _check_sha(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not _SHA256.match(value):
        _fail(field_name, f"{value!r} is not a sha256 (64 lowercase hex digits)")


def _check_json(field_name: str, value: Any) -> None:
    """Free-form records must write back: a manifest that loads must also save."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        _fail(field_name, f"must be JSON-serialisable without NaN: {e}")


def _check_size(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        _fail("size", f"{value!r} must be a byte count (an integer >= 0)")


def _check_positive(field_name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        _fail(field_name, f"{value!r} must be a finite number > 0")


def _check_labels(field_name: str, labels: tuple[str, ...]) -> None:
    if not labels:
        _fail(field_name, "needs at least one label")
    if any(not isinstance(x, str) or not x for x in labels):
        _fail(field_name, "labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        _fail(field_name, f"duplicate labels {dup}")


def _check_per_label(field_name: str, mapping: Mapping[str, Any], labels: tuple[str, ...]):
    missing = [x for x in labels if x not in mapping]
    extra = [x for x in mapping if x not in labels]
    if missing or extra:
        _fail(field_name, f"must have exactly one entry per label (missing {missing}, "
                          f"unknown {extra})")


# --------------------------------------------------------------------------- schema

@dataclass
class TensorSpec:
    """One model input or output. ``shape`` holds ints (fixed) and names (dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if not isinstance(self.name, str) or not self.name:
            _fail("name", "must be a non-empty string")
        if self.dtype not in DTYPES:
            _fail(self.name, f"dtype {self.dtype!r} not one of {'|'.join(DTYPES)}")
        for d in self.shape:
            ok_int = isinstance(d, int) and not isinstance(d, bool) and d > 0
            ok_name = isinstance(d, str) and _DIM_NAME.match(d)
            if not (ok_int or ok_name):
                _fail(self.name, f"shape entry {d!r} must be a positive int or a dim name")


@dataclass
class FileRef:
    """A file of the bundle with its checksum and size (used for ONNX external-data
    files). ``size`` (bytes; format 1.1, optional) lets the runtime refuse a truncated,
    extended or replaced file before reading it."""

    file: str
    sha256: str
    size: int | None = None

    def __post_init__(self):
        _check_relpath("file", self.file)
        _check_sha("sha256", self.sha256)
        _check_size(self.size)


@dataclass
class TowerSpec:
    """One ONNX model of the bundle.

    ``heads`` maps an attribute-head name to its labels; the tower then has an output
    ``head_<name>`` [batch, n_labels] of logits. ``external_data`` lists every ONNX
    external-data file the model references (each must be inside the bundle). ``bank`` and
    ``k`` are set on the tagger only: the bank baked into the graph and its TopK size.
    """

    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    external_data: tuple[FileRef, ...] = ()
    bank: str | None = None
    k: int | None = None
    size: int | None = None

    def __post_init__(self):
        self.inputs, self.outputs = tuple(self.inputs), tuple(self.outputs)
        self.external_data = tuple(self.external_data)
        self.heads = {name: tuple(labels) for name, labels in self.heads.items()}
        _check_relpath("file", self.file)
        _check_sha("sha256", self.sha256)
        _check_size(self.size)
        if self.precision not in PRECISIONS:
            _fail("precision", f"{self.precision!r} not one of {'|'.join(PRECISIONS)}")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                _fail(kind, f"duplicate names in {names}")
        for name, labels in self.heads.items():
            if not _DIM_NAME.match(name):
                _fail("heads", f"head name {name!r} must be an identifier")
            _check_labels(f"heads.{name}", labels)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k <= 0):
            _fail("k", f"{self.k!r} must be a positive integer")

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)


@dataclass
class Towers:
    audio: TowerSpec
    text: TowerSpec | None = None
    tagger: TowerSpec | None = None

    def items(self) -> list[tuple[str, TowerSpec]]:
        return [(r, t) for r in TOWER_ROLES if (t := getattr(self, r)) is not None]


@dataclass
class ClipPolicy:
    """How the runtime turns a signal of any length into model inputs (all in seconds).

    - shorter than ``min_seconds``: zero-padded at the end to ``min_seconds``; the padding
      counts as signal (mask 1), as trailing silence from a microphone would.
    - up to ``max_seconds``: one clip, as is.
    - longer than ``max_seconds``: windows of ``window_seconds`` starting every
      ``hop_seconds`` from 0, the last one moved back to end exactly at the end of the
      signal; the clip embedding is the mean of the L2-normalised window embeddings,
      re-normalised (head logits: the mean over windows).
    - batching: each clip or window is zero-padded at the end to a multiple of
      ``bucket_seconds`` with mask 0, and only clips of the same padded length share a
      batch, so the padding a clip gets depends on the clip alone, never on its batch
      neighbours (0: exact lengths, batches only of equal lengths). A tower without an
      ``attention_mask`` input sees that padding as trailing silence: give such models
      ``bucket_seconds=0``.
    """

    min_seconds: float
    max_seconds: float
    window_seconds: float
    hop_seconds: float
    bucket_seconds: float = 0.0

    def __post_init__(self):
        for name in ("min_seconds", "max_seconds", "window_seconds", "hop_seconds"):
            _check_positive(name, getattr(self, name))
        if not (isinstance(self.bucket_seconds, (int, float)) and self.bucket_seconds >= 0
                and math.isfinite(self.bucket_seconds)):
            _fail("bucket_seconds", f"{self.bucket_seconds!r} must be a finite number >= 0")
        if not self.min_seconds <= self.window_seconds <= self.max_seconds:
            _fail("window_seconds", f"need min_seconds <= window_seconds <= max_seconds, got "
                                    f"{self.min_seconds} / {self.window_seconds} / "
                                    f"{self.max_seconds}")
        if self.hop_seconds > self.window_seconds:
            _fail("hop_seconds", f"{self.hop_seconds} exceeds window_seconds "
                                 f"{self.window_seconds} (windows would skip audio)")


@dataclass
class TokenizerSpec:
    """The HF ``tokenizers`` file; sequences are truncated to ``max_length`` tokens and
    padded with ``pad_id``."""

    file: str
    sha256: str
    max_length: int
    pad_id: int = 0
    size: int | None = None

    def __post_init__(self):
        _check_relpath("file", self.file)
        _check_sha("sha256", self.sha256)
        _check_size(self.size)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) \
                or self.max_length <= 0:
            _fail("max_length", f"{self.max_length!r} must be a positive integer")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            _fail("pad_id", f"{self.pad_id!r} must be an integer >= 0")


@dataclass
class LabelBank:
    """Text embeddings of one label set, one row per label (prompt ensembles averaged).

    ``prompts[label]`` records the prompt strings that were encoded and averaged.
    ``multi_label`` banks report every label whose cosine score reaches
    ``thresholds[label]`` (required for them). ``kind="ordinal"`` banks are ordered anchors
    (e.g. low / medium / high arousal) with a numeric ``values[label]`` each.
    """

    labels: tuple[str, ...]
    file: str
    sha256: str
    prompts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    multi_label: bool = False
    thresholds: dict[str, float] | None = None
    kind: str = "categorical"
    values: dict[str, float] | None = None
    size: int | None = None

    def __post_init__(self):
        self.labels = tuple(self.labels)
        self.prompts = {label: tuple(p) for label, p in self.prompts.items()}
        _check_labels("labels", self.labels)
        _check_relpath("file", self.file)
        _check_sha("sha256", self.sha256)
        _check_size(self.size)
        if self.prompts:
            _check_per_label("prompts", self.prompts, self.labels)
        if not isinstance(self.multi_label, bool):
            _fail("multi_label", f"{self.multi_label!r} must be true or false")
        if self.kind not in BANK_KINDS:
            _fail("kind", f"{self.kind!r} not one of {'|'.join(BANK_KINDS)}")
        if self.multi_label and self.thresholds is None:
            _fail("thresholds", "a multi_label bank needs a threshold per label")
        for name in ("thresholds", "values"):
            mapping = getattr(self, name)
            if mapping is None:
                continue
            _check_per_label(name, mapping, self.labels)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in mapping.values()):
                _fail(name, "entries must be finite numbers")
            setattr(self, name, {k: float(v) for k, v in mapping.items()})
        if self.kind == "ordinal" and self.values is None:
            _fail("values", "an ordinal bank needs a numeric value per label")
        if self.kind == "ordinal" and self.multi_label:
            _fail("multi_label", "an ordinal bank is single-label")


@dataclass
class ShapeRange:
    """One input's TensorRT optimisation-profile range."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        self.min, self.opt, self.max = tuple(self.min), tuple(self.opt), tuple(self.max)
        if not len(self.min) == len(self.opt) == len(self.max):
            _fail("profile", "min/opt/max must have the same rank")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            _fail("profile", f"need min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass
class EngineSpec:
    """A prebuilt TensorRT engine for one tower (valid only for this TRT version + GPU)."""

    file: str
    sha256: str
    tower: str
    trt_version: str
    gpu: str
    profiles: tuple[dict[str, ShapeRange], ...] = ()
    precision: str = "fp16"
    size: int | None = None
    # format 1.3: the EP-context model that lets ONNX Runtime's TensorRT EP load the plan
    # (runtime/engines.py), its sha256 and size
    context: str | None = None
    context_sha256: str | None = None
    context_size: int | None = None

    def __post_init__(self):
        self.profiles = tuple(self.profiles)
        _check_relpath("file", self.file)
        _check_sha("sha256", self.sha256)
        _check_size(self.size)
        if (self.context is None) != (self.context_sha256 is None):
            _fail("context", "context and context_sha256 go together")
        if self.context is not None:
            _check_relpath("context", self.context)
            _check_sha("context_sha256", self.context_sha256)
        _check_size(self.context_size)
        if self.tower not in TOWER_ROLES:
            _fail("tower", f"{self.tower!r} not one of {'|'.join(TOWER_ROLES)}")
        if self.precision not in PRECISIONS:
            _fail("precision", f"{self.precision!r} not one of {'|'.join(PRECISIONS)}")


@dataclass
class ModelInfo:
    """Where the bundle came from: a name, the source checkpoint hash, free-form details."""

    name: str
    source_sha256: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            _fail("name", "must be a non-empty string")
        if self.source_sha256 is not None:
            _check_sha("source_sha256", self.source_sha256)
        _check_json("info", self.info)


@dataclass
class StreamSpec:
    """The audio tower cut in two for streaming (format 1.2, optional; written by
    ``export/stream_split.py``): ``frontend`` maps samples to per-frame features, frame t
    seeing samples [frame_stride*t, frame_stride*t + receptive_field); ``encoder`` maps the
    frames of a window (and the window's sample mask) to the audio tower's outputs.
    ``exact``: reusing frames across windows gave bit-identical outputs to the audio tower
    at export (the front end is frame-local); false for front ends normalised over time
    (GroupNorm), which a stream then uses only when asked (``reuse="approx"``).
    ``boundary`` is the audio-graph tensor where it was cut and ``max_abs_error`` the
    largest difference from the audio tower measured at export, both for the record."""

    frontend: TowerSpec
    encoder: TowerSpec
    frame_stride: int
    receptive_field: int
    exact: bool
    boundary: str | None = None
    max_abs_error: float | None = None
    step: TowerSpec | None = None
    causal_context: int | None = None
    step_context: int | None = None

    def __post_init__(self):
        if self.step is not None and (self.causal_context is None or self.step_context is None):
            _fail("stream.step", "needs causal_context and step_context")
        for name in ("frame_stride", "receptive_field") + (
                ("causal_context", "step_context") if self.step is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _fail(name, f"{v!r} must be a positive integer")
        if not isinstance(self.exact, bool):
            _fail("exact", f"{self.exact!r} must be true or false")
        if self.max_abs_error is not None and not (
                isinstance(self.max_abs_error, (int, float)) and self.max_abs_error >= 0
                and math.isfinite(self.max_abs_error)):
            _fail("max_abs_error", f"{self.max_abs_error!r} must be a finite number >= 0")


@dataclass
class NativeFrontEndSpec:
    """The conv front end for the native kernel (format 1.5, optional; written by
    ``export/native_frontend.py``): an ``.npz`` of its weights (read without pickle). With
    ``stream.encoder`` it computes the audio tower on CPUs with AMX or AVX-512 VNNI:
    frames from the native kernel, the rest from the encoder. ``quality``: what the
    exporter measured (centred cosine to fp32 per length, beside audio.onnx's)."""

    file: str
    sha256: str
    size: int | None = None
    quality: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_relpath("native_frontend.file", self.file)
        _check_sha("native_frontend.sha256", self.sha256)
        _check_size(self.size)
        _check_json("native_frontend.quality", self.quality)


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle (see the module docstring).

    ``logit_scale`` is the multiplier of cosine similarities (the exp of a CLIP-style learned
    log scale, e.g. 100), used for softmax-weighted results such as ``ordinal``.
    ``calibration`` and ``quality`` are free-form JSON records written by the exporter.
    """

    sample_rate: int
    embed_dim: int
    logit_scale: float
    clip: ClipPolicy
    towers: Towers
    model: ModelInfo
    tokenizer: TokenizerSpec | None = None
    banks: dict[str, LabelBank] = field(default_factory=dict)
    default_bank: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    engines: tuple[EngineSpec, ...] = ()
    stream: StreamSpec | None = None
    native_frontend: NativeFrontEndSpec | None = None
    format_version: str = FORMAT_VERSION

    def __post_init__(self):
        self.engines = tuple(self.engines)
        for name in ("sample_rate", "embed_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _fail(name, f"{v!r} must be a positive integer")
        _check_positive("logit_scale", self.logit_scale)
        parse_version(self.format_version)
        for name in self.banks:
            if not _DIM_NAME.match(name):
                _fail("banks", f"bank name {name!r} must be an identifier")
        if self.default_bank is not None and self.default_bank not in self.banks:
            _fail("default_bank", f"{self.default_bank!r} is not one of the banks "
                                  f"{sorted(self.banks)}")
        self._check_towers()
        for name in ("calibration", "quality"):
            _check_json(name, getattr(self, name))

    def _check_towers(self) -> None:
        t, dim = self.towers, self.embed_dim
        _check_io("towers.audio", t.audio, [(WAVEFORM, ("float32", "float16"))],
                  [(EMBEDDING, dim)])
        clash = set(t.audio.heads) & set(self.banks)
        if clash:
            _fail("towers.audio.heads", f"head names {sorted(clash)} clash with bank names")
        for name, labels in t.audio.heads.items():
            spec = t.audio.output(HEAD_PREFIX + name)
            if spec is None or len(spec.shape) != 2:
                _fail("towers.audio.outputs", f"head {name!r} needs an output "
                                              f"'{HEAD_PREFIX}{name}' [batch, {len(labels)}]")
        if t.text is not None:
            _check_io("towers.text", t.text,
                      [(INPUT_IDS, ("int64",)), (ATTENTION_MASK, ("int64",))], [(EMBEDDING, dim)])
            if self.tokenizer is None:
                _fail("tokenizer", "a bundle with a text tower needs a tokenizer")
        if t.tagger is not None:
            _check_io("towers.tagger", t.tagger, [(WAVEFORM, ("float32", "float16"))],
                      [(SCORES, None), (INDICES, None)])
            if t.tagger.bank not in self.banks:
                _fail("towers.tagger.bank", f"{t.tagger.bank!r} is not one of the banks "
                                            f"{sorted(self.banks)}")
            n = len(self.banks[t.tagger.bank].labels)
            if t.tagger.k is None or t.tagger.k > n:
                _fail("towers.tagger.k", f"{t.tagger.k!r} must be set and at most the "
                                         f"bank's {n} labels")
        for role, tower in t.items():
            if role != "tagger" and (tower.bank is not None or tower.k is not None):
                _fail(f"towers.{role}", "bank/k are set on the tagger tower only")
        if self.stream is not None:
            self._check_stream(self.stream, t.audio)
        if self.native_frontend is not None and self.stream is None:
            _fail("native_frontend", "needs the stream split's encoder (manifest 'stream')")

    @staticmethod
    def _check_stream(s: StreamSpec, audio: TowerSpec) -> None:
        front = s.frontend.input(WAVEFORM)
        if front is None or front.dtype not in ("float32", "float16") or len(front.shape) != 2:
            _fail("stream.frontend.inputs", f"needs {WAVEFORM!r} float32 [batch, samples]")
        frames = [s.frontend.output(FRAMES), s.encoder.input(FRAMES)]
        if any(f is None or len(f.shape) != 3 or f.dtype not in ("float32", "float16")
               for f in frames):
            _fail("stream", f"the frontend needs an output and the encoder an input "
                            f"{FRAMES!r} float [batch, frames, channels]")
        if frames[0].shape[2] != frames[1].shape[2]:
            _fail("stream", f"frontend frames have {frames[0].shape[2]} channels, the "
                            f"encoder takes {frames[1].shape[2]}")
        for spec in (s.frontend, s.encoder):
            mask = spec.input(ATTENTION_MASK)
            if mask is not None and (mask.dtype != "int64" or len(mask.shape) != 2):
                _fail("stream", f"{ATTENTION_MASK!r} must be int64 [batch, samples]")
        want = sorted(o.name for o in audio.outputs)
        if sorted(o.name for o in s.encoder.outputs) != want or s.encoder.heads != audio.heads:
            _fail("stream.encoder.outputs", f"must be the audio tower's outputs {want} "
                                            f"(and heads)")
        for spec in (s.frontend, s.encoder):
            if spec.bank is not None or spec.k is not None:
                _fail("stream", "bank/k are set on the tagger tower only")
        if s.step is not None:
            names = {i.name for i in s.step.inputs}
            missing = [n for n in STEP_INPUTS if n not in names]
            if missing:
                _fail("stream.step.inputs", f"missing {missing}")
            outs = sorted(o.name for o in s.step.outputs)
            if outs != sorted(want + list(STEP_OUTPUTS)) or s.step.heads != audio.heads:
                _fail("stream.step.outputs", f"must be the audio tower's outputs {want} and "
                                             f"{list(STEP_OUTPUTS)}")
            if s.step.input(FRAMES).shape[2] != frames[1].shape[2]:
                _fail("stream.step", "its frames must have the encoder's channels")

    def stream_towers(self) -> list[TowerSpec]:
        if self.stream is None:
            return []
        return [self.stream.frontend, self.stream.encoder] + (
            [self.stream.step] if self.stream.step is not None else [])

    # -- helpers for the exporter and the loader

    def with_sizes(self, root: str | os.PathLike) -> "Manifest":
        """A copy with the ``size`` of every file it names set from the files in ``root``
        (the exporter calls this just before ``write_manifest``)."""
        root = Path(root)

        def sized(spec):
            return dataclasses.replace(spec, size=os.stat(root / spec.file).st_size)

        m = dataclasses.replace(self, format_version=FORMAT_VERSION)  # sizes are 1.1
        towers = {}
        for role, tower in self.towers.items():
            towers[role] = dataclasses.replace(
                sized(tower), external_data=tuple(sized(x) for x in tower.external_data))
        m.towers = Towers(**towers)
        m.tokenizer = None if self.tokenizer is None else sized(self.tokenizer)
        m.banks = {name: sized(bank) for name, bank in self.banks.items()}
        m.engines = tuple(
            dataclasses.replace(sized(e), context_size=None if e.context is None
                                else os.stat(root / e.context).st_size)
            for e in self.engines)
        if self.stream is not None:
            m.stream = dataclasses.replace(
                self.stream, **{part: dataclasses.replace(
                    sized(getattr(self.stream, part)), external_data=tuple(
                        sized(x) for x in getattr(self.stream, part).external_data))
                    for part in ("frontend", "encoder")
                    + (("step",) if self.stream.step is not None else ())})
        if self.native_frontend is not None:
            m.native_frontend = sized(self.native_frontend)
        return m

    def files(self) -> list[tuple[str, str]]:
        """Every (file, sha256) the manifest names, in a stable order."""
        out = []
        for _, tower in self.towers.items():
            out.append((tower.file, tower.sha256))
            out.extend((x.file, x.sha256) for x in tower.external_data)
        if self.tokenizer is not None:
            out.append((self.tokenizer.file, self.tokenizer.sha256))
        out.extend((b.file, b.sha256) for _, b in sorted(self.banks.items()))
        out.extend((e.file, e.sha256) for e in self.engines)
        out.extend((e.context, e.context_sha256) for e in self.engines if e.context)
        for tower in self.stream_towers():
            out.append((tower.file, tower.sha256))
            out.extend((x.file, x.sha256) for x in tower.external_data)
        if self.native_frontend is not None:
            out.append((self.native_frontend.file, self.native_frontend.sha256))
        return out

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        """Sorted, indented JSON with a trailing newline (stable diffs, stable hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> "Manifest":
        """Build and validate a manifest; any problem -> ``BundleError`` naming ``source``
        and the field path."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: the manifest must be a JSON object")
        version = data.get("format_version")
        major, minor = _checked_version(version, source)
        lenient = minor > parse_version(FORMAT_VERSION)[1]
        return _Reader(source, lenient).manifest(data)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{source}: not valid JSON ({e})") from None
        except RecursionError:
            raise BundleError(f"{source}: not a manifest (JSON nested too deeply)") from None
        return cls.from_dict(data, source)


def parse_version(version: str) -> tuple[int, int]:
    m = _VERSION.match(version) if isinstance(version, str) else None
    if m is None:
        _fail("format_version", f"{version!r} must look like 'MAJOR.MINOR'")
    return int(m.group(1)), int(m.group(2))


def _checked_version(version: Any, source: str) -> tuple[int, int]:
    try:
        major, minor = parse_version(version)
    except ConfigError as e:
        raise BundleError(f"{source}: {e}") from None
    ours = parse_version(FORMAT_VERSION)[0]
    if major != ours:
        raise BundleError(
            f"{source}: bundle format_version {version} is not supported; this clapedge reads "
            f"format {ours}.x (re-export the bundle, or install a clapedge that reads "
            f"{major}.x)")
    return major, minor


def _check_io(where: str, tower: TowerSpec, inputs, outputs) -> None:
    """Check a tower against the naming convention: required names, dtypes and ranks."""
    for name, dtypes in inputs:
        spec = tower.input(name)
        if spec is None:
            _fail(f"{where}.inputs", f"needs an input named {name!r}")
        if spec.dtype not in dtypes or len(spec.shape) != 2:
            _fail(f"{where}.inputs", f"{name!r} must be {'|'.join(dtypes)} [batch, n], got "
                                     f"{spec.dtype} {list(spec.shape)}")
    mask = tower.input(ATTENTION_MASK)
    if mask is not None and (mask.dtype != "int64" or len(mask.shape) != 2):
        _fail(f"{where}.inputs", f"{ATTENTION_MASK!r} must be int64 [batch, n]")
    for name, last_dim in outputs:
        spec = tower.output(name)
        if spec is None:
            _fail(f"{where}.outputs", f"needs an output named {name!r}")
        if len(spec.shape) != 2:
            _fail(f"{where}.outputs", f"{name!r} must have rank 2, got {list(spec.shape)}")
        if last_dim is not None and isinstance(spec.shape[1], int) and spec.shape[1] != last_dim:
            _fail(f"{where}.outputs", f"{name!r} has dim {spec.shape[1]} but embed_dim is "
                                      f"{last_dim}")


# --------------------------------------------------------------------------- JSON

def _to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts (``None`` fields left out), tuples -> lists."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None:
                out[f.name] = _to_plain(value)
        return out
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


_MISSING = object()


class _Reader:
    """Reads the JSON tree into dataclasses, naming the file and field path in errors."""

    def __init__(self, source: str, lenient: bool):
        self.source, self.lenient = source, lenient

    def error(self, path: str, problem: str) -> BundleError:
        return BundleError(f"{self.source}: {path}: {problem}")

    def obj(self, data: Any, path: str, cls: type, fields: dict[str, tuple[Callable, Any]]):
        """``fields``: key -> (convert(value, path), default or _MISSING)."""
        if not isinstance(data, dict):
            raise self.error(path, f"expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(fields))
        if unknown and not self.lenient:
            raise self.error(path, f"unknown keys {unknown}")
        kwargs = {}
        for key, (convert, default) in fields.items():
            sub = f"{path}.{key}" if path else key
            if key not in data or data[key] is None:
                if default is _MISSING:
                    raise self.error(sub, "is required")
                continue
            kwargs[key] = convert(data[key], sub)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise self.error(path or "manifest", str(e)) from None

    # scalar converters
    def _typed(self, kinds, label):
        def convert(v, path):
            if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
                raise self.error(path, f"expected {label}, got {json.dumps(v)[:60]}")
            return v
        return convert

    def list_of(self, item):
        def convert(v, path):
            if not isinstance(v, list):
                raise self.error(path, f"expected a list, got {type(v).__name__}")
            return tuple(item(x, f"{path}[{i}]") for i, x in enumerate(v))
        return convert

    def dict_of(self, item):
        def convert(v, path):
            if not isinstance(v, dict):
                raise self.error(path, f"expected an object, got {type(v).__name__}")
            return {k: item(x, f"{path}.{k}") for k, x in v.items()}
        return convert

    @property
    def s(self):
        return self._typed((str,), "a string")

    @property
    def i(self):
        return self._typed((int,), "an integer")

    @property
    def f(self):
        return self._typed((int, float), "a number")

    @property
    def b(self):
        return self._typed((bool,), "true or false")

    @property
    def d(self):
        return self._typed((dict,), "an object")

    def dim(self, v, path):
        return self._typed((int, str), "an int or a dim name")(v, path)

    # schema
    def tensor(self, v, path):
        return self.obj(v, path, TensorSpec, {
            "name": (self.s, _MISSING), "dtype": (self.s, _MISSING),
            "shape": (self.list_of(self.dim), _MISSING)})

    def fileref(self, v, path):
        return self.obj(v, path, FileRef, {"file": (self.s, _MISSING),
                                           "sha256": (self.s, _MISSING),
                                           "size": (self.i, None)})

    def tower(self, v, path):
        return self.obj(v, path, TowerSpec, {
            "file": (self.s, _MISSING), "sha256": (self.s, _MISSING),
            "precision": (self.s, _MISSING),
            "inputs": (self.list_of(self.tensor), _MISSING),
            "outputs": (self.list_of(self.tensor), _MISSING),
            "heads": (self.dict_of(self.list_of(self.s)), None),
            "external_data": (self.list_of(self.fileref), None),
            "bank": (self.s, None), "k": (self.i, None), "size": (self.i, None)})

    def towers(self, v, path):
        return self.obj(v, path, Towers, {"audio": (self.tower, _MISSING),
                                          "text": (self.tower, None),
                                          "tagger": (self.tower, None)})

    def clip(self, v, path):
        return self.obj(v, path, ClipPolicy, {
            "min_seconds": (self.f, _MISSING), "max_seconds": (self.f, _MISSING),
            "window_seconds": (self.f, _MISSING), "hop_seconds": (self.f, _MISSING),
            "bucket_seconds": (self.f, None)})

    def tokenizer(self, v, path):
        return self.obj(v, path, TokenizerSpec, {
            "file": (self.s, _MISSING), "sha256": (self.s, _MISSING),
            "max_length": (self.i, _MISSING), "pad_id": (self.i, None),
            "size": (self.i, None)})

    def bank(self, v, path):
        return self.obj(v, path, LabelBank, {
            "labels": (self.list_of(self.s), _MISSING), "file": (self.s, _MISSING),
            "sha256": (self.s, _MISSING),
            "prompts": (self.dict_of(self.list_of(self.s)), None),
            "multi_label": (self.b, None), "thresholds": (self.dict_of(self.f), None),
            "kind": (self.s, None), "values": (self.dict_of(self.f), None),
            "size": (self.i, None)})

    def shape_range(self, v, path):
        ints = self.list_of(self.i)
        return self.obj(v, path, ShapeRange, {"min": (ints, _MISSING), "opt": (ints, _MISSING),
                                              "max": (ints, _MISSING)})

    def engine(self, v, path):
        return self.obj(v, path, EngineSpec, {
            "file": (self.s, _MISSING), "sha256": (self.s, _MISSING),
            "tower": (self.s, _MISSING), "trt_version": (self.s, _MISSING),
            "gpu": (self.s, _MISSING),
            "profiles": (self.list_of(self.dict_of(self.shape_range)), None),
            "precision": (self.s, None), "size": (self.i, None),
            "context": (self.s, None), "context_sha256": (self.s, None),
            "context_size": (self.i, None)})

    def stream(self, v, path):
        return self.obj(v, path, StreamSpec, {
            "frontend": (self.tower, _MISSING), "encoder": (self.tower, _MISSING),
            "frame_stride": (self.i, _MISSING), "receptive_field": (self.i, _MISSING),
            "exact": (self.b, _MISSING), "boundary": (self.s, None),
            "max_abs_error": (self.f, None), "step": (self.tower, None),
            "causal_context": (self.i, None), "step_context": (self.i, None)})

    def native_frontend(self, v, path):
        return self.obj(v, path, NativeFrontEndSpec, {
            "file": (self.s, _MISSING), "sha256": (self.s, _MISSING), "size": (self.i, None),
            "quality": (self.d, None)})

    def model(self, v, path):
        return self.obj(v, path, ModelInfo, {"name": (self.s, _MISSING),
                                             "source_sha256": (self.s, None),
                                             "info": (self.d, None)})

    def manifest(self, data):
        return self.obj(data, "", Manifest, {
            "format_version": (self.s, _MISSING), "sample_rate": (self.i, _MISSING),
            "embed_dim": (self.i, _MISSING), "logit_scale": (self.f, _MISSING),
            "clip": (self.clip, _MISSING), "towers": (self.towers, _MISSING),
            "model": (self.model, _MISSING), "tokenizer": (self.tokenizer, None),
            "banks": (self.dict_of(self.bank), None), "default_bank": (self.s, None),
            "calibration": (self.d, None), "quality": (self.d, None),
            "engines": (self.list_of(self.engine), None),
            "stream": (self.stream, None),
            "native_frontend": (self.native_frontend, None)})


# --------------------------------------------------------------------------- files

def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read ``manifest.json`` (a bundle directory or the file itself); one larger than
    ``MAX_MANIFEST_BYTES`` is refused unread."""
    p = _manifest_path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            text = f.read(MAX_MANIFEST_BYTES + 1) if size <= MAX_MANIFEST_BYTES else b""
        if size > MAX_MANIFEST_BYTES or len(text) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{p}: too large for a manifest (over {MAX_MANIFEST_BYTES} "
                              f"bytes); is it a manifest?")
    except FileNotFoundError:
        raise BundleError(f"{p}: no manifest here; is this a clapedge bundle directory?") \
            from None
    except OSError as e:
        raise BundleError(f"{p}: cannot read the manifest ({e.strerror})") from None
    return Manifest.from_json(text, source=str(p))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically (temp file + fsync + rename) as sorted, indented JSON.

    ``path`` is the bundle directory or the manifest file. Returns the file written.
    """
    p = _manifest_path(path)
    text = manifest.to_json()
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: other users could not load
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(p.parent, os.O_RDONLY)
    except OSError:
        return p
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems do not fsync directories; the rename is still atomic
    finally:
        os.close(dir_fd)
    return p
