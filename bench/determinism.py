"""Determinism: is the same input's embedding the same, bit for bit?

    python -m clapedge.bench.determinism [--bundle build/default-int8] [--doc docs/reliability.md]

Measured on one bundle, CPU execution provider, this machine:

- repeated calls: each input embedded ``--repeats`` times (audio clips of several lengths,
  ``tag``, texts);
- batch shapes: each clip alone vs in batches of 2, 4 and 8 clips of the same length
  through ``embed_audio(..., batch_size=b)``, and with ``batch_size=1``; and, at the tower,
  a clip zero-padded with attention mask 0 to a longer clip's length and batched with it
  (what a bundle with ``clip.bucket_seconds > 0`` does) vs the clip alone, unpadded;
- texts alone vs batched with texts of the same token count;
- processes: two fresh interpreters embed the same inputs; their outputs are compared
  with each other and with this process;
- intra-op threads: ``Runtime(threads=1)`` vs ``threads=2``.

For each: how many results are bit-identical and the largest absolute difference of any
embedding component. ``--doc`` writes the ``determinism`` section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LENGTHS = (0.3, 1.0, 2.5, 6.0, 10.0, 25.0)
TEXTS = ("a calm, low-pitched female voice", "an angry man shouting",
         "a whispering speaker", "a happy voice speaking fast",
         "a slow, sad, deep male voice", "a neutral mid-pitched woman",
         "a loud and expressive speech", "quiet monotone speech")


def clips(rate: int, seed: int = 0) -> list[np.ndarray]:
    """Deterministic voiced test signals, one per length in ``LENGTHS``, and 8 more of 2 s
    (for same-length batches)."""
    from clapedge.bench.load import _synthetic

    rng = np.random.default_rng(seed)
    out = [_synthetic(rng, int(s * rate), rate) for s in LENGTHS]
    return out + [_synthetic(rng, 2 * rate, rate) for _ in range(8)]


@dataclass
class Compare:
    """Bit-identical rows and the largest absolute difference between two stacks."""

    name: str
    rows: int = 0
    identical: int = 0
    max_abs: float = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> "Compare":
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        assert a.shape == b.shape, (self.name, a.shape, b.shape)
        for x, y in zip(a, b):
            self.rows += 1
            self.identical += int(x.tobytes() == y.tobytes())
            self.max_abs = max(self.max_abs, float(np.max(np.abs(x.astype(np.float64) - y))))
        return self

    def row(self) -> str:
        return (f"| {self.name} | {self.identical} / {self.rows} | "
                f"{'0' if self.max_abs == 0 else f'{self.max_abs:.2e}'} |")


def embed_all(rt, signals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The reference results: each clip and text alone, single-input calls."""
    audio = np.stack([rt.embed_audio(x, sample_rate=rt.sample_rate)[0] for x in signals])
    text = np.stack([rt.embed_text(t)[0] for t in TEXTS])
    return audio, text


def _worker(bundle: str, out: str, threads: int | None) -> None:
    from clapedge.runtime import Runtime

    rt = Runtime(bundle, threads=threads)
    audio, text = embed_all(rt, clips(rt.sample_rate))
    np.save(out + ".audio.npy", audio)
    np.save(out + ".text.npy", text)


def in_subprocess(bundle: Path, out: Path, threads: int | None = None) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """``embed_all`` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "clapedge.bench.determinism", "--bundle", str(bundle),
           "--worker", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True)
    return (np.load(str(out) + ".audio.npy", allow_pickle=False),
            np.load(str(out) + ".text.npy", allow_pickle=False))


def tower_padding(rt, signal: np.ndarray, longer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clip alone, unpadded; the clip zero-padded with mask 0 to ``longer``'s length and
    batched with it), straight through the audio tower."""
    from clapedge.runtime.audio import batch_segments
    from clapedge.runtime.manifest import ATTENTION_MASK, EMBEDDING, WAVEFORM

    tower = rt.bundle.tower("audio")
    alone = tower.run(dict(zip((WAVEFORM, ATTENTION_MASK), batch_segments([signal]))),
                      [EMBEDDING])[EMBEDDING][0]
    both = tower.run(dict(zip((WAVEFORM, ATTENTION_MASK), batch_segments([signal, longer]))),
                     [EMBEDDING])[EMBEDDING][0]
    return alone, both


