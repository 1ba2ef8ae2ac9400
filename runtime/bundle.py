"""Loading a bundle: manifest, checksums, path containment, lazy ONNX Runtime sessions.

``Bundle.load(path)`` reads and validates the manifest and creates the audio tower's session;
the text tower, the tagger, the tokenizer and the label banks are opened on first use (a
device that only tags never pays for the text tower). Every file is checked when opened:

- its path must stay inside the bundle (no absolute paths, no ``..``, no symlink pointing
  outside), and so must every ONNX external-data location the model references, each of
  which must also be listed in the tower's ``external_data`` with its sha256;
- its size must match the manifest where the manifest records one (format 1.1), checked
  before the file is read; files read whole (tokenizer, banks) are bounded even without;
- its sha256 must match the manifest (``BundleError`` names the file, expected and actual);
- a tower must be a well-formed ONNX protobuf of at most 2 GiB whose external data lies
  within its files and whose sparse tensors densify to at most 64 MiB
  (``onnx_external.scan_model``; docs/reliability.md lists what is refused and how fast).

A tower is memory-mapped once for its checksum and its external-data check, and ONNX Runtime
creates the session from the same path while the hash runs beside it. The checksums catch
corrupt, truncated or modified files; they are not a signature (whoever can write the bundle
can rewrite its manifest too). ``.npy`` banks are read with ``allow_pickle=False``.

Cache directory (``cache_dir``, optional; nothing is written without it):

- ``verified-files.json``: files that hashed correctly, keyed by their identity (device,
  inode, size, mtime, ctime); an untouched file is not hashed again on the next load, any
  change to it is (see ``checksums``). This keeps cold loads of large towers fast.
- ``<role>-<sha256[:16]>-ort<version>.onnx``: for CPU-only sessions, the graph ONNX Runtime
  optimised on the first load, loaded on later runs with graph optimisation off (it helps
  towers whose load is dominated by graph fusions). Keyed by the model's checksum and the
  ONNX Runtime version.
- ``tensorrt/``: the TensorRT EP's engine and timing caches (building an engine takes
  minutes).

Delete the directory to clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import onnxruntime as ort

from clapedge.errors import BundleError
from clapedge.runtime import engines
from clapedge.runtime import providers as prov
from clapedge.runtime.checksums import VerifiedFiles, mapped
from clapedge.runtime.manifest import (ATTENTION_MASK, FRAMES, MANIFEST_NAME, WAVEFORM, Manifest,
                                       TowerSpec, read_manifest)
from clapedge.runtime.onnx_external import OnnxParseError, scan_model
from clapedge.runtime.tokenizer import TextTokenizer

log = logging.getLogger("clapedge.runtime")

# protobuf cannot parse a message over 2 GiB; onnxruntime refuses such a model anyway.
MAX_MODEL_BYTES = (2 << 30) - 1
# onnxruntime densifies sparse tensors at load: a few bytes of file can declare gigabytes.
MAX_SPARSE_DENSE_BYTES = 64 << 20
# Files read whole into memory, when the manifest (format 1.0) records no size: a tokenizer
# file is a few MB; a bank is n_labels x embed_dim floats plus a header.
MAX_TOKENIZER_BYTES = 256 << 20
_NPY_SLACK = 1 << 16

_state = ort.capi.onnxruntime_pybind11_state
_ORT_LOAD_ERRORS = (_state.Fail, _state.InvalidGraph, _state.InvalidArgument, _state.NoSuchFile,
                    _state.InvalidProtobuf, _state.NotImplemented, _state.EPFail)

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class Tower:
    """One ONNX Runtime session plus its manifest spec; ``run`` casts inputs to the dtypes
    the model declares and returns float outputs as float32."""

    def __init__(self, role: str, spec: TowerSpec, session: ort.InferenceSession, path: Path):
        self.role, self.spec, self.session, self.path = role, spec, session, path
        self.input_dtypes = {i.name: _ORT_DTYPES.get(i.type, i.type)
                             for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self._check_io()

    def _check_io(self) -> None:
        """The session's I/O must match the manifest (names and dtypes)."""
        declared_in = {s.name: s.dtype for s in self.spec.inputs}
        declared_out = {s.name: s.dtype for s in self.spec.outputs}
        actual_out = {o.name: _ORT_DTYPES.get(o.type, o.type)
                      for o in self.session.get_outputs()}
        for kind, declared, actual in (("input", declared_in, self.input_dtypes),
                                       ("output", declared_out, actual_out)):
            for name, dtype in declared.items():
                if name not in actual:
                    raise BundleError(f"{self.path}: the manifest names {kind} {name!r} but "
                                      f"the model has {sorted(actual)}")
                if actual[name] != dtype:
                    raise BundleError(f"{self.path}: {kind} {name!r} is {actual[name]} in the "
                                      f"model but {dtype} in the manifest")
        extra = sorted(set(self.input_dtypes) - set(declared_in))
        if extra:
            raise BundleError(f"{self.path}: model inputs {extra} are not in the manifest")

    def has_input(self, name: str) -> bool:
        return name in self.input_dtypes

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(value, dtype=self.input_dtypes[name])
                for name, value in feeds.items() if name in self.input_dtypes}
        names = list(outputs) if outputs is not None else self.output_names
        result = self.session.run(names, feed)
        return {name: (value.astype(np.float32) if value.dtype == np.float16 else value)
                for name, value in zip(names, result)}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def threads(self) -> int:
        """Intra-op threads of the session."""
        return int(self.session.get_session_options().intra_op_num_threads)


