"""``Runtime``: embedding, tagging, reward scoring and ordinal attributes over a bundle.

    rt = Runtime("BUNDLE")                       # or Runtime(Bundle.load(...))
    rt.embed_audio(["a.wav", "b.flac"])          # float32 [2, D], L2-normalised
    rt.embed_text(["a calm, low-pitched voice"]) # float32 [1, D]
    rt.tag("a.wav", bank="emotion", k=3)         # [Tag(label, score, index), ...]
    rt.tag_all("a.wav")                          # {bank or head: [Tag, ...]}, one audio pass
    rt.score("a.wav", "an angry shout")          # cosine similarity, a float
    rt.rerank(["c1.wav", "c2.wav"], "a whisper") # [Ranked(candidate, score), ...] best first
    rt.ordinal("a.wav", "arousal")               # scalar from ordered anchor prompts

Audio is a path, a numpy array with ``sample_rate=``, or an ``(array, rate)`` tuple; a
``list`` of them is a batch. See ``audio`` for decoding and the clip policy.

Determinism: no random crop anywhere, and an input's padding depends on the input alone
(its length rounded up to a multiple of the manifest's ``clip.bucket_seconds``, mask 0 on
the padding); a batch holds inputs of one padded length only (inputs are sorted by length,
which also minimises padding), and texts are batched only with texts of the same token
count. So the same input gives a bit-identical embedding in every call that runs it in the
same batch shape, whatever its neighbours are: all single-input calls at the default
``batch_size`` (``embed_audio(x)``, ``tag``, ``tag_all``, ``score``, ``ordinal``) agree bit
for bit, and so do all calls with ``batch_size=1``.
Between different batch shapes results agree to float rounding (~1e-7) but not always bit
for bit: ONNX Runtime picks a reduction's summation order from the tensor shape (a pooled
sum over [1, N, H] may round differently from one over [4, N, H]). Where bit-exact
reproducibility across batchings matters, use ``batch_size=1``; on CPU it costs little, a
clip's frames already fill the matrix multiplications.
INT8 towers are dynamically quantized: the audio tower's transformer GEMMs get one
activation scale per tensor, computed at run time, so in a batch every clip's scale would
depend on the others (the text tower's was measured up to 4e-2 on an embedding component
on the default model before it moved to per-token scales). Each clip and each text then
runs alone, and an embedding never depends on the other inputs of the call (on CPU a clip's
frames already fill the GEMMs; this costs little).

Memory: audio is decoded and resampled block by block and a long input is embedded window
by window as its samples arrive (``audio.SegmentStream``), so embedding or tagging a file
holds at most ``clip.max_seconds`` of it (plus one block and one batch of windows),
whatever its length: an hour-long file costs no more than a minute-long one. The windows of
a long input are batched among themselves, never with other inputs, so its embedding is the
same in any call. (``load_audio`` returns the whole signal, by its nature.)

Thread safety: one ``Runtime`` may be called from several threads at once (sessions are
created once under a lock; ONNX Runtime's ``run`` is thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from clapedge.errors import BundleError, ConfigError
from clapedge.kernels import topk
from clapedge.runtime.audio import (SegmentStream, batch_segments, load_audio,
                                    padded_length, seconds_to_samples, segment, stream_audio)
from clapedge.runtime.bundle import Bundle
from clapedge.runtime.manifest import (ATTENTION_MASK, EMBEDDING, HEAD_PREFIX, INDICES,
                                       INPUT_IDS, SCORES, WAVEFORM)
from clapedge.runtime.results import AudioEncoding, Ranked, Tag
from clapedge.runtime.stream import (AudioStream, StreamConfig, StreamEvent, encode_window,
                                     plan_reuse, smoothed)


DEFAULT_BATCH = 8
log = logging.getLogger("clapedge.runtime")


def _is_single(audio: Any) -> bool:
    if isinstance(audio, (str, os.PathLike, np.ndarray)):
        return True
    return isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[0], np.ndarray)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size: {batch_size!r} must be a positive integer")


def _check_k(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or k <= 0):
        raise ConfigError(f"k: {k!r} must be a positive integer (or None for all labels)")


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms, floored so that an all-zero row stays zero instead of becoming NaN."""
    return np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