def measure(bundle: Path, repeats: int = 5, workdir: Path | None = None) -> list[Compare]:
    from clapedge.runtime import Runtime

    rt = Runtime(bundle)
    signals = clips(rt.sample_rate)
    ref_audio, ref_text = embed_all(rt, signals)
    results = []

    rep = Compare(f"repeated calls ({repeats}x): audio, {len(LENGTHS)} lengths "
                  f"{LENGTHS[0]:g}-{LENGTHS[-1]:g} s + 8 clips of 2 s")
    tags = Compare(f"repeated calls ({repeats}x): `tag` scores")
    txt = Compare(f"repeated calls ({repeats}x): text, {len(TEXTS)} texts")
    ref_tags = [np.array([t.score for t in rt.tag(x, sample_rate=rt.sample_rate)])
                for x in signals]
    for _ in range(repeats):
        rep.add(np.stack([rt.embed_audio(x, sample_rate=rt.sample_rate)[0] for x in signals]),
                ref_audio)
        txt.add(np.stack([rt.embed_text(t)[0] for t in TEXTS]), ref_text)
        for x, ref in zip(signals, ref_tags):
            tags.add(np.array([t.score for t in rt.tag(x, sample_rate=rt.sample_rate)]), ref)
    results += [rep, tags, txt]

    same = signals[len(LENGTHS):]  # 8 clips of 2 s
    ref_same = ref_audio[len(LENGTHS):]
    for b in (2, 4, 8):
        results.append(Compare(f"2 s clip alone vs in a batch of {b} (same length)").add(
            rt.embed_audio([(x, rt.sample_rate) for x in same], batch_size=b), ref_same))
    results.append(Compare("all clips in one call, `batch_size=1`, vs alone").add(
        rt.embed_audio([(x, rt.sample_rate) for x in signals], batch_size=1), ref_audio))
    results.append(Compare("all clips in one call (default batching) vs alone").add(
        rt.embed_audio([(x, rt.sample_rate) for x in signals]), ref_audio))
    pad = Compare("tower: clip alone vs zero-padded (mask 0) and batched with a longer clip")
    for x, longer in ((signals[1], signals[2]), (signals[2], signals[3]),
                      (same[0], signals[3]), (signals[3], signals[4])):
        pad.add(*tower_padding(rt, x, longer))
    results.append(pad)
    by_len: dict[int, list[str]] = {}
    for t in TEXTS:
        by_len.setdefault(len(rt.bundle.tokenizer().encode([t])[0]), []).append(t)
    batched = Compare("text alone vs batched with texts of the same token count")
    for group in by_len.values():
        if len(group) > 1:
            batched.add(rt.embed_text(group), np.stack([ref_text[TEXTS.index(t)]
                                                        for t in group]))
    if batched.rows:
        results.append(batched)
        raw = Compare("text tower run on those batches directly (what `embed_text` avoids "
                      "for an INT8 text tower)")
        tok, tower = rt.bundle.tokenizer(), rt.bundle.tower("text")
        for group in by_len.values():
            if len(group) > 1:
                ids, mask = tok.pad_batch(tok.encode(group))
                out = tower.run({"input_ids": ids, "attention_mask": mask}, ["embedding"])
                raw.add(out["embedding"], np.stack([ref_text[TEXTS.index(t)] for t in group]))
        results.append(raw)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        a1, t1 = in_subprocess(bundle, Path(tmp) / "p1")
        a2, t2 = in_subprocess(bundle, Path(tmp) / "p2")
        results.append(Compare("process 1 vs process 2 (audio + text)").add(
            np.concatenate([a1, t1]), np.concatenate([a2, t2])))
        results.append(Compare("process 1 vs this process (audio + text)").add(
            np.concatenate([a1, t1]), np.concatenate([ref_audio, ref_text])))
        a3, t3 = in_subprocess(bundle, Path(tmp) / "p3", threads=1)
        a4, t4 = in_subprocess(bundle, Path(tmp) / "p4", threads=2)
        results.append(Compare("intra-op threads 1 vs 2 (audio + text)").add(
            np.concatenate([a3, t3]), np.concatenate([a4, t4])))
    return results


def markdown(results: list[Compare], *, command: str, machine: str, bundle: str,
             providers: str) -> str:
    lines = [f"Command: `{command}`  ", f"Bundle: `{bundle}` ({providers}). Machine: {machine}.",
             "", "| comparison | bit-identical embeddings | max abs difference |",
             "|---|---:|---:|"]
    lines += [r.row() for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("build/default-int8"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--doc", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(str(args.bundle), args.worker, args.threads)
        return 0
    from clapedge.bench.report import ROOT, machine_line, write_section
    from clapedge.runtime import Runtime

    machine = machine_line()
    results = measure(args.bundle, args.repeats)
    providers = " > ".join(Runtime(args.bundle).bundle.tower("audio").providers)
    body = markdown(results, command="python -m clapedge.bench.determinism "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    machine=machine, bundle=str(args.bundle), providers=providers)
    print(body)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    if args.doc:
        write_section("determinism", body, args.doc if args.doc.is_absolute()
                      else ROOT / args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