NATIVE_ENV = "CLAPEDGE_NATIVE_FRONTEND"  # "0": never run the native front end
MAX_NATIVE_FRONTEND_BYTES = 256 << 20


class _NativeTower:
    """What the native towers share with ``Tower``: waveform (+ mask) inputs."""

    input_dtypes = {WAVEFORM: "float32", ATTENTION_MASK: "int64"}

    def has_input(self, name: str) -> bool:
        return name in self.input_dtypes


class NativeFrontendTower(_NativeTower):
    """The split's front end (``stream.frontend``) computed by the native kernel
    (``kernels/frontend.py``): the same ``run`` contract as the ONNX one. The kernel is
    frame-local (each frame's int8 rounding reads only its own inputs), so frames computed
    for a stream's new samples equal those of the whole window, as with the ONNX front end
    of a LayerNorm conv stack."""

    def __init__(self, spec: TowerSpec, front, path: Path, level: str, threads: int | None):
        self.role, self.spec, self.front, self.path, self.level = (
            "audio_frontend", spec, front, path, level)
        self.threads = threads or prov.physical_cores()  # as the ONNX sessions
        self.output_names = [FRAMES]

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        wave = np.ascontiguousarray(feeds[WAVEFORM], dtype=np.float32)
        mask = feeds.get(ATTENTION_MASK)
        lengths = None if mask is None else np.asarray(mask, np.int64).sum(axis=1)
        return {FRAMES: self.front(wave, lengths, threads=self.threads, simd_level=self.level)}

    @property
    def providers(self) -> list[str]:
        return [f"clapedge native front end ({self.level})"]


class NativeAudioTower(_NativeTower):
    """The audio tower of an INT8 bundle as the native front end + the split's
    ``audio_encoder.onnx``: the same inputs, outputs and ``run`` as the ``Tower`` of
    ``audio.onnx`` (``waveform`` right-padded, ``attention_mask``)."""

    def __init__(self, spec: TowerSpec, frontend: NativeFrontendTower, encoder: Tower):
        self.role, self.spec, self.frontend, self.encoder = "audio", spec, frontend, encoder
        self.path = frontend.path
        self.output_names = list(encoder.output_names)

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        wave = np.ascontiguousarray(feeds[WAVEFORM], dtype=np.float32)
        mask = feeds.get(ATTENTION_MASK)
        mask = (np.ones(wave.shape, np.int64) if mask is None
                else np.ascontiguousarray(mask, dtype=np.int64))
        frames = self.frontend.run({WAVEFORM: wave, ATTENTION_MASK: mask})[FRAMES]
        return self.encoder.run({FRAMES: frames, ATTENTION_MASK: mask}, outputs)

    @property
    def providers(self) -> list[str]:
        return self.frontend.providers + self.encoder.providers

    @property
    def threads(self) -> int:
        return self.frontend.threads


