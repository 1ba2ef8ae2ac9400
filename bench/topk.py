"""Benchmark of the fused similarity/top-k kernel against the usual anchors.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m clapedge.bench.topk

(the two variables are unset so that numpy's BLAS runs its full-speed kernels for the anchor;
the bench reports what threadpoolctl sees). Measures the machine's read bandwidth and int8
compute peak itself, then times exact top-k at N=1,000,000, D=512, k=10 with 2 threads for
Q in {1, 16, 256}: numpy (matmul + argpartition), faiss IndexFlatIP (its own path and its
BLAS path), faiss IndexScalarQuantizer QT_8bit, usearch exact search, and clapedge float32 /
fp16 / int8 (with and without re-rank). Prints a table, writes its section of
docs/benchmarks.md and the plot docs/plots/topk.png. Needs the [bench] extra.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import clapedge
from clapedge.kernels import (Gallery, _native, available_simd_levels, set_simd_level,
                              simd_level, topk)

# faiss's OpenMP threads spin while they wait by default; on a machine shared with other jobs
# that makes it several times slower (measured: 4-5x at Q=256 with one core taken), which
# would flatter clapedge. Passive waiting costs it nothing measurable on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SECTION_BEGIN = "<!-- bench:topk:begin -->"
SECTION_END = "<!-- bench:topk:end -->"
COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m clapedge.bench.topk"


@dataclass
class Row:
    method: str
    q: int
    dtype: str
    times: list[float]
    recall: float
    floor_s: float
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def ratio(self) -> float:
        return self.median_ms / (self.floor_s * 1e3)


@dataclass
class Machine:
    cpu: str
    cores: int
    simd: str
    blas: str
    load_before: tuple[float, float, float]
    # read bandwidth (bytes/s, all threads) streaming each dtype's gallery array once: the best
    # of the measurements at the start and at the end of the run
    bandwidth: dict[str, float] = field(default_factory=dict)
    int8_peaks: dict[str, float] = field(default_factory=dict)  # MAC/s per SIMD level
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    busy_before: float = 0.0  # CPU busy fraction from other jobs just before / after the runs
    busy_after: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)


# -- the machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "amx_int8", "avx512_fp16"]
    return " ".join(f for f in wanted if f in flags)


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    parts = []
    for p in threadpool_info():
        if p.get("user_api") == "blas":
            parts.append(f"{p.get('internal_api')} {p.get('version')} "
                         f"({p.get('architecture')}, {p.get('num_threads')} threads)")
    env = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if env:
        parts.append("WARNING: " + ", ".join(env) + " set (numpy's BLAS may run slow kernels)")
    return "; ".join(parts) or "no BLAS found"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "clapedge": clapedge.__version__}
    for name in ("faiss", "usearch"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    return out


def busy_fraction(window_s: float = 3.0) -> float:
    """Fraction of all CPU time spent busy over the next `window_s` seconds (/proc/stat)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_until_idle(max_wait_s: float, threshold: float = 0.15) -> float:
    """Waits (up to max_wait_s) for other jobs to leave the cores idle; returns the busy
    fraction last seen, so the report can say how loaded the machine was."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        print(f"  machine {busy:.0%} busy, waiting for it to go idle ...", flush=True)
        time.sleep(20)
        busy = busy_fraction()
    return busy


def measure_machine(threads: int) -> Machine:
    peaks = {}
    for level in ("amx", "avx512"):
        if level in available_simd_levels():
            peaks[level] = _native.int8_peak_ops(level, threads, 1.0)
    if not peaks:
        peaks[simd_level()] = _native.int8_peak_ops(simd_level(), threads, 1.0)
    return Machine(cpu=cpu_model() + (f" [{cpu_flags()}]" if cpu_flags() else ""),
                   cores=os.cpu_count() or 1, simd=simd_level(), blas=blas_info(),
                   load_before=os.getloadavg(), int8_peaks=peaks, versions=versions())


def measure_bandwidth(machine: Machine, arrays: dict[str, np.ndarray], threads: int) -> None:
    """Streams each gallery array once per repeat (best of 5); keeps the best seen so far."""
    for dtype, arr in arrays.items():
        bw = _native.read_bandwidth(arr, threads, 5)
        machine.bandwidth[dtype] = max(bw, machine.bandwidth.get(dtype, 0.0))


# -- timing -----------------------------------------------------------------------------------

def time_runs(fn, repeats: int, budget_s: float) -> tuple[list[float], object]:
    """One warm-up run, then up to `repeats` timed runs (as many as fit in budget_s, at least
    one, for the slow anchors)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if first > budget_s / 2:  # a run of many seconds: warm-up effects are lost in it
        return [first], out
    n = repeats if first * repeats <= budget_s else max(1, int(budget_s / max(first, 1e-9)))
    times = []
    for _ in range(min(n, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(a[:k].tolist()) & set(b.tolist())) for a, b in zip(ids, truth))
    return hits / truth.size


