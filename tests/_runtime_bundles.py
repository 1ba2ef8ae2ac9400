"""Tiny bundles for the runtime tests, built with ``onnx.helper`` (no model download).

The audio tower cuts the waveform into frames of ``FRAME`` samples, applies a small MLP,
takes the mean over frames that hold real samples (the attention mask), projects and
L2-normalises; an attribute head ``sex`` reads the pooled features. The text tower is an
embedding lookup with a masked mean. ``TinyModel`` holds the weights and numpy twins of
both towers, so tests can check the runtime against plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from clapedge.runtime.manifest import (ClipPolicy, FileRef, LabelBank, Manifest, ModelInfo,
                                       TensorSpec, TokenizerSpec, TowerSpec, Towers,
                                       sha256_file, write_manifest)

FRAME = 160
HIDDEN = 16
DIM = 8
RATE = 16000
WORDS = ["a", "calm", "angry", "happy", "sad", "voice", "low", "high", "whisper",
         "shout", "female", "male", "fast", "slow", "speaker", "medium", "neutral", "pitched"]
OPSET = [helper.make_opsetid("", 17)]

BANKS = {
    "emotion": dict(labels=["neutral", "happy", "sad", "angry", "calm"]),
    "style": dict(labels=["whisper", "shout", "fast", "slow"], multi_label=True,
                  thresholds={"whisper": 0.1, "shout": -0.2, "fast": 0.0, "slow": 0.3}),
    "arousal": dict(labels=["low", "medium", "high"], kind="ordinal",
                    values={"low": 0.0, "medium": 0.5, "high": 1.0}),
}


def clip_policy(**kw) -> ClipPolicy:
    args = dict(min_seconds=0.5, max_seconds=3.0, window_seconds=2.0, hop_seconds=1.0,
                bucket_seconds=0.1)
    args.update(kw)
    return ClipPolicy(**args)


@dataclass
class TinyModel:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    wh: np.ndarray
    emb: np.ndarray
    banks: dict[str, np.ndarray]

    def _pool(self, segment: np.ndarray, n_real: int) -> np.ndarray:
        frames = segment.reshape(-1, FRAME).astype(np.float64)
        real = (np.arange(len(segment)) < n_real).reshape(-1, FRAME).max(axis=1)
        h = np.tanh(frames @ self.w1 + self.b1)
        return (h * real[:, None]).sum(0) / max(real.sum(), 1)

    def audio(self, segment: np.ndarray, n_real: int) -> np.ndarray:
        """Embedding of one padded segment whose first ``n_real`` samples are real."""
        z = self._pool(segment, n_real) @ self.w2
        return z / np.sqrt((z * z).sum() + 1e-12)

    def head(self, segment: np.ndarray, n_real: int) -> np.ndarray:
        return self._pool(segment, n_real) @ self.wh

    def text(self, ids: list[int]) -> np.ndarray:
        e = self.emb[ids].mean(0).astype(np.float64)
        return e / np.sqrt((e * e).sum() + 1e-12)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _normalise(nodes, src, dst):
    nodes += [helper.make_node("Mul", [src, src], [dst + "_sq"]),
              helper.make_node("ReduceSum", [dst + "_sq", "ax1"], [dst + "_ss"], keepdims=1),
              helper.make_node("Add", [dst + "_ss", "eps"], [dst + "_sse"]),
              helper.make_node("Sqrt", [dst + "_sse"], [dst + "_n"]),
              helper.make_node("Div", [src, dst + "_n"], [dst])]


def audio_graph(m: TinyModel, *, bank: np.ndarray | None = None, k: int = 0,
                mask: bool = True) -> onnx.ModelProto:
    """The audio tower; with ``bank``, the fused tagger (embedding -> scores -> TopK)."""
    inits = [_const("fshape", np.array([0, -1, FRAME], np.int64)), _const("w1", m.w1),
             _const("b1", m.b1), _const("w2", m.w2), _const("wh", m.wh),
             _const("ax1", np.array([1], np.int64)), _const("eps", np.array(1e-12, np.float32)),
             _const("one", np.array(1.0, np.float32))]
    nodes = [helper.make_node("Reshape", ["waveform", "fshape"], ["frames"]),
             helper.make_node("MatMul", ["frames", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["h"])]
    inputs = [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", "samples"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["batch", "samples"]))
        nodes += [helper.make_node("Reshape", ["attention_mask", "fshape"], ["mframes"]),
                  helper.make_node("Cast", ["mframes"], ["mframes_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceMax", ["mframes_f"], ["real"], axes=[2], keepdims=1)]
    else:
        inits.append(_const("zero", np.array(0.0, np.float32)))
        nodes += [helper.make_node("ReduceMax", ["frames"], ["fmax"], axes=[2], keepdims=1),
                  helper.make_node("Mul", ["fmax", "zero"], ["fz"]),  # ones shaped [B, N, 1]
                  helper.make_node("Add", ["fz", "one"], ["real"])]
    nodes += [helper.make_node("Mul", ["h", "real"], ["hm"]),
              helper.make_node("ReduceSum", ["hm", "ax1"], ["hsum"], keepdims=0),
              helper.make_node("ReduceSum", ["real", "ax1"], ["cnt0"], keepdims=0),
              helper.make_node("Max", ["cnt0", "one"], ["cnt"]),
              helper.make_node("Div", ["hsum", "cnt"], ["pooled"]),
              helper.make_node("MatMul", ["pooled", "w2"], ["z"]),
              helper.make_node("MatMul", ["pooled", "wh"], ["head_sex"])]
    _normalise(nodes, "z", "embedding")
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM]),
               helper.make_tensor_value_info("head_sex", TensorProto.FLOAT, ["batch", 2])]
    if bank is not None:
        inits += [_const("bankT", np.ascontiguousarray(bank.T)),
                  _const("k", np.array([k], np.int64))]
        nodes += [helper.make_node("MatMul", ["embedding", "bankT"], ["all_scores"]),
                  helper.make_node("TopK", ["all_scores", "k"], ["scores", "indices"], axis=-1)]
        outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k]),
                   helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", k]),
                   outputs[0]]
    graph = helper.make_graph(nodes, "tiny_audio", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def text_graph(m: TinyModel) -> onnx.ModelProto:
    inits = [_const("emb", m.emb), _const("ax1", np.array([1], np.int64)),
             _const("ax2", np.array([2], np.int64)),
             _const("eps", np.array(1e-12, np.float32)), _const("one", np.array(1.0, np.float32))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax2"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("ReduceSum", ["em", "ax1"], ["esum"], keepdims=0),
             helper.make_node("ReduceSum", ["m3", "ax1"], ["cnt0"], keepdims=0),
             helper.make_node("Max", ["cnt0", "one"], ["cnt"]),
             helper.make_node("Div", ["esum", "cnt"], ["z"])]
    _normalise(nodes, "z", "embedding")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", "tokens"])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])]
    graph = helper.make_graph(nodes, "tiny_text", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def tokenizer_json() -> str:
    vocab = {"[PAD]": 0, "[UNK]": 1}
    vocab.update({w: i + 2 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def tiny_model(seed: int = 0) -> TinyModel:
    rng = np.random.default_rng(seed)

    def unit_rows(n):
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return TinyModel(
        w1=(rng.standard_normal((FRAME, HIDDEN)) * 0.3).astype(np.float32),
        b1=(rng.standard_normal(HIDDEN) * 0.5).astype(np.float32),
        w2=rng.standard_normal((HIDDEN, DIM)).astype(np.float32),
        wh=rng.standard_normal((HIDDEN, 2)).astype(np.float32),
        emb=rng.standard_normal((len(WORDS) + 2, DIM)).astype(np.float32),
        banks={name: unit_rows(len(spec["labels"])) for name, spec in BANKS.items()})


def _audio_io(mask: bool = True):
    inputs = [TensorSpec("waveform", "float32", ("batch", "samples"))]
    if mask:
        inputs.append(TensorSpec("attention_mask", "int64", ("batch", "samples")))
    return inputs


def _save(model: onnx.ModelProto, path: Path, external: str | None = None) -> None:
    if external is None:
        onnx.save_model(model, path)
    else:
        onnx.save_model(model, path, save_as_external_data=True, location=external,
                        size_threshold=1024, all_tensors_to_one_file=True)


def build_bundle(root: Path, *, seed: int = 0, clip: ClipPolicy | None = None,
                 text: bool = True, tagger_k: int = 0, mask: bool = True,
                 external: str | None = None, sample_rate: int = RATE
                 ) -> tuple[Path, TinyModel]:
    """Write a complete tiny bundle into ``root``; returns (root, model)."""
    root.mkdir(parents=True, exist_ok=True)
    m = tiny_model(seed)
    _save(audio_graph(m, mask=mask), root / "audio.onnx", external)
    audio = TowerSpec(
        file="audio.onnx", sha256=sha256_file(root / "audio.onnx"), precision="fp32",
        inputs=_audio_io(mask),
        outputs=[TensorSpec("embedding", "float32", ("batch", DIM)),
                 TensorSpec("head_sex", "float32", ("batch", 2))],
        heads={"sex": ("female", "male")})
    towers = Towers(audio=audio)
    tokenizer = None
    if text:
        _save(text_graph(m), root / "text.onnx")
        towers.text = TowerSpec(
            file="text.onnx", sha256=sha256_file(root / "text.onnx"), precision="fp32",
            inputs=[TensorSpec("input_ids", "int64", ("batch", "tokens")),
                    TensorSpec("attention_mask", "int64", ("batch", "tokens"))],
            outputs=[TensorSpec("embedding", "float32", ("batch", DIM))])
        (root / "tokenizer.json").write_text(tokenizer_json())
        tokenizer = TokenizerSpec("tokenizer.json", sha256_file(root / "tokenizer.json"),
                                  max_length=16, pad_id=0)
    (root / "banks").mkdir(exist_ok=True)
    banks = {}
    for name, spec in BANKS.items():
        np.save(root / "banks" / f"{name}.npy", m.banks[name])
        file = f"banks/{name}.npy"
        banks[name] = LabelBank(file=file, sha256=sha256_file(root / file),
                                prompts={lab: (f"a {lab} voice",) for lab in spec["labels"]},
                                **spec)
    if tagger_k:
        onnx.save_model(audio_graph(m, bank=m.banks["emotion"], k=tagger_k, mask=mask),
                        root / "tagger.onnx")
        towers.tagger = TowerSpec(
            file="tagger.onnx", sha256=sha256_file(root / "tagger.onnx"), precision="fp32",
            inputs=_audio_io(mask),
            outputs=[TensorSpec("scores", "float32", ("batch", tagger_k)),
                     TensorSpec("indices", "int64", ("batch", tagger_k)),
                     TensorSpec("embedding", "float32", ("batch", DIM))],
            bank="emotion", k=tagger_k)
    if external is not None:
        towers.audio.external_data = (FileRef(external, sha256_file(root / external)),)
    manifest = Manifest(
        sample_rate=sample_rate, embed_dim=DIM, logit_scale=20.0,
        clip=clip or clip_policy(), towers=towers,
        model=ModelInfo(name="tiny-test", info={"seed": seed}), tokenizer=tokenizer,
        banks=banks, default_bank="emotion",
        calibration={"method": "none"}, quality={"cosine_vs_fp32": 1.0})
    write_manifest(root, manifest)
    return root, m


def tone(seconds: float, rate: int = RATE, freq: float = 220.0, amp: float = 0.3,
         seed: int = 0) -> np.ndarray:
    """A deterministic test signal: a tone plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def stream_all(rt, x, window_s=2.0, hop_s=0.5, chunks=(37, 1000, 4001, 160),
               banks=("emotion", "sex"), **kw):
    """Feeds ``x`` (at RATE) to a new stream in chunks of the given sizes (cycled), decoding
    whenever a window is ready, then finishes it; returns (stream, events)."""
    s = rt.create_stream(window_s=window_s, hop_s=hop_s, banks=list(banks), k=2, **kw)
    pos, i = 0, 0
    while pos < len(x):
        n = chunks[i % len(chunks)]
        s.accept_waveform(RATE, x[pos:pos + n])
        pos, i = pos + n, i + 1
        while rt.is_ready(s):
            rt.decode(s)
    s.input_finished()
    while rt.is_ready(s):
        rt.decode(s)
    return s, s.results()