class Runtime:
    """The runtime API over one bundle (see the module docstring)."""

    def __init__(self, bundle: Bundle | str | os.PathLike, *,
                 providers: str | Sequence[str] = "auto", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(
            bundle, providers=providers, threads=threads, cache_dir=cache_dir)
        self.manifest = self.bundle.manifest

    # -- facts

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    @property
    def banks(self) -> list[str]:
        return sorted(self.manifest.banks)

    @property
    def heads(self) -> list[str]:
        return sorted(self.manifest.towers.audio.heads)

    def labels(self, name: str) -> tuple[str, ...]:
        """The labels of a bank or an attribute head."""
        if name in self.manifest.towers.audio.heads:
            return self.manifest.towers.audio.heads[name]
        return self._bank_spec(name).labels

    def __repr__(self) -> str:
        return f"Runtime({self.bundle!r})"

    # -- audio

    def load_audio(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Decode, mix and resample to the bundle's rate (float32 mono, validated)."""
        return load_audio(audio, sample_rate, target_rate=self.sample_rate)

    def encode_audio(self, audio, sample_rate: int | None = None, *,
                     batch_size: int = DEFAULT_BATCH) -> list[AudioEncoding]:
        """Embeddings and attribute-head logits, one ``AudioEncoding`` per input."""
        _check_batch_size(batch_size)
        sources = [audio] if _is_single(audio) else list(audio)
        if not sources:
            return []
        return self._encode([self._segments(s, sample_rate) for s in sources], batch_size)

    def _segments(self, audio, sample_rate: int | None) -> SegmentStream:
        """The input decoded lazily, block by block, into its clip-policy segments."""
        chunks = stream_audio(audio, sample_rate, target_rate=self.sample_rate)
        return SegmentStream(chunks, self.sample_rate, self.manifest.clip)

    def embed_audio(self, audio, sample_rate: int | None = None, *,
                    batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """float32 [B, embed_dim], L2-normalised; B = 1 for a single input. All inputs of
        one call are decoded first: embed a large collection in slices of a few hundred."""
        encodings = self.encode_audio(audio, sample_rate, batch_size=batch_size)
        if not encodings:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack([e.embedding for e in encodings])

    def _bucket(self) -> int:
        seconds = self.manifest.clip.bucket_seconds
        return seconds_to_samples(seconds, self.sample_rate) if seconds > 0 else 0

    def _encode(self, clips: list[SegmentStream | np.ndarray],
                batch_size: int) -> list[AudioEncoding]:
        """Encodings of decoded signals or ``SegmentStream``s: a long input window by
        window on its own (``_encode_long``); short ones (one segment each) batched
        together by padded length."""
        tower = self.bundle.tower("audio")
        if tower.spec.precision == "int8":  # per-tensor dynamic scales span a batch: run alone
            batch_size = 1
        heads = list(tower.spec.heads)
        outputs = [EMBEDDING] + [HEAD_PREFIX + h for h in heads]
        bucket = self._bucket()
        out: list[AudioEncoding | None] = [None] * len(clips)
        items = []  # (padded length, clip, segment, signal length)
        for ci, clip in enumerate(clips):
            if isinstance(clip, np.ndarray):
                clip = SegmentStream([clip], self.sample_rate, self.manifest.clip)
            signal = clip.head()
            if signal is None:
                out[ci] = self._encode_long(clip, batch_size, tower, heads, outputs, bucket)
                continue
            (seg,) = segment(signal, self.sample_rate, self.manifest.clip)
            items.append((padded_length(len(seg), bucket), ci, seg, len(signal)))
        items.sort(key=lambda t: t[:2])
        for length, group in itertools.groupby(items, key=lambda t: t[0]):
            group = list(group)
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                result = self._run_audio(tower, [t[2] for t in chunk], length, outputs)
                for row, (_, ci, _, n) in enumerate(chunk):
                    out[ci] = self._pool([{name: result[name][row] for name in outputs}],
                                         heads, n)
        return out

    def _run_audio(self, tower, segments: list[np.ndarray], length: int,
                   outputs: list[str]) -> dict[str, np.ndarray]:
        waveform, mask = batch_segments(segments, length)
        result = tower.run({WAVEFORM: waveform, ATTENTION_MASK: mask}, outputs)
        self._check_embedding(result[EMBEDDING], len(segments), "audio")
        return result

    def _encode_long(self, clip: SegmentStream, batch_size: int, tower, heads: list[str],
                     outputs: list[str], bucket: int) -> AudioEncoding:
        """A long input's encoding, its windows embedded batch by batch as they arrive:
        the re-normalised mean of the normalised window embeddings and the mean of the head
        logits, summed in float64 as they come (memory does not grow with the length)."""
        length = padded_length(clip.window, bucket)
        sums = {name: np.zeros(0) for name in outputs}
        count = 0
        batch: list[np.ndarray] = []

        def run() -> None:
            nonlocal count
            result = self._run_audio(tower, batch, length, outputs)
            emb = result[EMBEDDING].astype(np.float64)
            result = dict(result, **{EMBEDDING: emb / _norms(emb)})
            for name in outputs:
                total = result[name].astype(np.float64).sum(axis=0)
                sums[name] = total if count == 0 else sums[name] + total
            count += len(batch)
            batch.clear()

        for window in clip.windows():
            batch.append(window)
            if len(batch) == batch_size:
                run()
        if batch:
            run()
        pooled = sums[EMBEDDING] / count
        pooled /= _norms(pooled[None, :])[0]
        return AudioEncoding(pooled.astype(np.float32),
                             {h: (sums[HEAD_PREFIX + h] / count).astype(np.float32)
                              for h in heads}, clip.n / self.sample_rate, count)

    def _pool(self, windows: list[dict[str, np.ndarray]], heads: list[str],
              n_samples: int) -> AudioEncoding:
        """The encoding of a one-segment input."""
        (w,) = windows
        return AudioEncoding(w[EMBEDDING].astype(np.float32, copy=True),
                             {h: w[HEAD_PREFIX + h].copy() for h in heads},
                             n_samples / self.sample_rate, 1)

    def _check_embedding(self, emb: np.ndarray, rows: int, role: str) -> None:
        if emb.shape != (rows, self.embed_dim):
            raise BundleError(f"{self.bundle.root}: the {role} tower returned an embedding of "
                              f"shape {emb.shape}, expected ({rows}, {self.embed_dim})")
        if not np.isfinite(emb).all():
            raise BundleError(f"{self.bundle.root}: the {role} tower returned a non-finite "
                              f"embedding (NaN or Inf) for valid input; the model is broken "
                              f"for this input (was it exported and calibrated correctly?)")

    # -- text

    def embed_text(self, texts: str | Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """float32 [B, embed_dim], L2-normalised; B = 1 for a single string. An INT8 text
        tower runs one text at a time (see the module docstring: Determinism)."""
        _check_batch_size(batch_size)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("embed_text: texts must be strings")
        tokenizer = self.bundle.tokenizer()
        tower = self.bundle.tower("text")
        if tower.spec.precision == "int8":  # one activation scale per batch: run alone
            batch_size = 1
        ids = tokenizer.encode(texts)
        for i, x in enumerate(ids):
            if not x:
                raise ConfigError(f"embed_text: text {i} ({texts[i]!r}) has no tokens")
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
        for _, group in itertools.groupby(order, key=lambda i: len(ids[i])):
            group = list(group)
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                input_ids, mask = tokenizer.pad_batch([ids[i] for i in chunk])
                result = tower.run({INPUT_IDS: input_ids, ATTENTION_MASK: mask}, [EMBEDDING])
                self._check_embedding(result[EMBEDDING], len(chunk), "text")
                out[chunk] = result[EMBEDDING]
        return out

    # -- tagging

    def _bank_spec(self, name: str):
        spec = self.manifest.banks.get(name)
        if spec is None:
            known = sorted(self.manifest.banks) + sorted(self.manifest.towers.audio.heads)
            raise ConfigError(f"no label bank or attribute head {name!r}; this bundle has "
                              f"{known}")
        return spec

    def default_bank(self) -> str:
        """The bank ``tag`` uses when none is named."""
        if self.manifest.default_bank is not None:
            return self.manifest.default_bank
        if len(self.manifest.banks) == 1:
            return next(iter(self.manifest.banks))
        raise ConfigError(f"name a bank: this bundle has {self.banks} and no default_bank")

    def bank_scores(self, audio, bank: str, sample_rate: int | None = None) -> np.ndarray:
        """Cosine similarity of the audio to every label of ``bank``: float32 [n_labels]."""
        self._bank_spec(bank)
        emb = self.embed_audio(audio, sample_rate)[0]
        return self.bundle.bank(bank) @ emb

    def _bank_tags(self, emb: np.ndarray, name: str, k: int | None) -> list[Tag]:
        spec = self._bank_spec(name)
        matrix = self.bundle.bank(name)
        n = len(spec.labels)
        want = n if spec.multi_label or k is None else min(k, n)
        scores, ids = topk(emb[None, :], matrix, want)
        tags = [Tag(spec.labels[i], float(s), int(i)) for s, i in zip(scores[0], ids[0])]
        if spec.multi_label:
            tags = [t for t in tags if t.score >= spec.thresholds[t.label]]
            tags = tags if k is None else tags[:k]
        return tags

    def _head_tags(self, logits: np.ndarray, name: str, k: int | None) -> list[Tag]:
        labels = self.manifest.towers.audio.heads[name]
        probs = _softmax(logits)
        order = np.argsort(-probs, kind="stable")[:k]
        return [Tag(labels[i], float(probs[i]), int(i)) for i in order]

    def _tagger_fits(self, name: str, k: int | None) -> bool:
        """The fused tagger answers in one call when it holds this bank and enough labels,
        the bank is single-label, and the audio is one segment (long audio is pooled over
        windows, which only the audio tower's embeddings allow; the caller checks that)."""
        tagger = self.manifest.towers.tagger
        if tagger is not None and self.bundle.native_problem() is None:
            return False  # tagger.onnx holds the ONNX front end: the native one is faster
        return (tagger is not None and tagger.bank == name and k is not None
                and k <= tagger.k and not self.manifest.banks[name].multi_label)

    def _tag_with_tagger(self, signal: np.ndarray, name: str, k: int) -> list[Tag]:
        (seg,) = segment(signal, self.sample_rate, self.manifest.clip)
        waveform, mask = batch_segments([seg], padded_length(len(seg), self._bucket()))
        result = self.bundle.tower("tagger").run({WAVEFORM: waveform, ATTENTION_MASK: mask},
                                                 [SCORES, INDICES])
        labels = self.manifest.banks[name].labels
        return [Tag(labels[int(i)], float(s), int(i))
                for s, i in zip(result[SCORES][0][:k], result[INDICES][0][:k])]

    def tag(self, audio, bank: str | None = None, k: int | None = 3, *,
            sample_rate: int | None = None) -> list[Tag]:
        """Top-``k`` labels of one bank (or attribute head) for one input, best first.

        ``bank``: a bank or head name (default: the manifest's ``default_bank``).
        Multi-label banks return the labels whose score reaches their threshold (at most
        ``k``; ``k=None``: all). Uses ``tagger.onnx`` in one call when it fits, else the
        audio tower and the native top-k kernel.
        """
        _check_k(k)
        name = self.default_bank() if bank is None else bank
        clip = self._segments(audio, sample_rate)
        if name in self.manifest.towers.audio.heads:
            enc = self._encode([clip], DEFAULT_BATCH)[0]
            return self._head_tags(enc.heads[name], name, k)
        self._bank_spec(name)
        if self._tagger_fits(name, k):
            signal = clip.head()
            if signal is not None:
                return self._tag_with_tagger(signal, name, k)
        return self._bank_tags(self._encode([clip], DEFAULT_BATCH)[0].embedding, name, k)

    def tag_all(self, audio, banks: Iterable[str] | None = None, k: int | None = 3, *,
                sample_rate: int | None = None) -> dict[str, list[Tag]]:
        """Tags of several banks and attribute heads (default: all of them) from ONE pass
        of the audio tower. Keys are bank or head names."""
        _check_k(k)
        names = self.banks + self.heads if banks is None else list(banks)
        for name in names:
            if name not in self.manifest.towers.audio.heads:
                self._bank_spec(name)
        enc = self._encode([self._segments(audio, sample_rate)], DEFAULT_BATCH)[0]
        return {name: (self._head_tags(enc.heads[name], name, k)
                       if name in self.manifest.towers.audio.heads
                       else self._bank_tags(enc.embedding, name, k))
                for name in names}

    # -- rewards and attributes

    def score(self, audio, text: str, *, sample_rate: int | None = None) -> float:
        """Cosine similarity between one audio input and one text."""
        return float(self.embed_audio(audio, sample_rate)[0] @ self.embed_text([text])[0])

    def rerank(self, candidates: Sequence[Any], prompt: str, *,
               sample_rate: int | None = None,
               batch_size: int = DEFAULT_BATCH) -> list[Ranked]:
        """Candidates sorted by cosine similarity to ``prompt``, best first (ties keep the
        input order): ParaSpeechCLAP's best-of-N reward for TTS."""
        candidates = list(candidates)
        if not candidates:
            return []
        emb = self.embed_audio(candidates, sample_rate, batch_size=batch_size)
        scores = emb @ self.embed_text([prompt])[0]
        order = np.argsort(-scores, kind="stable")
        return [Ranked(candidates[i], float(scores[i])) for i in order]

    def ordinal(self, audio, attribute: str, *, sample_rate: int | None = None) -> float:
        """A scalar from an ordinal bank's anchors (e.g. low/medium/high arousal):
        ``sum_i softmax(logit_scale * cos_i) * value_i``, the softmax taken over the bank's
        labels; the result lies between the smallest and the largest anchor value."""
        spec = self._bank_spec(attribute)
        if spec.kind != "ordinal":
            ordinal = sorted(n for n, b in self.manifest.banks.items() if b.kind == "ordinal")
            raise ConfigError(f"bank {attribute!r} is {spec.kind}, not ordinal; ordinal banks: "
                              f"{ordinal}")
        cos = self.bank_scores(audio, attribute, sample_rate)
        weights = _softmax(self.manifest.logit_scale * cos.astype(np.float64))
        values = np.array([spec.values[label] for label in spec.labels], dtype=np.float64)
        return float(weights @ values)

    # -- streaming (see ``stream``)

    def create_stream(self, window_s: float = 2.0, hop_s: float = 0.5,
                      banks: Iterable[str] | None = None, *, k: int | None = 3,
                      smooth: int = 1, max_buffer_s: float = 60.0, reuse: str = "auto",
                      max_events: int = 256) -> AudioStream:
        """A stream tagged with ``banks`` (bank or head names; default: the default bank;
        ``[]``: embeddings only) over windows of ``window_s`` every ``hop_s``.
        ``reuse``: "auto" | "frames" | "approx" | "off", work reuse across overlapping
        windows: a causal bundle's step, front-end frames (see ``stream``);
        ``max_events``: undrained ``results()`` kept."""
        _check_k(k)
        names = [self.default_bank()] if banks is None else list(banks)
        for name in names:
            self.labels(name)
        config = StreamConfig(float(window_s), float(hop_s), tuple(names), k, smooth,
                              float(max_buffer_s), reuse, max_events)
        plan, reason = plan_reuse(self, config)
        log.info("stream (window %g s, hop %g s): %s", config.window_s, config.hop_s,
                 reason if plan is not None else f"encoding full windows: {reason}")
        return AudioStream(self.sample_rate, config, plan, reason)

    def is_ready(self, stream: AudioStream) -> bool:
        """Whether ``decode(stream)`` has a window to decode."""
        return stream.is_ready()

    def decode(self, stream: AudioStream) -> StreamEvent | None:
        """Decode the stream's next window into an event (also queued for
        ``stream.results()``); None when no window is ready."""
        with stream.decode_lock:
            item = stream.take_window()
            if item is None:
                return None
            start, end, samples = item
            enc = encode_window(self, stream, start, samples)
            if enc is None:
                enc = self._encode([samples], DEFAULT_BATCH)[0]
            stream.recent.append(enc)
            basis = smoothed(list(stream.recent))
            heads = self.manifest.towers.audio.heads
            tags = {name: (self._head_tags(basis.heads[name], name, stream.config.k)
                           if name in heads else
                           self._bank_tags(basis.embedding, name, stream.config.k))
                    for name in stream.config.banks}
            event = StreamEvent(start / self.sample_rate, end / self.sample_rate,
                                enc.embedding, tags)
            stream._emit(event)
            return event


ClapRuntime = Runtime
