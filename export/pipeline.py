"""``export_bundle``: a ClapModel directory -> a verified, optionally INT8 bundle.

Steps (each reported): load the model; trace each tower (the audio tower with its conv front
end rewritten as GEMMs, see ``rewrite``); fuse; check parity with PyTorch; quantize (INT8:
static QDQ audio tower calibrated at the deployment lengths, dynamic per-channel text tower;
or fp16); measure quality against fp32 (centred cosine per length and the task metrics of
``clap-eval`` when labels exist) and, over ``max_drop``, keep the most sensitive nodes in
float until it fits; encode label banks; bake the tagger; write everything into a temporary
directory renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from clapedge.calib.readers import CalibItem, decode_items, read_source
from clapedge.calib.sampling import class_balanced, length_buckets
from clapedge.errors import ClapEdgeError, ConfigError
from clapedge.export import graph, quantize, stream_split
from clapedge.export.banks import BankSource, builtin_banks, encode_bank, read_bank_file
from clapedge.export.errors import AccuracyBudgetError, ExportError
from clapedge.export.onnx_export import AxisSpec, export_module
from clapedge.export.parity import centred_cosine, check_parity
from clapedge.export.gptq import gptq_weights
from clapedge.export.rewrite import with_gemm_front_end
from clapedge.export.tagger import build_tagger
from clapedge.export.towers import AudioGraph, TextGraph
from clapedge.runtime import manifest as mf

log = logging.getLogger("clapedge.export")

Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class ExportOptions:
    """Every knob of ``clap-export`` (the CLI flags map one to one onto these fields)."""

    precision: Precision = "int8"
    calib: Path | None = None
    eval_data: Path | None = None
    calib_method: quantize.CalibMethod = "percentile"
    calib_lengths: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    calib_clips: int = 6  # per length
    max_drop: float | None = 0.005
    target: quantize.Target = "cpu"
    banks: str = "corpus"
    bank_files: tuple[tuple[str, Path], ...] = ()
    tagger_bank: str | None = None
    tagger_k: int = 3
    tagger: bool = True  # also write tagger.onnx (a second copy of the audio weights)
    min_seconds: float = 0.5
    max_seconds: float = 20.0
    window_seconds: float = 10.0
    hop_seconds: float = 5.0
    gemm_front_end: bool = True
    min_k: int = 64  # smallest GEMM reduction dim worth quantizing
    front_end: str = "rowwise"  # conv front end GEMMs: rowwise | static | float
    gemm: str | None = None  # other weight GEMMs: dynamic | rowwise | static (None: by target)
    rounding: str = "gptq"  # weight rounding of the dynamic GEMMs: gptq | nearest
    force: bool = False
    seed: int = 0
    native_frontend: bool = True  # INT8 + split: also write the native front end
    stream_split: bool = True  # also write the streaming split (export/stream_split.py;
    # a third copy of the audio weights)

    def quant_config(self, keep_float: tuple[str, ...] = ()) -> quantize.QuantConfig:
        return quantize.QuantConfig(
            method=self.calib_method, target=self.target, keep_float=keep_float,
            min_k=self.min_k, front_end=self.front_end, rounding=self.rounding,
            gemm=self.gemm or ("static" if self.target == "tensorrt" else "dynamic"))

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"precision {self.precision!r}: use fp32, fp16 or int8")
        if self.precision == "int8" and self.calib is None:
            raise ConfigError("--int8 needs calibration audio: pass --calib AUDIO_DIR_OR_MANIFEST")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"max_drop {self.max_drop}: must be in [0, 1)")
        if self.calib_clips < 1 or not self.calib_lengths or min(self.calib_lengths) <= 0:
            raise ConfigError("calibration needs >= 1 clip per length and positive lengths")
        if self.tagger_k < 1:
            raise ConfigError(f"tagger_k {self.tagger_k}: must be >= 1")
        mf.ClipPolicy(self.min_seconds, self.max_seconds, self.window_seconds, self.hop_seconds)
        if not (self.target == "tensorrt" and self.front_end == "rowwise"):
            self.quant_config()  # validates the quantization knobs together
        if self.target == "tensorrt" and self.front_end == "rowwise":
            raise ConfigError("--target tensorrt needs --front-end static or float (TensorRT "
                              "takes explicit Q/DQ, not MatMulInteger)")


Progress = Callable[[str], None]


@dataclass
class ExportReport:
    bundle: str
    precision: str
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step
    parity: dict = field(default_factory=dict)
    fusions: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    stream: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _load_model(model_dir: Path):
    from clapedge.models.clap import ClapModel

    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a model directory (no config.json); convert a "
                          f"checkpoint first with clap-convert")
    return ClapModel.from_dir(model_dir).eval()


def _tokenizer(model, model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json; the text tower cannot be exported "
                          f"without its tokenizer")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    max_length = model.config.tokenizer.max_length if model.config.tokenizer else 512
    tok.enable_truncation(max_length)
    return tok, max_length


def _pad_id(model) -> int:
    return int(getattr(model.text_branch.base.config, "pad_token_id", 0) or 0)


def tokenize(tok, texts: list[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tok.encode_batch(list(texts))
    width = max(len(e.ids) for e in enc)
    ids = np.full((len(enc), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(enc), width), dtype=np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def text_calibration_feeds(model, model_dir: Path, calib: Path | None, banks,
                           limit: int = 256, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Prompts for the text tower's SmoothQuant statistics, each tokenized alone: up to
    ``limit`` captions of the calibration manifest's train rows (a clap-corpus), the label
    banks' prompts, and ``TEXT_PROBES``."""
    tok, pad = _tok_pad(model, model_dir)
    texts: list[str] = []
    if calib is not None:
        items = read_source(calib)  # an audio directory has no captions: bank prompts only
        caps = sorted({c for it in items if it.split in ("train", None) for c in it.captions}
                      or {c for it in items for c in it.captions})
        if len(caps) > limit:
            pick = np.random.default_rng(seed).choice(len(caps), limit, replace=False)
            caps = [caps[i] for i in sorted(pick)]
        texts += caps
    for source, _ in banks.values():
        texts += [p for prompts in source.prompts.values() for p in prompts]
    texts += TEXT_PROBES
    feeds = []
    for text in dict.fromkeys(texts):
        ids, mask = tokenize(tok, [text], pad)
        feeds.append({mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask})
    return feeds


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def _audio_cases(sample_rate: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Fresh, non-zero inputs of several lengths and batch sizes, with padding."""
    rng = np.random.default_rng(seed + 1234)

    def batch(lengths: list[int]) -> dict[str, np.ndarray]:
        width = max(lengths)
        wave = np.zeros((len(lengths), width), dtype=np.float32)
        mask = np.zeros((len(lengths), width), dtype=np.int64)
        for i, n in enumerate(lengths):
            t = np.arange(n) / sample_rate
            wave[i, :n] = (0.1 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t))
            mask[i, :n] = 1
        return {"waveform": wave, "attention_mask": mask}

    sr = sample_rate
    return {"1x1.0s": batch([sr]), "2x(2.5s,1.7s padded)": batch([int(2.5 * sr), int(1.7 * sr)]),
            "3x(0.6s,3.1s,2.0s padded)": batch([int(0.6 * sr), int(3.1 * sr), 2 * sr])}


TEXT_PROBES = ["A calm, low-pitched female voice, whispering.",
               "fast, loud, high-pitched male speech with a Scottish accent",
               "A person is speaking in a happy style.", "neutral"]


class _Exporter:
    def __init__(self, model_dir: Path, out_dir: Path, opts: ExportOptions,
                 progress: Progress | None) -> None:
        self.model_dir, self.out_dir, self.opts = model_dir, out_dir, opts
        self.progress = progress or (lambda message: log.info(message))
        self.report = ExportReport(bundle=str(out_dir), precision=opts.precision)

    def step(self, name: str):
        exporter = self

        class _Timer:
            def __enter__(self):
                exporter.progress(name)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                exporter.report.steps[name] = round(time.perf_counter() - self.t0, 2)

        return _Timer()

    # ------------------------------------------------------------------ towers

    def export_audio(self, model, work: Path) -> Path:
        sr = model.config.sample_rate
        traced = with_gemm_front_end(model) if self.opts.gemm_front_end else model
        heads = [h.name for h in model.config.heads]
        outputs = [mf.EMBEDDING] + [mf.HEAD_PREFIX + h for h in heads]
        example = _audio_cases(sr, self.opts.seed)["2x(2.5s,1.7s padded)"]
        axes = {0: AxisSpec("batch"), 1: AxisSpec("samples", minimum=sr // 20, maximum=sr * 3600)}
        raw = work / "audio.raw.onnx"
        export_module(AudioGraph(traced), (torch.from_numpy(example["waveform"]),
                                           torch.from_numpy(example["attention_mask"])), raw,
                      input_names=[mf.WAVEFORM, mf.ATTENTION_MASK], output_names=outputs,
                      dynamic={mf.WAVEFORM: axes, mf.ATTENTION_MASK: axes},
                      metadata=self.metadata(model, "audio"), what="audio tower")
        fused = work / "audio.fp32.onnx"
        cfg = model.audio_branch.base.config
        self.report.fusions["audio"] = graph.fuse(raw, fused, num_heads=cfg.num_attention_heads,
                                                  hidden_size=cfg.hidden_size, attention=False)
        reference = AudioGraph(model).eval()

        def torch_run(feeds):
            with torch.no_grad():
                out = reference(torch.from_numpy(feeds["waveform"]),
                                torch.from_numpy(feeds["attention_mask"]))
            out = out if isinstance(out, tuple) else (out,)
            return {name: t.numpy() for name, t in zip(outputs, out)}

        session = _session(fused)
        self.report.parity["audio"] = check_parity(
            torch_run, lambda f: _run(session, f), _audio_cases(sr, self.opts.seed + 1),
            what="audio tower").to_dict()
        return fused

    def export_text(self, model, tok, pad_id: int, work: Path) -> Path:
        ids, mask = tokenize(tok, TEXT_PROBES[:2], pad_id)
        axes = {0: AxisSpec("batch"), 1: AxisSpec("tokens", minimum=1, maximum=4096)}
        raw = work / "text.raw.onnx"
        export_module(TextGraph(model), (torch.from_numpy(ids), torch.from_numpy(mask)), raw,
                      input_names=[mf.INPUT_IDS, mf.ATTENTION_MASK], output_names=[mf.EMBEDDING],
                      dynamic={mf.INPUT_IDS: axes, mf.ATTENTION_MASK: axes},
                      metadata=self.metadata(model, "text"), what="text tower")
        fused = work / "text.fp32.onnx"
        cfg = model.text_branch.base.config
        self.report.fusions["text"] = graph.fuse(raw, fused, num_heads=cfg.num_attention_heads,
                                                 hidden_size=cfg.hidden_size, attention=True)
        reference = TextGraph(model).eval()

        def torch_run(feeds):
            with torch.no_grad():
                return {mf.EMBEDDING: reference(torch.from_numpy(feeds[mf.INPUT_IDS]),
                                                torch.from_numpy(feeds[mf.ATTENTION_MASK])).numpy()}

        cases = {}
        for name, texts in {"1 prompt": TEXT_PROBES[:1], "4 prompts padded": TEXT_PROBES}.items():
            i, m = tokenize(tok, texts, pad_id)
            cases[name] = {mf.INPUT_IDS: i, mf.ATTENTION_MASK: m}
        session = _session(fused)
        self.report.parity["text"] = check_parity(torch_run, lambda f: _run(session, f), cases,
                                                  what="text tower").to_dict()
        return fused

    def metadata(self, model, role: str) -> dict[str, str]:
        cfg = model.config
        tower = cfg.audio if role == "audio" else cfg.text
        return {"clapedge.role": role, "clapedge.model": cfg.name,
                "sample_rate": str(cfg.sample_rate), "embed_dim": str(cfg.embed_dim),
                "normalized": "l2", "pooling": tower.pooling, "backbone": tower.backbone,
                "logit_scale": f"{float(model.get_logit_scale().detach()):.6g}"}

    # ------------------------------------------------------------------ INT8

    def calibration_data(self, sample_rate: int) -> tuple[list[np.ndarray], list[CalibItem]]:
        opts = self.opts
        items = read_source(opts.calib, split=None)
        train = [it for it in items if it.split in (None, "train")] or items
        chosen = class_balanced(train, max(4 * opts.calib_clips, 24), key="arousal"
                                if any("arousal" in it.attributes for it in train) else None,
                                seed=opts.seed)
        decoded = decode_items(chosen, sample_rate)
        signals = [s for _, s in decoded]
        clips = length_buckets(signals, list(opts.calib_lengths), sample_rate, opts.calib_clips)
        if len(signals) < 2:
            raise ExportError(f"{opts.calib}: too little calibration audio ({len(signals)} "
                              f"readable clip); give at least a few dozen clips")
        return clips, [it for it, _ in decoded]

    def eval_items(self) -> list[CalibItem] | None:
        source = self.opts.eval_data or self.opts.calib
        if source is None:
            return None
        items = read_source(source)
        held = [it for it in items if it.split in ("test", "val")]
        return held or None

    def quantize_audio(self, fp32: Path, work: Path, sample_rate: int,
                       keep_float: tuple[str, ...] = ()) -> tuple[Path, quantize.QuantPlan]:
        """INT8 audio tower for this plan. Calibrates activation ranges only when the plan
        has static QDQ nodes, and rounds the dynamic GEMMs' weights by GPTQ once (reused by
        every attempt of the accuracy search), both on ``self.calibration_feeds``."""
        config = self.opts.quant_config(keep_float)
        plan = quantize.plan_quantization(onnx.load(str(fp32)), config)
        feeds = self.calibration_feeds
        if plan.quantize and getattr(self, "calibration", None) is None:
            with self.step(f"calibrate activation ranges ({len(feeds)} clips)"):
                self.calibration = quantize.calibrate(fp32, feeds, config, work)
        if not hasattr(self, "gptq"):
            self.gptq: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        todo = [n for n in plan.dynamic if n not in self.gptq] if config.rounding == "gptq" else []
        if todo:
            with self.step(f"round {len(todo)} GEMM weights against calibration activations (GPTQ)"):
                self.gptq.update(gptq_weights(fp32, todo, feeds, seed=self.opts.seed))
        out = work / f"audio.int8.{len(keep_float)}.onnx"
        quantize.quantize_static(fp32, out, getattr(self, "calibration", None), plan, config,
                                 weights=self.gptq)
        return out, plan

    def embedding_quality(self, fp32: Path, int8: Path, signals: list[np.ndarray],
                          sample_rate: int) -> dict[str, float]:
        """Centred cosine of INT8 to fp32 audio embeddings, per deployment length."""
        a, b = _session(fp32), _session(int8)
        out = {}
        for length in self.opts.calib_lengths:
            clips = length_buckets(signals, [length], sample_rate, min(8, len(signals)))
            ref = np.concatenate([_run(a, {"waveform": c[None], "attention_mask":
                                           np.ones((1, len(c)), np.int64)})[mf.EMBEDDING]
                                  for c in clips])
            got = np.concatenate([_run(b, {"waveform": c[None], "attention_mask":
                                           np.ones((1, len(c)), np.int64)})[mf.EMBEDDING]
                                  for c in clips])
            out[f"{length:g}s"] = float(centred_cosine(ref, got, ref.mean(0)).min())
        return out

    # ------------------------------------------------------------------ bundle

    def write_bundle(self, folder: Path, model, audio: Path, text: Path | None,
                     precision: str | tuple[str, str],
                     banks: dict[str, tuple[BankSource, np.ndarray]], tagger: Path | None,
                     tagger_bank: str | None) -> mf.Manifest:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "banks").mkdir(exist_ok=True)
        precision, text_precision = (precision, precision) if isinstance(precision, str) else precision
        cfg = model.config
        dim = cfg.embed_dim
        shutil.copyfile(audio, folder / "audio.onnx")
        audio_in = (mf.TensorSpec(mf.WAVEFORM, "float32", ("batch", "samples")),
                    mf.TensorSpec(mf.ATTENTION_MASK, "int64", ("batch", "samples")))
        heads = {h.name: tuple(h.labels) for h in cfg.heads}
        audio_out = (mf.TensorSpec(mf.EMBEDDING, "float32", ("batch", dim)),) + tuple(
            mf.TensorSpec(mf.HEAD_PREFIX + n, "float32", ("batch", len(l))) for n, l in heads.items())
        towers = mf.Towers(audio=mf.TowerSpec("audio.onnx", mf.sha256_file(folder / "audio.onnx"),
                                              precision, audio_in, audio_out, heads=heads))
        tokenizer = None
        if text is not None:
            shutil.copyfile(text, folder / "text.onnx")
            shutil.copyfile(self.model_dir / "tokenizer.json", folder / "tokenizer.json")
            text_io = (mf.TensorSpec(mf.INPUT_IDS, "int64", ("batch", "tokens")),
                       mf.TensorSpec(mf.ATTENTION_MASK, "int64", ("batch", "tokens")))
            towers.text = mf.TowerSpec("text.onnx", mf.sha256_file(folder / "text.onnx"),
                                       text_precision, text_io,
                                       (mf.TensorSpec(mf.EMBEDDING, "float32", ("batch", dim)),))
            tokenizer = mf.TokenizerSpec("tokenizer.json", mf.sha256_file(folder / "tokenizer.json"),
                                         max_length=cfg.tokenizer.max_length if cfg.tokenizer else 512,
                                         pad_id=_pad_id(model))
        bank_specs = {}
        for name, (source, matrix) in banks.items():
            rel = f"banks/{name}.npy"
            np.save(folder / rel, matrix)
            bank_specs[name] = mf.LabelBank(
                labels=tuple(source.prompts), file=rel, sha256=mf.sha256_file(folder / rel),
                prompts={k: tuple(v) for k, v in source.prompts.items()}, kind=source.kind,
                values=source.values)
        if tagger is not None and tagger_bank is not None:
            shutil.copyfile(tagger, folder / "tagger.onnx")
            k = min(self.opts.tagger_k, len(bank_specs[tagger_bank].labels))
            towers.tagger = mf.TowerSpec(
                "tagger.onnx", mf.sha256_file(folder / "tagger.onnx"), precision, audio_in,
                (mf.TensorSpec(mf.SCORES, "float32", ("batch", k)),
                 mf.TensorSpec(mf.INDICES, "int64", ("batch", k)),
                 mf.TensorSpec(mf.EMBEDDING, "float32", ("batch", dim))) + audio_out[1:],
                bank=tagger_bank, k=k)
        o = self.opts
        manifest = mf.Manifest(
            sample_rate=cfg.sample_rate, embed_dim=dim, logit_scale=float(model.get_logit_scale().detach()),
            clip=mf.ClipPolicy(o.min_seconds, o.max_seconds, o.window_seconds, o.hop_seconds),
            towers=towers, model=mf.ModelInfo(name=cfg.name, source_sha256=mf.sha256_file(
                self.model_dir / "model.safetensors"), info={"exporter": "clapedge"}),
            tokenizer=tokenizer, banks=bank_specs,
            default_bank=tagger_bank if tagger_bank in bank_specs else (next(iter(bank_specs), None)),
            calibration=self.report.quantization.get("calibration", {}),
            quality=self.report.quality)
        manifest = manifest.with_sizes(folder)
        mf.write_manifest(folder / mf.MANIFEST_NAME, manifest)
        return manifest

    # ------------------------------------------------------------------ main

    def run(self) -> ExportReport:
        opts = self.opts
        with self.step("load model"):
            model = _load_model(self.model_dir)
            tok, _ = _tokenizer(model, self.model_dir)
            pad_id = _pad_id(model)
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            clear_stale(self.out_dir)
            tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(self.out_dir) + f"{os.getpid()}-",
                                        dir=parent))
        except OSError as e:
            raise ExportError(_os_error_message(e, self.out_dir)) from None
        try:
            work = tmp / "work"
            work.mkdir()
            with self.step("export audio tower (fp32, parity)"):
                audio32 = self.export_audio(model, work)
                self.audio32 = audio32
            with self.step("export text tower (fp32, parity)"):
                text32 = self.export_text(model, tok, pad_id, work)
            with self.step("encode label banks"):
                banks = self.build_banks(model, tok, pad_id)
            audio, text = audio32, text32
            sr = model.config.sample_rate
            if opts.precision == "fp16":
                with self.step("convert to fp16"):
                    audio, text = work / "audio.fp16.onnx", work / "text.fp16.onnx"
                    quantize.convert_fp16(audio32, audio)
                    quantize.convert_fp16(text32, text)
            elif opts.precision == "int8":
                audio, text = self.int8(model, audio32, text32, banks, work, sr)
            tagger_bank = self.pick_tagger_bank(banks) if opts.tagger else None
            tagger = None
            if tagger_bank is not None:
                with self.step("bake tagger graph"):
                    tagger = work / "tagger.onnx"
                    onnx.save_model(build_tagger(onnx.load(str(audio)), banks[tagger_bank][1],
                                                 min(opts.tagger_k, len(banks[tagger_bank][1]))),
                                    str(tagger))
            self.report.sizes = {"audio_fp32_mb": _mb(audio32), "audio_mb": _mb(audio),
                                 "text_fp32_mb": _mb(text32), "text_mb": _mb(text)}
            self.report.latency_ms = self.latencies(audio32, audio, sr)
            split = None
            if opts.stream_split:
                with self.step("split the audio tower for streaming"):
                    split = stream_split.try_split(audio, work, model, sr)
                    self.report.stream = split.record() if split is not None else {}
            step = None
            if split is not None and model.config.audio.causal_context is not None:
                with self.step("export the causal streaming step"):
                    step = self.export_step(model, split, audio, work, sr)
            native = None
            if split is not None and opts.precision == "int8" and opts.native_frontend:
                with self.step("build and check the native INT8 front end"):
                    native = self.native_frontend(model, split, audio32, audio, sr)
            with self.step("write bundle"):
                staged = tmp / "bundle"
                text_precision = "fp32" if text == text32 else opts.precision
                self.write_bundle(staged, model, audio, text, (opts.precision, text_precision),
                                  banks, tagger,
                                  tagger_bank)
                if split is not None:
                    stream_split.record_in_bundle(staged, split, step)
                if native is not None:
                    from clapedge.export import native_frontend as nfe

                    manifest = mf.read_manifest(staged)
                    manifest.native_frontend = nfe.write(native[0], staged, native[1])
                    mf.write_manifest(staged, manifest.with_sizes(staged))
                (staged / "export_report.json").write_text(
                    json.dumps(self.report.to_dict(), indent=2, sort_keys=True) + "\n")
                _fsync_tree(staged)
                _replace_dir(staged, self.out_dir, force=opts.force)
        except OSError as e:  # disk full, quota, permissions: a message, never a traceback
            raise ExportError(_os_error_message(e, self.out_dir)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.report

    def native_frontend(self, model, split, audio32: Path, audio8: Path, sr: int):
        """(NativeFrontEnd, quality record) for the bundle, or None (logged and reported:
        the runtime then runs audio.onnx) when the front end is not one the native kernel
        computes or it is less accurate than audio.onnx (export/native_frontend.py)."""
        from clapedge.export import native_frontend as nfe
        from clapedge.kernels.errors import KernelInputError

        try:
            front = nfe.build(model, split.frontend)
            record = nfe.check(front, split.frontend, split.encoder, audio32, audio8,
                               self.quality_signals, self.opts.calib_lengths, sr)
        except (ExportError, KernelInputError) as e:
            log.warning("no native front end (the runtime will run audio.onnx): %s", e)
            self.report.quality["native_frontend"] = {"error": str(e)}
            return None
        self.report.quality["native_frontend"] = record
        return front, record

    def export_step(self, model, split, audio: Path, work: Path, sr: int):
        """A causal model's streaming step (export/stream_step.py), or None (logged: streams
        then re-encode each window) when it cannot be exported or fails its checks."""
        from clapedge.export.stream_step import StepUnsupported, export_step

        window = 2 * sr  # the streams' default window
        try:
            step = export_step(model, work / "step", int8=self.opts.precision == "int8",
                               metadata=self.metadata(model, "audio"), frontend=split.frontend,
                               audio=audio, window_samples=window)
        except (StepUnsupported, ExportError) as e:
            log.warning("no causal streaming step (streams will re-encode each window): %s", e)
            self.report.stream["step"] = {"error": str(e)}
            return None
        self.report.stream["step"] = step.record()
        return step

    def build_banks(self, model, tok, pad_id) -> dict[str, tuple[BankSource, np.ndarray]]:
        sources = builtin_banks(self.opts.banks) + [read_bank_file(n, p) for n, p in self.opts.bank_files]

        def embed(texts):
            ids, mask = tokenize(tok, texts, pad_id)
            with torch.no_grad():
                return model.embed_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        head_names = {h.name for h in model.config.heads}
        out = {}
        for s in sources:
            if s.name in head_names:
                continue  # an attribute head answers that question directly
            out[s.name] = (s, encode_bank(embed, s))
        return out

    def pick_tagger_bank(self, banks) -> str | None:
        if self.opts.tagger_bank is not None:
            if self.opts.tagger_bank not in banks:
                raise ConfigError(f"--tagger-bank {self.opts.tagger_bank!r} is not one of the "
                                  f"banks {sorted(banks)}")
            return self.opts.tagger_bank
        return next(iter(banks), None)

    def int8(self, model, audio32: Path, text32: Path, banks, work: Path, sr: int):
        opts = self.opts
        with self.step("read calibration audio"):
            clips, used = self.calibration_data(sr)
            feeds = [{"waveform": c[None, :], "attention_mask": np.ones((1, len(c)), np.int64)}
                     for c in clips]
            self.calibration_feeds = feeds
        with self.step(f"quantize audio tower ({len(feeds)} calibration clips at "
                       f"{', '.join(f'{x:g}s' for x in opts.calib_lengths)})"):
            audio8, plan = self.quantize_audio(audio32, work, sr)
        with self.step("quantize text tower (SmoothQuant + per-tensor dynamic INT8, int8 "
                       "embeddings)"):
            # Measured on all-MiniLM-L6-v2 (quantize.quantize_text): SmoothQuant + per-tensor
            # + GPTQ weights 0.9985 min cosine on held-out captions at per-tensor speed.
            text8 = work / "text.int8.onnx"
            text_summary = quantize.quantize_text(
                text32, text8, text_calibration_feeds(model, self.model_dir, opts.calib, banks),
                min_k=opts.min_k, rounding=opts.rounding, form="smooth", seed=opts.seed)
        self.report.quantization = {
            "audio": {"weights": "int8 per-channel symmetric, "
                                 + ("GPTQ-rounded" if plan.dynamic and opts.rounding == "gptq"
                                    else "rounded to nearest"),
                      "front_end": opts.front_end, "gemm": opts.quant_config().gemm,
                      "activations": "int8 symmetric" if opts.target == "tensorrt" else "uint8",
                      **plan.summary()},
            "text": text_summary,
            "calibration": {"method": opts.calib_method, "clips": len(feeds),
                            "lengths_s": list(opts.calib_lengths), "source": str(opts.calib),
                            "files": len(used), "seed": opts.seed}}
        with self.step("measure INT8 quality"):
            held = self.eval_items()
            signals = [s for _, s in decode_items(held or used, sr)][:16]
            self.report.quality["audio_centred_cosine"] = self.embedding_quality(audio32, audio8, signals, sr)
            t32, t8 = _session(text32), _session(text8)
            tok, pad = _tok_pad(model, self.model_dir)
            ids, mask = tokenize(tok, TEXT_PROBES, pad)
            feeds_t = {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask}
            from clapedge.export.parity import cosine_rows
            self.report.quality["text_cosine"] = float(cosine_rows(
                _run(t32, feeds_t)[mf.EMBEDDING], _run(t8, feeds_t)[mf.EMBEDDING]).min())
            self.labelled = bool(held and any(it.attributes for it in held))
            self.quality_signals = signals
            if opts.max_drop is not None:
                audio8, text8 = self.fit_budget(model, audio32, text32, audio8, text8, plan,
                                                banks, work, sr)
        return audio8, text8

    def task_metrics(self, model, audio: Path, text: Path, banks, work: Path, name: str) -> dict:
        """The task metrics of ``clap-eval`` on the held-out split; without labels, the
        centred cosine of the audio embedding to fp32 at each deployment length (1.0 for
        fp32 itself), so the same budget applies."""
        from clapedge.calib.evaluate import evaluate, open_embedder

        if not self.labelled:
            if name == "fp32":
                return {f"centred_cosine/{x:g}s": 1.0 for x in self.opts.calib_lengths}
            cos = self.embedding_quality(self.audio32, audio, self.quality_signals,
                                         model.config.sample_rate)
            return {f"centred_cosine/{k}": v for k, v in cos.items()}

        folder = work / f"eval-{name}"
        if folder.exists():
            shutil.rmtree(folder)
        self.write_bundle(folder, model, audio, text, "fp32", banks, None, None)
        source = self.opts.eval_data or self.opts.calib
        split = "test" if any(it.split == "test" for it in read_source(source)) else "val"
        return evaluate(open_embedder(folder), source, split=split, model_name=name).headline()

    def fit_budget(self, model, audio32, text32, audio8, text8, plan, banks, work, sr):
        """Keeps the most sensitive quantized audio nodes in float (doubling the kept set each
        round), then the text tower, until every task metric is within ``max_drop`` of fp32.
        Returns the (audio, text) models that fit."""
        budget = self.opts.max_drop
        reference = self.task_metrics(model, audio32, text32, banks, work, "fp32")
        ranking = None
        keep: tuple[str, ...] = ()
        attempts = []
        text_float = False
        while True:
            metrics = self.task_metrics(model, audio8, text8, banks, work,
                                        f"int8-{len(keep)}-{int(text_float)}")
            drops = {k: reference[k] - metrics.get(k, 0.0) for k in reference}
            worst = max(drops.values(), default=0.0)
            attempts.append({"audio_nodes_kept_float": len(keep), "text_float": text_float,
                             "worst_drop": round(worst, 4),
                             "worst_metric": max(drops, key=drops.get) if drops else None})
            self.progress(f"INT8 task metrics: worst drop {worst:.4f} with {len(keep)} audio "
                          f"nodes kept float{' and the text tower float' if text_float else ''}")
            if worst <= budget:
                break
            if not attempts[:-1] and text8 != text32:
                # First, which tower: the same audio with the float text tower. Retrieval
                # metrics read both; keeping the audio nodes float cannot fix a text loss.
                text_float, text8, int8_text = True, text32, text8
                metrics_tf = self.task_metrics(model, audio8, text8, banks, work, "int8-0-1")
                drops_tf = {k: reference[k] - metrics_tf.get(k, 0.0) for k in reference}
                worst_tf = max(drops_tf.values(), default=0.0)
                attempts.append({"audio_nodes_kept_float": 0, "text_float": True,
                                 "worst_drop": round(worst_tf, 4),
                                 "worst_metric": max(drops_tf, key=drops_tf.get) if drops_tf else None})
                self.progress(f"INT8 task metrics: worst drop {worst_tf:.4f} with the text tower float")
                if worst_tf <= budget:
                    metrics, drops = metrics_tf, drops_tf
                    break
                if worst_tf >= worst:  # the text tower was not the problem: keep it INT8
                    text_float, text8 = False, int8_text
            if ranking is None:
                from clapedge.export.sensitivity import rank_nodes

                ranking = rank_nodes(audio32, audio8, plan, self.ranking_feeds())
            if len(keep) >= len(ranking):
                if text_float:
                    raise AccuracyBudgetError(
                        f"INT8 loses {worst:.4f} on {attempts[-1]['worst_metric']} (> --max-drop "
                        f"{budget}) even with every quantized node kept float; export with "
                        f"--fp16/--fp32 or raise --max-drop")
                text_float, text8 = True, text32
                continue
            keep = tuple(ranking[: max(1, 2 * len(keep))])
            with self.step(f"re-quantize keeping {len(keep)} nodes float"):
                audio8, plan = self.quantize_audio(audio32, work, sr, keep)
        self.report.quality["task_fp32"] = reference
        self.report.quality["task_int8"] = metrics
        self.report.quality["task_drop"] = drops
        self.report.quality["max_drop_budget"] = budget
        self.report.quantization["audio"].update(plan.summary())
        if text_float:
            self.report.quantization["text"] = {"mode": "kept fp32 by the accuracy search"}
        self.report.quantization["accuracy_search"] = {"attempts": attempts,
                                                       "kept_float": list(keep)}
        return audio8, text8

    def ranking_feeds(self) -> list[dict[str, np.ndarray]]:
        """Real calibration clips (2 of them, at the first deployment length) for ranking."""
        return self.calibration_feeds[:2]

    def latencies(self, fp32: Path, final: Path, sr: int) -> dict:
        out = {}
        rng = np.random.default_rng(0)
        for seconds in (1.0, 10.0):
            n = int(seconds * sr)
            feeds = {"waveform": (0.1 * rng.standard_normal((1, n))).astype(np.float32),
                     "attention_mask": np.ones((1, n), np.int64)}
            for label, path in (("fp32", fp32), (self.opts.precision, final)):
                s = _session(path)
                _run(s, feeds)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    _run(s, feeds)
                    times.append(time.perf_counter() - t0)
                out[f"audio_{label}_{seconds:g}s"] = round(1000 * float(np.median(times)), 1)
        return out


def _tok_pad(model, model_dir: Path):
    tok, _ = _tokenizer(model, model_dir)
    return tok, _pad_id(model)


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 2)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _aside_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(target: Path) -> list[Path]:
    """Delete what an export to ``target`` killed mid-way left beside it: its temporary
    directory ``.NAME.partial-PID-*`` and an old bundle moved aside ``.NAME.old-PID``
    (restored to ``target`` when the kill came between the two renames of a replace
    without an atomic exchange), for PIDs no longer running. Returns what was removed."""
    parent = target.parent
    removed = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        for prefix in (_partial_prefix(target), _aside_prefix(target)):
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if prefix == _aside_prefix(target) and not target.exists() and entry.is_dir():
                log.warning("restoring %s from %s (an export replacing it was killed)",
                            target, entry)
                os.rename(entry, target)
                continue
            log.info("removing %s (left by a killed export, pid %s)", entry, pid)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _os_error_message(e: OSError, target: Path) -> str:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device (or quota exceeded)"
    if e.filename is not None and Path(e.filename) != target:
        reason = f"{e.filename}: {reason}"
    hint = "; free some space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{target}: export failed: {reason}; {target} was not changed{hint}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(staged: Path, target: Path, *, force: bool) -> None:
    """Renames ``staged`` to ``target``. An existing target is replaced only with force:
    swapped with ``staged`` in one atomic exchange where the system can (the old bundle
    then sits in the temporary directory, deleted with it), else moved aside first
    (``clear_stale`` restores it if a kill comes between the two renames). A kill at any
    point leaves the old or the new bundle at ``target``, never a mix."""
    os.chmod(staged, 0o755)
    if target.exists():
        if not force:
            raise ExportError(f"{target} already exists; pass --force to replace it")
        if not _exchange(staged, target):
            aside = target.parent / f"{_aside_prefix(target)}{os.getpid()}"
            os.rename(target, aside)
            os.rename(staged, target)
            shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staged, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_bundle(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  *, progress: Progress | None = None) -> ExportReport:
    """Exports ``model_dir`` (a ClapModel directory) to the bundle ``out_dir``."""
    options = options or ExportOptions(precision="fp32")
    out_dir = Path(out_dir)
    with contextlib.suppress(OSError):  # run() reports a directory it cannot write
        clear_stale(out_dir)  # first: it may restore a bundle a killed --force moved aside
    if out_dir.exists() and not options.force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    return _Exporter(Path(model_dir), out_dir, options, progress).run()
