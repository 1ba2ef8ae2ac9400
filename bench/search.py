"""Benchmark of the embedding index (``clapedge.runtime.index``) at scale.

    python -m clapedge.bench.search [--n 1000000] [--dims 256,512] [--bundle BUNDLE]

For each D: N synthetic normalised embeddings (seeded) are added to a new int8 index (with
its float32 re-rank copy) in batches of 100,000 (one segment each, the way `clap-index add`
commits) and compacted into one segment; then it times

- storage: add throughput (vectors/s, segment write + catalog commit) and compaction;
- open: the first open after writing (checks the whole segment's checksum), then opens with
  the verified record (checks structure and headers; the target is <= 200 ms), and
  ``verify="quick"``;
- search: end to end per text query = text tower of a bundle + the kernel over N vectors +
  metadata lookup (target <= 30 ms p50), its split, and with a path-prefix filter (an
  allow-list of 10 % of the records inside the kernel);
- quality: top-10 through the int8 index vs exact brute force (float64) on random queries;
- ingest: `Indexer.add` with the bundle (clips/s and the share of the time spent in storage)
  of the test split of the styled-speech corpus (``--corpus``, default data/corpus-default),
  whose captions then query the index: top-10 identical to brute force over embeddings made
  separately with ``Runtime.embed_audio``? (Generated 4 s clips when there is no corpus.)

The bundle (text and audio towers): ``--bundle``, else ``models/default`` exported to fp32 if
it exists, else the default architecture (all-MiniLM-L6-v2 text tower from its pip package,
untrained audio tower and projections) exported to fp32: representative for latency, not for
retrieval quality; the report says which. For D other than the bundle's dimension the query
vectors are synthetic and the text tower time is the bundle's, measured in the same loop.
Writes its section of docs/benchmarks.md. Needs the [export] extra to build a bundle.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clapedge.bench.topk import busy_fraction, wait_until_idle
from clapedge.runtime.manifest import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SECTION_BEGIN = "<!-- bench:search:begin -->"
SECTION_END = "<!-- bench:search:end -->"
COMMAND = "python -m clapedge.bench.search"
BATCH = 100_000
QUERIES = [
    "a calm, low-pitched female voice", "an angry man shouting", "a woman whispering slowly",
    "a happy child laughing", "a fast, high-pitched male voice", "a sad, quiet voice",
    "a neutral speaker with a scottish accent", "an expressive, loud voice",
    "a deep, creaky voice speaking slowly", "a monotone female speaker",
]


@dataclass
class Result:
    dim: int
    n: int
    add_s: float = 0.0
    compact_s: float = 0.0
    first_open_ms: float = 0.0
    open_ms: list[float] = field(default_factory=list)
    quick_open_ms: list[float] = field(default_factory=list)
    text_ms: list[float] = field(default_factory=list)
    kernel_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    filtered_ms: list[float] = field(default_factory=list)
    raw_kernel_ms: list[float] = field(default_factory=list)
    busy_before: float = 0.0
    busy_after: float = 0.0
    identical_top10: float = 0.0
    recall10: float = 0.0
    disk_bytes: int = 0
    synthetic_query: bool = False


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def synthetic(n: int, dim: int, seed: int, start: int = 0) -> np.ndarray:
    x = np.random.default_rng([seed, dim, start]).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --------------------------------------------------------------------------- the bundle

def get_bundle(args, work: Path) -> tuple[Path, str]:
    if args.bundle:
        return Path(args.bundle), f"given bundle {args.bundle}"
    trained = ROOT / "models" / "default"
    # The cache is keyed by the weights, so a retrained (or newly trained) models/default is
    # exported again instead of reusing an older bundle.
    weights = trained / "model.safetensors"
    key = sha256_file(weights)[:12] if weights.is_file() else "untrained"
    out = work / f"bundle-default-{key}-fp32"
    if (out / "manifest.json").exists():
        note = (out / "NOTE").read_text().strip() if (out / "NOTE").exists() else "cached"
        return out, note
    from clapedge.export.pipeline import ExportOptions, export_bundle

    if (trained / "config.json").exists():
        model_dir, note = trained, "models/default exported to fp32"
    else:
        from clapedge.models.minilm import build_default_model

        model_dir = build_default_model().save_dir(work / "default-untrained")
        note = ("default architecture, fp32: all-MiniLM-L6-v2 text tower (pip package), "
                "untrained audio tower and projections (no trained models/default yet)")
    print(f"exporting a bundle: {note}", flush=True)
    export_bundle(model_dir, out, ExportOptions(precision="fp32", banks="none"))
    (out / "NOTE").write_text(note + "\n")
    return out, note


# --------------------------------------------------------------------------- measurements

def build_index(path: Path, n: int, dim: int, fingerprint: str, seed: int, r: Result) -> None:
    from clapedge.runtime.index import Index

    t_add = 0.0
    with Index.create(path, fingerprint, dim) as idx:
        rng = np.random.default_rng(seed)
        for start in range(0, n, BATCH):
            m = min(BATCH, n - start)
            x = synthetic(m, dim, seed, start)
            rows = np.arange(start, start + m)
            paths = [f"/corpus/spk{i % 1000:04d}/clip{i:07d}.wav" for i in rows]
            durations = rng.uniform(1.0, 30.0, m)
            t0 = time.perf_counter()
            idx.add_embeddings(x, paths, start_s=0.0, end_s=durations, duration_s=durations)
            t_add += time.perf_counter() - t0
            print(f"  added {start + m:,} / {n:,}", flush=True)
        r.add_s = t_add
        t0 = time.perf_counter()
        idx.compact()
        r.compact_s = time.perf_counter() - t0
    r.disk_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_opens(path: Path, r: Result) -> None:
    from clapedge.runtime.index import Index

    time.sleep(2.2)  # let the fresh segment settle, so the verified record may keep it
    t0 = time.perf_counter()
    Index.open(path, readonly=True).close()
    r.first_open_ms = 1e3 * (time.perf_counter() - t0)
    for verify, out in (("auto", r.open_ms), ("quick", r.quick_open_ms)):
        for _ in range(5):
            t0 = time.perf_counter()
            Index.open(path, readonly=True, verify=verify).close()
            out.append(1e3 * (time.perf_counter() - t0))


def time_search(path: Path, rt, runs: int, r: Result, wait_idle: float) -> None:
    from clapedge.kernels import Gallery, topk
    from clapedge.runtime.index import Filter, Index

    r.busy_before = wait_until_idle(wait_idle) if wait_idle else busy_fraction()
    (gallery_file,) = path.glob("segments/*/gallery.bin")
    gallery = Gallery.load(gallery_file, mmap=True)
    with Index.open(path, readonly=True) as idx:
        r.synthetic_query = rt.embed_dim != r.dim
        qs = synthetic(runs + 5, r.dim, 99)
        flt = Filter(path_prefix="/corpus/spk00")  # spk0000..0099: 10 % of the records
        for i in range(runs + 5):
            text = QUERIES[i % len(QUERIES)]
            t0 = time.perf_counter()
            emb = rt.embed_text([text])
            t1 = time.perf_counter()
            q = qs[i:i + 1] if r.synthetic_query else emb
            hits = idx.search(q, 10)
            t2 = time.perf_counter()
            assert len(hits[0]) == 10
            t3 = time.perf_counter()
            idx.search(q, 10, filter=flt)
            t4 = time.perf_counter()
            topk(q, gallery, 10)
            t5 = time.perf_counter()
            if i >= 5:  # warm-up
                r.raw_kernel_ms.append(1e3 * (t5 - t4))
                r.text_ms.append(1e3 * (t1 - t0))
                r.kernel_ms.append(1e3 * (t2 - t1))
                r.total_ms.append(1e3 * (t2 - t0))
                r.filtered_ms.append(1e3 * (t4 - t3))
    r.busy_after = busy_fraction()


def check_quality(path: Path, n: int, dim: int, seed: int, queries: int, r: Result) -> None:
    from clapedge.runtime.index import Index

    q = synthetic(queries, dim, 7)
    best_s = np.full((queries, 10), -np.inf)
    best_i = np.zeros((queries, 10), dtype=np.int64)
    for start in range(0, n, BATCH):  # exact top-10 in float64, streamed
        x = synthetic(min(BATCH, n - start), dim, seed, start).astype(np.float64)
        s = q.astype(np.float64) @ x.T
        ids = np.arange(start, start + len(x))
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :10]
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
    with Index.open(path, readonly=True) as idx:
        got = [[h.id for h in row] for row in idx.search(q, 10)]
    r.identical_top10 = float(np.mean([g == b.tolist() for g, b in zip(got, best_i)]))
    r.recall10 = float(np.mean([len(set(g) & set(b.tolist())) / 10 for g, b in zip(got, best_i)]))


@dataclass
class Ingest:
    clips: int
    seconds: float
    total_s: float
    store_s: float
    embed_s: float
    decode_s: float


def time_ingest(rt, work: Path, clips: int) -> Ingest:
    import soundfile as sf

    from clapedge.runtime.indexer import Indexer, open_or_create

    wavs = work / "ingest-wavs"
    shutil.rmtree(wavs, ignore_errors=True)
    wavs.mkdir(parents=True)
    rate = 16000
    rng = np.random.default_rng(0)
    for i in range(clips):
        t = np.arange(4 * rate) / rate
        x = 0.2 * np.sin(2 * np.pi * (120 + 7 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(wavs / f"clip{i:04d}.wav", x.astype(np.float32), rate, subtype="PCM_16")
    path = work / "ingest.index"
    shutil.rmtree(path, ignore_errors=True)
    with open_or_create(path, rt) as idx:
        rep = Indexer(idx, rt).add([wavs])
    assert rep.files_added == clips, rep.failed
    return Ingest(clips, rep.seconds_audio, rep.total_s, rep.store_s, rep.embed_s, rep.decode_s)


@dataclass
class CorpusQuality:
    corpus: str
    clips: int
    queries: int
    identical_top10: float
    max_score_diff: float
    r10_index: float
    r10_brute: float
    ingest: Ingest


def corpus_quality(rt, corpus: Path, work: Path) -> CorpusQuality:
    """Index the corpus's test split with `Indexer.add`, then search every clip's first
    caption through the index and by brute force (float64) over embeddings computed
    independently with `Runtime.embed_audio`: are the top-10 lists identical?"""
    import json

    from clapedge.runtime.indexer import Indexer, open_or_create

    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "test"]
    paths = [str((corpus / r["path"]).resolve()) for r in rows]
    path = work / "corpus-test.index"
    shutil.rmtree(path, ignore_errors=True)
    with open_or_create(path, rt) as idx:
        rep = Indexer(idx, rt).add(paths)
        assert rep.files_added == len(paths) and rep.records == len(paths), rep.failed
        ingest = Ingest(len(paths), rep.seconds_audio, rep.total_s, rep.store_s, rep.embed_s,
                        rep.decode_s)
        audio = rt.embed_audio(paths).astype(np.float64)  # independent of the index
        captions = [r["captions"][0] for r in rows]
        text = rt.embed_text(captions)
        hits = idx.search(text, 10)
        by_id = idx.records(idx.ids())
    scores = text.astype(np.float64) @ audio.T
    same, diff, r10_i, r10_b = 0, 0.0, 0, 0
    for qi, row in enumerate(hits):
        got = [by_id[h.id].path for h in row]
        order = np.argsort(-scores[qi], kind="stable")[:10]
        want = [paths[i] for i in order]
        same += got == want
        diff = max(diff, float(np.max(np.abs(np.array([h.score for h in row])
                                             - scores[qi][order]))))
        r10_i += paths[qi] in got
        r10_b += paths[qi] in want
    n = len(rows)
    shutil.rmtree(path, ignore_errors=True)
    return CorpusQuality(str(corpus), n, n, same / n, diff, r10_i / n, r10_b / n, ingest)


# --------------------------------------------------------------------------- report

def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from clapedge.kernels import simd_level

    load = os.getloadavg()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores visible, {mem:.0f} GiB RAM, kernel SIMD level "
            f"{simd_level()}, Python {platform.python_version()}; load average at start "
            f"{load[0]:.1f} (shared machine)")


def markdown(results: list[Result], ingest: Ingest, note: str, command: str, machine: str,
             rt, quality: CorpusQuality | None) -> str:
    rows = []
    for r in results:
        q = " (synthetic query vector)" if r.synthetic_query else ""
        rows.append(
            f"| {r.n:,} x {r.dim} | {r.n / r.add_s:,.0f} vec/s ({r.add_s:.1f} s) | "
            f"{r.compact_s:.1f} s | {r.disk_bytes / 2**30:.2f} GiB | {r.first_open_ms:.0f} ms | "
            f"**{statistics.median(r.open_ms):.1f} ms** | "
            f"{statistics.median(r.quick_open_ms):.1f} ms | "
            f"{p(r.text_ms, 50):.1f} ms{q} | {p(r.kernel_ms, 50):.1f} ms "
            f"({p(r.raw_kernel_ms, 50):.1f} ms) | "
            f"**{p(r.total_ms, 50):.1f} ms** / {p(r.total_ms, 95):.1f} ms | "
            f"{p(r.filtered_ms, 50):.1f} ms | {100 * r.identical_top10:.0f} % "
            f"(recall {r.recall10:.3f}) | {100 * r.busy_before:.0f} % / "
            f"{100 * r.busy_after:.0f} % |")
    if quality is not None:
        ingest = quality.ingest
        source = (f"the {quality.clips} clips of the test split of `{quality.corpus}` "
                  f"(styled speech, {ingest.seconds:.0f} s)")
    else:
        source = f"{ingest.clips} generated 4 s wav clips"
    share = ingest.store_s / ingest.total_s
    corpus_line = [] if quality is None else [
        "",
        f"Quality on the corpus test split: each clip's first caption as the query "
        f"({quality.queries} queries), top-10 through the int8 index vs brute force in "
        f"float64 over embeddings computed separately with `Runtime.embed_audio`: "
        f"**{100 * quality.identical_top10:.1f} % identical** (max score difference "
        f"{quality.max_score_diff:.1e}); text-to-audio R@10 {quality.r10_index:.3f} through "
        f"the index, {quality.r10_brute:.3f} brute force (the bundle's model: see above)."]
    return "\n".join([
        SECTION_BEGIN,
        "## Index and search (`clapedge.runtime.index`, `clap-search`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
        f"Bundle: {note} (`{rt.manifest.model.name}`, D={rt.embed_dim}).",
        "",
        "Index: int8 rows + per-row scale, float32 re-rank copy (exact scores), one segment "
        "after compaction; synthetic normalised embeddings added in batches of 100,000. "
        "Open: first = after writing (CRC-32 of every byte); p50 = later opens, the "
        "segment recorded as verified and untouched (structure, headers, ids checked); "
        "quick = `verify=\"quick\"`. Search: p50 / p95 over the timed queries, k=10, end to "
        "end = text tower (the bundle's text tower with one intra-op thread, as `clap-search` "
        "runs it) + `Index.search` (catalog snapshot check, kernel, metadata lookup); kernel "
        "alone = `kernels.topk` on the same memory-mapped segment; filtered = `Index.search` "
        "with a path-prefix allow-list of 10 % of the records (SQL + mask + kernel + lookup). "
        "CPU busy = the whole machine (other jobs included) over 3 s before and after the "
        "timed queries.",
        "",
        "| vectors | add (storage only) | compact | on disk | first open | open p50 | "
        "quick open | text tower p50 | search p50 (kernel alone) | end to end p50 / p95 | "
        "filtered p50 | top-10 identical to brute force | CPU busy before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Ingest (`Indexer.add` of {source}, this bundle's audio tower on CPU): "
        f"{ingest.clips / ingest.total_s:.1f} clips/s "
        f"({ingest.seconds / ingest.total_s:.0f} s of audio per second); decode "
        f"{100 * ingest.decode_s / ingest.total_s:.0f} %, audio tower "
        f"{100 * ingest.embed_s / ingest.total_s:.0f} %, storage (segment + catalog commit, "
        f"fsynced) {100 * share:.1f} % of the time.",
        *corpus_line,
        SECTION_END,
    ]) + "\n"


def write_markdown(path: Path, text: str) -> None:
    from clapedge.bench.report import replace_section

    replace_section(path, text, SECTION_BEGIN, SECTION_END)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dims", default="256,512")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--queries", type=int, default=50, help="Timed text queries per D.")
    ap.add_argument("--quality-queries", type=int, default=100)
    ap.add_argument("--ingest-clips", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clapedge-bench-search",
                    help="Work directory (bundle cache, indexes; indexes are deleted after).")
    ap.add_argument("--no-write", action="store_true", help="Do not update docs/benchmarks.md.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus-default",
                    help="A styled-speech corpus (clap-corpus): its test split is indexed "
                         "for the ingest figures and the top-10 identity check (skipped when "
                         "absent; generated clips are indexed instead).")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="Before timing searches, wait up to this long for other jobs to "
                         "leave the cores idle.")
    args = ap.parse_args(argv)
    machine = machine_line()
    args.work.mkdir(parents=True, exist_ok=True)
    from clapedge.runtime import Runtime
    from clapedge.runtime.index import bundle_fingerprint

    bundle, note = get_bundle(args, args.work)
    rt = Runtime(bundle, threads=1)  # text queries: see time_search
    results = []
    for dim in [int(d) for d in args.dims.split(",")]:
        r = Result(dim, args.n)
        path = args.work / f"synthetic-{dim}.index"
        shutil.rmtree(path, ignore_errors=True)
        fp = bundle_fingerprint(rt.manifest) if dim == rt.embed_dim else "00" * 32
        print(f"D={dim}: building", flush=True)
        build_index(path, args.n, dim, fp, args.seed, r)
        time_opens(path, r)
        time_search(path, rt, args.queries, r, args.wait_idle)
        check_quality(path, args.n, dim, args.seed, args.quality_queries, r)
        shutil.rmtree(path, ignore_errors=True)
        results.append(r)
        print(f"D={dim}: open p50 {statistics.median(r.open_ms):.1f} ms, end to end p50 "
              f"{p(r.total_ms, 50):.1f} ms", flush=True)
    full = Runtime(bundle)
    quality = None
    if args.corpus is not None and (args.corpus / "manifest.jsonl").is_file():
        print(f"corpus test split: {args.corpus}", flush=True)
        quality = corpus_quality(full, args.corpus, args.work)
        ingest = quality.ingest
    else:
        ingest = time_ingest(full, args.work, args.ingest_clips)
    command = " ".join([COMMAND] + (argv if argv is not None else sys.argv[1:]))
    text = markdown(results, ingest, note, command, machine, rt, quality)
    print(text)
    if not args.no_write:
        write_markdown(ROOT / "docs" / "benchmarks.md", text)


if __name__ == "__main__":
    main()
