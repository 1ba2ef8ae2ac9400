"""All the benchmarks, one after another in one run on this machine (``make bench``).

    python -m clapedge.bench [--quick] [--only NAME[,NAME]] [--skip NAME[,NAME]] [--list]

Each benchmark is its own module (``python -m clapedge.bench.NAME``), run here in a child
process with the arguments listed by ``--list``; each writes its own section of
docs/benchmarks.md (and its plot under docs/plots/) with the machine, versions and its exact
command. This run adds a ``run`` section at the top: when, which commit, how long each
benchmark took and whether it passed. A benchmark module that does not exist (yet) is
reported as skipped.

``--quick``: every benchmark at small sizes (a smoke check that they all run; 17 minutes
on the shared 2-core machine at load average 14, the export benchmark then still on its
large preset) and nothing is written: quick numbers are not results.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    no_write: str | None = "--no-write"   # the flag that makes it print only


BENCHES = (
    Bench("accuracy", "fp32 vs INT8 per task on the default model (clap-eval)",
          quick=("--limit", "40", "--no-pytorch")),
    Bench("bundle", "bundle sizes and load times of the default fp32/INT8 bundles",
          quick=("--loads", "2")),
    Bench("export", "encoder latency vs audio length: PyTorch, ORT fp32, ORT dynamic INT8, "
          "clapedge INT8", quick=("--preset", "default", "--runs", "1", "--clips", "2")),
    Bench("stream", "streaming per-hop latency and real-time factor",
          quick=("--quick",)),
    Bench("stream_cache", "what a cached-attention stream would save, and cost in tag "
          "agreement", quick=("--seconds", "20", "--reps", "3", "--lookahead", "0,37")),
    Bench("topk", "fused similarity/top-k vs numpy, faiss, usearch, with the bandwidth floor",
          full=("--wait-idle", "120"),
          quick=("--n", "100000", "--queries", "1,16", "--repeats", "3", "--budget", "3")),
    Bench("search", "index and search at 1M vectors, corpus ingest and quality",
          full=("--wait-idle", "120"),
          quick=("--n", "100000", "--dims", "256", "--queries", "10",
                 "--quality-queries", "20")),
)


USES_DEFAULT_BUNDLES = ("accuracy", "bundle", "stream", "stream_cache")


@dataclass
class Outcome:
    bench: Bench
    command: str = ""
    status: str = "skipped"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def module_exists(name: str) -> bool:
    return importlib.util.find_spec(f"clapedge.bench.{name}") is not None


def supported_flags(name: str) -> set[str] | None:
    """The long options a benchmark's --help lists (None if --help fails)."""
    done = subprocess.run([sys.executable, "-m", f"clapedge.bench.{name}", "--help"], cwd=ROOT,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return None
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", done.stdout))


def keep_supported(args: tuple[str, ...], flags: set[str]) -> tuple[list[str], list[str]]:
    """Drops options (and their values) that the benchmark does not know; returns (kept,
    dropped) so that a renamed option in one benchmark does not stop the whole run."""
    kept, dropped, i = [], [], 0
    while i < len(args):
        opt = args[i]
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        chunk = list(args[i:i + 2] if takes_value else args[i:i + 1])
        (kept if opt in flags else dropped).extend(chunk)
        i += len(chunk)
    return kept, dropped


def run_one(bench: Bench, quick: bool) -> Outcome:
    out = Outcome(bench)
    if not module_exists(bench.name):
        out.notes.append(f"clapedge.bench.{bench.name} does not exist yet")
        return out
    flags = supported_flags(bench.name)
    if flags is None:
        out.status = "failed"
        out.notes.append("--help failed")
        return out
    wanted = bench.quick if quick else bench.full
    args, dropped = keep_supported(wanted, flags)
    if dropped:
        out.notes.append(f"options it does not have, not passed: {' '.join(dropped)}")
    if quick:
        if bench.no_write not in flags:
            out.notes.append(f"skipped in --quick: it has no {bench.no_write} option")
            return out
        args.append(bench.no_write)
    cmd = ["python", "-m", f"clapedge.bench.{bench.name}", *args]
    out.command = shlex.join(cmd)
    print(f"\n=== {bench.name}: {bench.what}\n$ {out.command}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT)
    out.seconds = time.perf_counter() - t0
    out.status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return out


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL).stdout.strip()
        return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def run_section(outcomes: list[Outcome], argv: list[str], started: datetime,
                load_before: float) -> str:
    from clapedge.bench.report import machine_line

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## This run",
        "",
        f"`make bench` = `python -m clapedge.bench{' ' + shlex.join(argv) if argv else ''}`, "
        f"started {started:%Y-%m-%d %H:%M} UTC at commit {git_commit()}; "
        f"{machine_line().rsplit(';', 1)[0]}, {platform.platform()}; load average "
        f"{load_before:.1f} at the start and {load_after:.1f} at the end (a shared machine: "
        "each section states the load it saw). Sections of benchmarks left out of this run "
        "(`--only`, `--skip`) keep their earlier results; rerun one with "
        "`python -m clapedge.bench --only NAME`.",
        "",
        "| benchmark | what | command | time | status |",
        "|---|---|---|---:|---|",
    ]
    for o in outcomes:
        status = o.status + (f" ({'; '.join(o.notes)})" if o.notes else "")
        command = f"`{o.command}`" if o.command else ""
        time_s = f"{o.seconds / 60:.1f} min" if o.seconds else ""
        lines.append(f"| {o.bench.name} | {o.bench.what} | {command} | {time_s} | {status} |")
    return "\n".join(lines) + "\n"


def write_run_section(text: str) -> None:
    """The run section goes right under the page title (appended sections go last)."""
    from clapedge.bench.report import BENCHMARKS, write_section

    begin = "<!-- bench:run:begin -->"
    if BENCHMARKS.exists() and begin not in BENCHMARKS.read_text():
        old = BENCHMARKS.read_text()
        head, _, rest = old.partition("\n")
        tmp = BENCHMARKS.with_suffix(".md.tmp")
        tmp.write_text(f"{head}\n\n{begin}\n<!-- bench:run:end -->\n{rest}")
        os.replace(tmp, BENCHMARKS)
    write_section("run", text, BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(prog="python -m clapedge.bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, write nothing (a smoke check of every benchmark)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(names)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and their arguments")
    args = ap.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [b for b in BENCHES if (not only or b.name in only) and b.name not in skip]
    if args.list:
        for b in BENCHES:
            present = "" if module_exists(b.name) else "  (not present yet)"
            print(f"{b.name:9s} {b.what}{present}\n          full: {shlex.join(b.full) or '-'}"
                  f"\n          quick: {shlex.join(b.quick) or '-'}")
        return 0
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if any(b.name in USES_DEFAULT_BUNDLES for b in chosen):
        from clapedge.bench.default_bundles import FROZEN, default_bundles

        print("=== the default model's fp32 and INT8 bundles (exported once for this run)",
              flush=True)
        default_bundles()
        os.environ[FROZEN] = "1"
    outcomes = [run_one(b, args.quick) for b in chosen]
    text = run_section(outcomes, argv, started, load_before)
    print("\n" + text)
    if not args.quick:
        write_run_section(text)
        print("wrote docs/benchmarks.md")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