class Bundle:
    """A loaded bundle. Use ``Bundle.load``; sessions and banks are created on first use and
    shared by all threads (creation is guarded by a lock, ``run`` is thread-safe)."""

    def __init__(self, root: Path, manifest: Manifest, choice: prov.ProviderChoice,
                 threads: int | None, cache_dir: Path | None):
        self.root = root
        self.manifest = manifest
        self.provider_choice = choice
        self.threads = threads
        self.cache_dir = cache_dir
        self.load_times: dict[str, float] = {}
        self._towers: dict[str, Tower] = {}
        self._banks: dict[str, np.ndarray] = {}
        self._tokenizer: TextTokenizer | None = None
        self._verified = VerifiedFiles(cache_dir)
        self._lock = threading.RLock()

    @classmethod
    def load(cls, path: str | os.PathLike, providers: str | Sequence[str] = "auto",
             threads: int | None = None, *, cache_dir: str | os.PathLike | None = None,
             preload: Sequence[str] = ("audio",)) -> "Bundle":
        """Open the bundle at ``path`` (a directory with ``manifest.json``).

        ``providers``: "auto" or an explicit list (see ``providers.choose_providers``).
        ``threads``: intra-op threads per session (None: physical cores, one for the text
        tower, see ``threads_for``).
        ``cache_dir``: optional directory for the checksum record and the optimised-model
        and TensorRT caches (see the module docstring).
        ``preload``: towers to create now (the rest are created on first use).
        """
        t0 = time.perf_counter()
        root = Path(path)
        if not root.is_dir():
            if root.name == MANIFEST_NAME and root.is_file():
                root = root.parent
            else:
                raise BundleError(f"{root}: not a bundle directory (expected a directory "
                                  f"with {MANIFEST_NAME})")
        manifest = read_manifest(root)
        prov.session_options(threads)  # validates ``threads`` before any work
        choice = prov.choose_providers(providers)
        for name, reason in choice.skipped:
            log.info("%s skipped: %s", name, reason)
        bundle = cls(root, manifest, choice, threads,
                     Path(cache_dir) if cache_dir is not None else None)
        bundle.load_times["manifest"] = time.perf_counter() - t0
        for role in preload:
            bundle.tower(role)
        bundle.load_times["load"] = time.perf_counter() - t0
        return bundle

    # -- files

    def resolve(self, rel: str, base: Path | None = None, what: str = "file") -> Path:
        """The path of ``rel`` (relative to ``base``, default the bundle root), refused when
        it is absolute, uses ``..`` or resolves (through symlinks) outside the bundle."""
        base = self.root if base is None else base
        if "\0" in rel:
            raise BundleError(f"{self.root}: {what} path {rel!r} contains a NUL character")
        if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) \
                or PurePosixPath(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
            raise BundleError(f"{self.root}: {what} path {rel!r} is absolute; bundle files "
                              f"must be relative to the bundle")
        if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
            raise BundleError(f"{self.root}: {what} path {rel!r} uses '..'; bundle files must "
                              f"stay inside the bundle")
        full = base / rel
        real, root_real = full.resolve(), self.root.resolve()
        if real != root_real and root_real not in real.parents:
            raise BundleError(f"{full}: {what} resolves to {real}, outside the bundle "
                              f"{root_real} (a symlink pointing out of the bundle?)")
        return full

    def _read(self, rel: str, what: str, size: int | None, limit: int) -> tuple[Path, bytes]:
        """Read a small bundle file whole: its declared ``size`` (when the manifest has one)
        or else ``limit`` bounds what is read."""
        path = self.resolve(rel, what=what)
        try:
            with open(path, "rb") as f:
                actual = os.fstat(f.fileno()).st_size
                self._check_size(path, what, actual, size)
                if actual > limit:
                    raise BundleError(f"{path}: {what} has {actual} bytes, more than a "
                                      f"{what} can need ({limit}); the bundle is corrupt")
                return path, f.read(limit + 1)
        except FileNotFoundError:
            raise BundleError(f"{path}: {what} named in the manifest is missing") from None
        except IsADirectoryError:
            raise BundleError(f"{path}: {what} is a directory, not a file") from None
        except OSError as e:
            raise BundleError(f"{path}: cannot read {what} ({e.strerror or e})") from None

    @staticmethod
    def _check_size(path: Path, what: str, actual: int, declared: int | None) -> None:
        if declared is not None and actual != declared:
            raise BundleError(f"{path}: {what} has {actual} bytes but the manifest says "
                              f"{declared}; the file was truncated, extended or replaced")

    @staticmethod
    def _verify(path: Path, actual: str, expected: str) -> None:
        if actual != expected:
            raise BundleError(f"{path}: checksum mismatch (expected sha256 {expected}, got "
                              f"{actual}); the bundle is corrupt or was modified")

    def read_verified(self, rel: str, sha256: str, what: str = "file", size: int | None = None,
                      limit: int = MAX_TOKENIZER_BYTES) -> tuple[Path, bytes]:
        """Read a bundle file (at most ``limit`` bytes) and check its size and sha256
        against the manifest."""
        path, data = self._read(rel, what, size, limit)
        self._verify(path, hashlib.sha256(data).hexdigest(), sha256)
        return path, data

    # -- towers

    # The streaming split's halves (manifest ``stream``) open like towers under these roles.
    STREAM_ROLES = {"audio_frontend": "frontend", "audio_encoder": "encoder",
                    "audio_step": "step"}

    def _spec(self, role: str) -> TowerSpec | None:
        if role in self.STREAM_ROLES:
            stream = self.manifest.stream
            return None if stream is None else getattr(stream, self.STREAM_ROLES[role])
        return getattr(self.manifest.towers, role, None)

    def has_tower(self, role: str) -> bool:
        return self._spec(role) is not None

    def tower(self, role: str) -> Tower:
        """The tower's session, created on first use."""
        tower = self._towers.get(role)
        if tower is not None:
            return tower
        with self._lock:
            if role not in self._towers:
                spec = self._spec(role)
                if spec is None:
                    raise BundleError(f"{self.root}: the bundle has no {role} tower")
                t0 = time.perf_counter()
                self._towers[role] = self._open_tower(role, spec)
                self.load_times[role] = time.perf_counter() - t0
                log.info("%s tower (%s, %s): %s in %.1f ms", role, spec.file, spec.precision,
                         " > ".join(self._towers[role].providers),
                         1e3 * self.load_times[role])
            return self._towers[role]

    @contextlib.contextmanager
    def _mapped(self, path: Path, what: str, size: int | None = None,
                limit: int | None = None):
        """``checksums.mapped`` with open errors turned into ``BundleError`` (errors raised
        by the body pass through untouched), after checking the declared ``size`` and the
        ``limit``."""
        opened = mapped(path)
        try:
            actual = os.stat(path).st_size
            self._check_size(path, what, actual, size)
            if limit is not None and actual > limit:
                raise BundleError(f"{path}: {what} has {actual} bytes; an ONNX model file holds "
                                  f"at most {limit} (protobuf's limit; larger models keep "
                                  f"their weights in external data)")
            buf = opened.__enter__()
        except FileNotFoundError:
            raise BundleError(f"{path}: {what} named in the manifest is missing") from None
        except IsADirectoryError:
            raise BundleError(f"{path}: {what} is a directory, not a file") from None
        except OSError as e:
            raise BundleError(f"{path}: cannot read {what} ({e.strerror or e})") from None
        try:
            yield buf
        finally:
            opened.__exit__(None, None, None)

    def _verify_file(self, rel: str, sha256: str, what: str, size: int | None = None) -> Path:
        """Check a possibly large file's size and sha256 without reading it into memory."""
        path = self.resolve(rel, what=what)
        known, identity = self._verified.check(path, sha256)
        if not known:
            with self._mapped(path, what, size) as buf:
                actual = hashlib.sha256(buf).hexdigest()
            self._verify(path, actual, sha256)
            self._verified.remember(path, identity, actual)
        return path

    # Text inputs are a few dozen tokens: one intra-op thread is faster than two, whose
    # per-op hand-offs cost more than they save (all-MiniLM-L6-v2, one 12-token prompt, this
    # 2-core machine: fp32 6.6 vs 7.6 ms, INT8 3.2 vs 5.5 ms), and it leaves the other core
    # to whatever runs beside (the top-k kernel of a search). Pass ``threads`` for large
    # fp32 caption batches.
    SINGLE_THREAD_ROLES = ("text",)

    def threads_for(self, role: str) -> int | None:
        """Intra-op threads of the tower ``role`` (None: physical cores). A causal stream's
        step (a hop's few frames) always runs on one: default model, 25 frames, INT8,
        1.98 ms CPU on one thread vs 2.93 ms (2.28 ms wall) on two."""
        if role == "audio_step":
            return 1
        if self.threads is None and role in self.SINGLE_THREAD_ROLES:
            return 1
        return self.threads

    def _open_engine(self, role: str, spec: TowerSpec) -> Tower | None:
        """The tower on its prebuilt TensorRT plan (runtime/engines.py), or None, with a log
        line saying why, when the plan does not fit this process or the EP refuses it."""
        engine = engines.engine_for(self.manifest, role)
        if engine is None or self.provider_choice.providers[0] != prov.TENSORRT:
            return None
        problem = engines.plan_problem(engine, self.manifest,
                                       trt_version=engines.tensorrt_version(),
                                       gpu=engines.gpu_name())
        if problem is None:
            self._verify_file(engine.file, engine.sha256, "TensorRT engine", engine.size)
            ctx = self._verify_file(engine.context, engine.context_sha256,
                                    "TensorRT context model", engine.context_size)
            options = prov.provider_options(prov.TENSORRT, precision=spec.precision,
                                            cache_dir=self.cache_dir)
            try:
                session = ort.InferenceSession(
                    str(ctx), prov.session_options(self.threads_for(role)),
                    providers=[(prov.TENSORRT, options)])
            except _ORT_LOAD_ERRORS as e:
                problem = f"the TensorRT EP refused it ({str(e).splitlines()[0][:200]})"
            else:
                self._check_metadata(ctx, session)
                log.info("%s tower: prebuilt TensorRT engine %s (TensorRT %s, %s)", role,
                         engine.file, engine.trt_version, engine.gpu)
                return Tower(role, spec, session, ctx)
        log.warning("%s tower: not using the prebuilt engine %s: %s; running %s instead "
                    "(the TensorRT EP builds and caches its own engine)", role, engine.file,
                    problem, spec.file)
        return None

    def native_problem(self) -> str | None:
        """Why the audio tower does not run on the native front end here (None: it does)."""
        m = self.manifest
        if m.native_frontend is None or m.stream is None:
            return "the bundle has no native front end (INT8 bundles of format 1.5 have one)"
        if os.environ.get(NATIVE_ENV, "").strip() == "0":
            return f"{NATIVE_ENV}=0"
        if self.provider_choice.providers[0] != prov.CPU:
            return f"{self.provider_choice.providers[0]} runs the whole audio tower"
        try:
            from clapedge.kernels import frontend, simd
        except ImportError as e:
            return f"the native kernels module is not importable ({e})"
        level = simd.simd_level()
        if level not in frontend.FAST_LEVELS:
            return (f"SIMD level {level}: the native front end is faster than audio.onnx only "
                    f"with {' or '.join(frontend.FAST_LEVELS)}")
        return None

    def _open_native_frontend(self, spec: TowerSpec) -> NativeFrontendTower | None:
        problem = self.native_problem()
        if problem is not None:
            if self.manifest.native_frontend is not None:
                log.info("audio front end: not using the native kernel: %s; running %s",
                         problem, spec.file)
            return None
        from clapedge.kernels import frontend, simd

        nf = self.manifest.native_frontend
        path, data = self.read_verified(nf.file, nf.sha256, "native front end", nf.size,
                                        limit=MAX_NATIVE_FRONTEND_BYTES)
        try:
            front = frontend.NativeFrontEnd.load(path, data)
        except frontend.FrontEndFileError as e:
            raise BundleError(str(e)) from None
        if front.out_channels != spec.outputs[0].shape[2]:
            raise BundleError(f"{path}: the native front end gives {front.out_channels} "
                              f"channels, the split's encoder reads {spec.outputs[0].shape[2]}")
        return NativeFrontendTower(spec, front, path, simd.simd_level(),
                                   self.threads_for("audio"))

    def _open_tower(self, role: str, spec: TowerSpec) -> Tower:
        if role == "audio_frontend":
            native = self._open_native_frontend(spec)
            if native is not None:
                return native
        if role == "audio" and self.native_problem() is None:
            front = self.tower("audio_frontend")
            if isinstance(front, NativeFrontendTower):
                return NativeAudioTower(spec, front, self.tower("audio_encoder"))
        engine_tower = self._open_engine(role, spec)
        if engine_tower is not None:
            return engine_tower
        what = f"{role} tower"
        path = self.resolve(spec.file, what=what)
        with self._mapped(path, what, spec.size, MAX_MODEL_BYTES) as buf:
            known, identity = self._verified.check(path, spec.sha256)
            # Hashing a large tower costs about as much as creating its session, so the two
            # run side by side (hashlib releases the GIL); a mismatch still wins over
            # anything onnxruntime says about the file. ONNX Runtime loads from the path,
            # which is faster than from bytes.
            with ThreadPoolExecutor(max_workers=1) as pool:
                digest = None if known else pool.submit(
                    lambda: hashlib.sha256(buf).hexdigest())
                try:
                    session, error = self._create_session(role, spec, path, buf), None
                except BundleError as e:
                    session, error = None, e
                if digest is not None:
                    actual = digest.result()
                    self._verify(path, actual, spec.sha256)
                    self._verified.remember(path, identity, actual)
        if error is not None:
            raise error
        self._check_metadata(path, session)
        wanted = self.provider_choice.providers[0]
        if wanted not in session.get_providers():
            log.warning("%s tower: %s was requested but onnxruntime could not enable it "
                        "(see its log; missing CUDA/TensorRT libraries?); running on %s",
                        role, wanted, " > ".join(session.get_providers()))
        return Tower(role, spec, session, path)

    def _check_metadata(self, path: Path, session: ort.InferenceSession) -> None:
        """A tower may describe itself in ONNX ``metadata_props`` (see ``manifest``); where
        it does, it must agree with the manifest."""
        props = session.get_modelmeta().custom_metadata_map
        for key in ("sample_rate", "embed_dim"):
            if key in props and props[key].strip() != str(getattr(self.manifest, key)):
                raise BundleError(f"{path}: the model's metadata says {key}={props[key]} but "
                                  f"the manifest says {getattr(self.manifest, key)}")

    def _create_session(self, role: str, spec: TowerSpec, path: Path,
                        data) -> ort.InferenceSession:
        has_external = self._check_model(path, data, spec)
        so = prov.session_options(self.threads_for(role))
        providers = [(name, prov.provider_options(name, precision=spec.precision,
                                                  cache_dir=self.cache_dir))
                     for name in self.provider_choice.providers]
        cached = None
        if self.cache_dir is not None and not has_external \
                and self.provider_choice.providers == (prov.CPU,):
            cached = self.cache_dir / f"{role}-{spec.sha256[:16]}-ort{ort.__version__}.onnx"
        try:
            if cached is not None and cached.is_file():
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                return ort.InferenceSession(str(cached), so, providers=providers)
            if cached is not None:
                return self._create_and_cache(path, so, providers, cached)
            return ort.InferenceSession(str(path), so, providers=providers)
        except _ORT_LOAD_ERRORS as e:
            raise BundleError(f"{path}: onnxruntime cannot load the {role} tower: {e}") from None

    def _create_and_cache(self, path: Path, so: ort.SessionOptions, providers,
                          cached: Path) -> ort.InferenceSession:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a cache that cannot be written only costs speed
            log.warning("cannot create the cache directory %s: %s", cached.parent, e)
            return ort.InferenceSession(str(path), so, providers=providers)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        so.optimized_model_filepath = str(tmp)
        session = ort.InferenceSession(str(path), so, providers=providers)
        try:
            os.replace(tmp, cached)
        except OSError as e:  # a cache that cannot be written only costs speed
            log.warning("cannot write the optimised-model cache %s: %s", cached, e)
            tmp.unlink(missing_ok=True)
        return session

    def _check_model(self, path: Path, data, spec: TowerSpec) -> bool:
        """Refuse what would make ONNX Runtime read outside the bundle or allocate far more
        than the file holds: external-data references that escape the bundle, are not in
        the manifest (whose checksums are then verified) or run past the end of their file,
        and sparse tensors whose dense form exceeds ``MAX_SPARSE_DENSE_BYTES``. Returns
        whether the model has external data."""
        try:
            scan = scan_model(data)
        except OnnxParseError as e:
            raise BundleError(f"{path}: not a valid ONNX model ({e})") from None
        for sparse in scan.sparse:
            if sparse.dense_bytes > MAX_SPARSE_DENSE_BYTES:
                raise BundleError(
                    f"{path}: sparse tensor {sparse.tensor!r} of shape {list(sparse.dims)[:8]} "
                    f"would take {sparse.dense_bytes} bytes once densified by onnxruntime "
                    f"(limit {MAX_SPARSE_DENSE_BYTES}); refusing the model")
        if not scan.external:
            return False
        listed = {os.path.normpath(x.file): x for x in spec.external_data}
        model_dir_rel = PurePosixPath(spec.file).parent
        checked: dict[str, int] = {}
        for ref in scan.external:
            if not ref.location:
                raise BundleError(f"{path}: tensor {ref.tensor!r} is marked as external data "
                                  f"but names no location")
            full = self.resolve(ref.location, base=path.parent, what="external data")
            rel = os.path.normpath(str(model_dir_rel / ref.location))
            if rel not in listed:
                raise BundleError(f"{path}: external data file {ref.location!r} is not listed "
                                  f"in the manifest's external_data for this tower")
            if rel not in checked:
                entry = listed[rel]
                self._verify_file(entry.file, entry.sha256, "external data", entry.size)
                checked[rel] = full.stat().st_size
            size, offset = checked[rel], ref.offset or 0
            end = offset + (ref.length if ref.length is not None else 0)
            if offset > size or end > size:
                span = f"offset {offset}" + (f" + length {ref.length}"
                                             if ref.length is not None else "")
                raise BundleError(f"{full}: external data of tensor {ref.tensor!r} at {span} "
                                  f"runs past the end of the file ({size} bytes); the model "
                                  f"or its data file is corrupt")
        return True

    # -- banks and tokenizer

    def bank(self, name: str) -> np.ndarray:
        """The bank's float32 [n_labels, embed_dim] matrix (rows L2-normalised)."""
        matrix = self._banks.get(name)
        if matrix is not None:
            return matrix
        spec = self.manifest.banks.get(name)
        if spec is None:
            raise BundleError(f"{self.root}: no label bank {name!r}; the bundle has "
                              f"{sorted(self.manifest.banks)}")
        with self._lock:
            if name not in self._banks:
                limit = len(spec.labels) * self.manifest.embed_dim * 8 + _NPY_SLACK
                path, data = self.read_verified(spec.file, spec.sha256, f"bank {name!r}",
                                                spec.size, limit)
                self._banks[name] = self._parse_bank(path, data, len(spec.labels))
            return self._banks[name]

    def _parse_bank(self, path: Path, data: bytes, n_labels: int) -> np.ndarray:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BundleError(f"{path}: not a readable .npy array ({e})") from None
        dim = self.manifest.embed_dim
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f" \
                or arr.shape != (n_labels, dim):
            raise BundleError(f"{path}: expected a float array of shape ({n_labels}, {dim}), "
                              f"got {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        norms = np.linalg.norm(arr, axis=1)
        if not np.all(np.isfinite(arr)) or np.any(np.abs(norms - 1.0) > 1e-2):
            raise BundleError(f"{path}: bank rows must be finite and L2-normalised "
                              f"(norms {norms.min():.3f}..{norms.max():.3f})")
        arr.setflags(write=False)
        return arr

    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            spec = self.manifest.tokenizer
            if spec is None:
                raise BundleError(f"{self.root}: the bundle has no tokenizer")
            with self._lock:
                if self._tokenizer is None:
                    path, data = self.read_verified(spec.file, spec.sha256, "tokenizer",
                                                    spec.size)
                    self._tokenizer = TextTokenizer(data, spec, str(path))
        return self._tokenizer

    def __repr__(self) -> str:
        m = self.manifest
        towers = ", ".join(f"{r}={t.precision}" for r, t in m.towers.items())
        return (f"Bundle({str(self.root)!r}, model={m.model.name!r}, {towers}, "
                f"banks={sorted(m.banks)}, providers={list(self.provider_choice.providers)})")