@contextlib.contextmanager
def blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def numpy_topk(q: np.ndarray, g: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """matmul + argpartition, 64 queries at a time (a 64 x N score block, not Q x N)."""
    out = []
    for i in range(0, q.shape[0], block):
        s = q[i:i + block] @ g.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


# -- the benchmark ----------------------------------------------------------------------------

def run(args) -> tuple[list[Row], Machine]:
    rng = np.random.default_rng(0)
    n, d, k, threads = args.n, args.dim, args.k, args.threads
    print(f"data: N={n:,} D={d} (float32 {n * d * 4 / 2**30:.2f} GiB), k={k}, threads={threads}",
          flush=True)
    g = rng.standard_normal((n, d), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    methods, arrays = build_methods(g, args)
    busy = wait_until_idle(args.wait_idle) if args.wait_idle else busy_fraction()
    machine = measure_machine(threads)
    machine.busy_before = busy
    measure_bandwidth(machine, arrays, threads)
    print(f"machine: {machine.cpu}, {machine.cores} cores; BLAS: {machine.blas}", flush=True)
    print("read bandwidth: " + ", ".join(f"{dt} {bw / 1e9:.1f} GB/s" for dt, bw in
                                         machine.bandwidth.items()), flush=True)
    print("int8 peak: " + ", ".join(f"{lv} {p / 1e9:.0f} GMAC/s" for lv, p in
                                    machine.int8_peaks.items()), flush=True)

    rows: list[Row] = []
    for nq in args.queries:
        q = rng.standard_normal((nq, d), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        with blas_threads(threads):
            truth = numpy_topk(q, g, k)
        for name, dtype, fn in methods:
            if args.methods and not any(m in name for m in args.methods):
                continue
            # The floor is measured right around the row, under the same load from other
            # jobs as the row itself: streaming the same array, best of before and after.
            bw = _native.read_bandwidth(arrays[dtype], threads, 3)
            times, ids = time_runs(lambda: fn(q), args.repeats, args.budget)
            bw = max(bw, _native.read_bandwidth(arrays[dtype], threads, 3))
            floor = n * d * BYTES[dtype] / bw
            rows.append(Row(name, nq, dtype, times, recall_at(np.asarray(ids), truth), floor))
            print(f"  Q={nq:<4} {name:<34} {dtype:<8} {rows[-1].median_ms:9.1f} ms  "
                  f"floor {floor * 1e3:7.1f} ms  x{rows[-1].ratio:5.2f}  "
                  f"recall {rows[-1].recall:.4f}", flush=True)
    measure_bandwidth(machine, arrays, threads)
    machine.load_after = os.getloadavg()
    machine.busy_after = busy_fraction()
    return rows, machine


BYTES = {"float32": 4, "fp16": 2, "int8": 1}


def build_methods(g: np.ndarray, args):
    n, d, k, threads = g.shape[0], g.shape[1], args.k, args.threads
    methods = []

    def np_method(q):
        with blas_threads(threads):
            return numpy_topk(q, g, k)
    methods.append(("numpy matmul+argpartition", "float32", np_method))

    try:
        import faiss
        faiss.omp_set_num_threads(threads)
        flat = faiss.IndexFlatIP(d)
        flat.add(g)
        default_threshold = faiss.cvar.distance_compute_blas_threshold

        def flat_search(q, blas=False):
            faiss.cvar.distance_compute_blas_threshold = 1 if blas else default_threshold
            try:
                with blas_threads(threads):
                    return flat.search(q, k)[1]
            finally:
                faiss.cvar.distance_compute_blas_threshold = default_threshold
        methods.append(("faiss IndexFlatIP", "float32", flat_search))
        methods.append(("faiss IndexFlatIP (BLAS)", "float32", lambda q: flat_search(q, True)))
        sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(g[:: max(1, n // 100_000)])
        sq.add(g)
        methods.append(("faiss SQ8 (QT_8bit)", "int8", lambda q: sq.search(q, k)[1]))
    except ImportError:
        print("faiss not installed: pip install 'clapedge[bench]'", file=sys.stderr)

    try:
        from usearch.index import MetricKind, search
        methods.append(("usearch exact", "float32",
                        lambda q: search(g, q, k, MetricKind.IP, exact=True, threads=threads).keys
                        .reshape(q.shape[0], -1)))
    except ImportError:
        print("usearch not installed: pip install 'clapedge[bench]'", file=sys.stderr)

    g16 = Gallery(g, "fp16")
    g8 = Gallery(g, "int8", rerank=True, copy=False)  # the re-rank copy is g itself
    methods += [
        ("clapedge float32", "float32", lambda q: topk(q, g, k, threads=threads)[1]),
        ("clapedge fp16", "fp16", lambda q: topk(q, g16, k, threads=threads)[1]),
        ("clapedge int8", "int8", lambda q: topk(q, g8, k, threads=threads, rerank_factor=0)[1]),
        ("clapedge int8+rerank", "int8", lambda q: topk(q, g8, k, threads=threads)[1]),
    ]
    if simd_level() == "amx":  # also show the AVX-512 VNNI path the AMX level replaces
        def vnni(q, rerank_factor):
            set_simd_level("avx512")
            try:
                return topk(q, g8, k, threads=threads, rerank_factor=rerank_factor)[1]
            finally:
                set_simd_level(None)
        methods += [
            ("clapedge int8 [avx512 vnni]", "int8", lambda q: vnni(q, 0)),
            ("clapedge int8+rerank [avx512 vnni]", "int8", lambda q: vnni(q, 4)),
        ]
    arrays = {"float32": g, "fp16": g16._arrays["vectors"], "int8": g8._arrays["codes"]}
    return methods, arrays


# -- the report -------------------------------------------------------------------------------

ANCHORS = ("numpy", "faiss", "usearch")


def find(rows: list[Row], method: str, nq: int) -> Row | None:
    return next((r for r in rows if r.method == method and r.q == nq), None)


def targets(rows: list[Row], machine: Machine, n: int, d: int) -> list[tuple[str, str, bool]]:
    out = []

    def check(name, got, ok):
        out.append((name, got, ok))

    def best(nq, prefix, dtype=None):
        cands = [r for r in rows if r.q == nq and r.method.startswith(prefix)
                 and (dtype is None or r.dtype == dtype)]
        return min(cands, key=lambda r: r.median_ms) if cands else None

    for nq in sorted({r.q for r in rows}):
        i8 = find(rows, "clapedge int8", nq)
        i8r = find(rows, "clapedge int8+rerank", nq)
        flat = best(nq, "faiss IndexFlatIP")  # its own path or its BLAS path, whichever is faster
        npy = find(rows, "numpy matmul+argpartition", nq)
        if i8 is None:
            continue
        if nq == 1:
            for r in (i8, i8r):
                check(f"Q=1 {r.method} within 1.3x of the int8 floor", f"{r.ratio:.2f}x",
                      r.ratio <= 1.3)
            if npy:
                sp = npy.median_ms / i8.median_ms
                check("Q=1 int8 >= 3x faster than numpy", f"{sp:.1f}x", sp >= 3)
            if flat:
                sp = flat.median_ms / i8.median_ms
                check(f"Q=1 int8 >= 6x faster than {flat.method}", f"{sp:.1f}x", sp >= 6)
            f32 = find(rows, "clapedge float32", nq)
            if f32:
                anchors = [a for a in (best(nq, ANCHORS, "float32"), best(nq, ANCHORS)) if a]
                for anchor in {id(a): a for a in anchors}.values():  # the same one once
                    check(f"Q=1 float32 no slower than the best {'float32 ' if anchor.dtype == 'float32' else ''}"
                          f"anchor ({anchor.method})",
                          f"{f32.median_ms:.1f} vs {anchor.median_ms:.1f} ms",
                          f32.median_ms <= anchor.median_ms)
                check("Q=1 float32 within 1.3x of the float32 floor", f"{f32.ratio:.2f}x",
                      f32.ratio <= 1.3)
        if nq == 16 and best(nq, ANCHORS):
            anchor = best(nq, ANCHORS)
            for r in (i8, i8r):
                sp = anchor.median_ms / r.median_ms
                check(f"Q=16 {r.method} >= 5x faster than the best anchor ({anchor.method})",
                      f"{sp:.1f}x", sp >= 5)
        if nq == 256 and flat:
            for r in (i8, i8r, find(rows, "clapedge int8 [avx512 vnni]", nq)):
                if r is None:
                    continue
                sp = flat.median_ms / r.median_ms
                macs = nq * n * d / (r.median_ms / 1e3)
                fracs = ", ".join(f"{macs / p:.0%} of the {lv} int8 peak"
                                  for lv, p in machine.int8_peaks.items())
                check(f"Q=256 {r.method} >= 4x faster than {flat.method}",
                      f"{sp:.1f}x ({macs / 1e9:.0f} GMAC/s: {fracs})", sp >= 4)
    return out


def table(rows: list[Row]) -> str:
    lines = ["| method | Q | dtype | median ms | floor ms | ratio to floor | recall@10 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.q} | {r.dtype} | {r.median_ms:.1f} | "
                     f"{r.floor_s * 1e3:.1f} | {r.ratio:.2f} | {r.recall:.4f} |")
    return "\n".join(lines)


def section(rows: list[Row], machine: Machine, args) -> str:
    checks = targets(rows, machine, args.n, args.dim)
    v = machine.versions
    lb, la = machine.load_before, machine.load_after
    parts = [
        SECTION_BEGIN,
        "## Fused similarity/top-k (`clapedge.kernels.topk`)",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"Machine: {machine.cpu}, {machine.cores} cores; best read bandwidth seen (streaming "
        f"each gallery array, {args.threads} threads, at the start and the end): "
        + ", ".join(f"{dt} {bw / 1e9:.1f} GB/s" for dt, bw in machine.bandwidth.items())
        + "; int8 peak: " + ", ".join(f"{lv} {p / 1e9:.0f} GMAC/s" for lv, p in
                                      machine.int8_peaks.items())
        + f"; SIMD level {machine.simd}. Other jobs share the cores: they kept the CPUs "
        f"{machine.busy_before:.0%} busy just before the runs and {machine.busy_after:.0%} just "
        f"after (load average {lb[0]:.2f} before, {la[0]:.2f} after, ours included).",
        "",
        f"Versions: clapedge {v.get('clapedge')}, numpy {v.get('numpy')} (BLAS: {machine.blas}), "
        f"faiss-cpu {v.get('faiss')}, usearch {v.get('usearch')}, Python {v.get('python')}.",
        "",
        f"N={args.n:,}, D={args.dim}, k={args.k}, {args.threads} threads, random Gaussian data "
        f"(normalised); median of {args.repeats} runs after a warm-up (fewer for runs over "
        f"{args.budget:.0f} s in total; one run for runs over {args.budget / 2:.0f} s). Floor = "
        "N x D values x bytes per value of the dtype (float32 4, fp16 2, int8 1) / the read "
        "bandwidth of streaming that array, measured right before and after the row (best of "
        "3 each), so that a row and its floor see the same load from other jobs. Recall@10 "
        "against exact float32 (numpy). `[avx512 vnni]`: the int8 scan forced to the AVX-512 "
        "VNNI level (the default level here is AMX when the CPU has it). "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} for faiss (see the bench source).",
        "",
        table(rows),
        "",
        "Targets:",
        "",
    ]
    for name, got, ok in checks:
        parts.append(f"- {'met' if ok else 'MISSED'}: {name}: {got}")
    parts += ["", "![latency vs Q](plots/topk.png)", SECTION_END]
    return "\n".join(parts) + "\n"


def write_markdown(path: Path, text: str) -> None:
    from clapedge.bench.report import replace_section

    replace_section(path, text, SECTION_BEGIN, SECTION_END)


def plot(rows: list[Row], machine: Machine, args, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more lines than tab10 has colours
    for method in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.q, r.median_ms) for r in rows if r.method == method)
        style = "-o" if method.startswith("clapedge") else "--s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
    for dtype, nbytes, color in (("float32", 4, "0.3"), ("fp16", 2, "0.5"), ("int8", 1, "0.7")):
        floor = args.n * args.dim * nbytes / machine.bandwidth[dtype] * 1e3
        ax.axhline(floor, color=color, linestyle=":", linewidth=1)
        ax.text(max(args.queries), floor, f" {dtype} floor", va="bottom", ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queries per call (Q)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"exact top-{args.k}, N={args.n:,}, D={args.dim}, {args.threads} threads")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clapedge.bench.topk", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per cell")
    p.add_argument("--methods", nargs="*", help="only methods whose name contains one of these")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "plots" / "topk.png")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the other jobs on the machine to finish")
    args = p.parse_args(argv)
    rows, machine = run(args)
    text = section(rows, machine, args)
    print()
    print(text)
    if not args.no_write:
        write_markdown(args.out, text)
        plot(rows, machine, args, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
