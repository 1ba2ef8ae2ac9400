"""Kill -9 loop over ``clap-export``: no partial bundle is ever visible.

    python -m clapedge.bench.export_crash [--iterations 20] [--seed 0] [--model DIR] [--dir DIR]

Each iteration starts ``clap-export MODEL -o OUT --force --banks none`` (a tiny random model
unless ``--model``) in a subprocess and kills it with SIGKILL, in turn (``--modes``): right
around the final write (a random delay after its "write bundle" progress line, the window
where a bundle appears), at a uniformly random moment of a whole export, and just after the
new bundle appeared at ``OUT`` (replacing the previous one: the swap and what follows it).
After each kill:

- ``OUT`` either does not exist (no export has completed yet) or is a complete bundle that
  verifies (``Bundle.load`` with every tower, bank and the tokenizer, all checksums); once a
  bundle existed, one always exists (the old or the new one: ``--force`` swaps atomically);
- nothing else appears beside ``OUT`` but clearly named leftovers of killed runs
  (``.OUT.partial-PID-*``, ``.OUT.old-PID``).

At the end one export runs to completion: it must succeed, remove every leftover of the
killed runs and give a verified bundle. The test suite runs one kill and the re-run
(tests/test_reliability_faults.py).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

WRITE_STEP = "write bundle"


def export_command(model: Path, out: Path) -> list[str]:
    """The ``clap-export`` console script beside this interpreter (its entry point where the
    script is not installed)."""
    script = Path(sys.executable).parent / "clap-export"
    head = [str(script)] if script.is_file() else [
        sys.executable, "-c", "from clapedge.export.cli import main; main()"]
    return head + [str(model), "-o", str(out), "--force", "--banks", "none"]


def make_tiny_model(root: Path) -> Path:
    """A tiny random ClapModel directory (preset ``default``, seed 0) with a word-level
    tokenizer: enough for ``clap-export`` (needs the [export] extra)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from clapedge.models import ClapModel, build_preset

    vocab = {w: i for i, w in enumerate(
        "[PAD] [UNK] [CLS] [SEP] a calm voice low high female male speaking".split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (root / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    model = ClapModel.from_config(build_preset("default", tiny=True)).eval()
    model.attach_tokenizer(root / "tok", max_length=32)
    return model.save_dir(root / "model")


@dataclass
class Run:
    """One ``clap-export`` subprocess: its progress lines with their times."""

    proc: subprocess.Popen
    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    write_seen: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, model: Path, out: Path) -> "Run":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        proc = subprocess.Popen(export_command(model, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        run = cls(proc, time.perf_counter())
        threading.Thread(target=run._read, daemon=True).start()
        return run

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.perf_counter() - self.t0, line.rstrip()))
            if WRITE_STEP in line:
                self.write_seen.set()

    def last_step(self) -> str:
        """The last progress step printed ("starting" before any)."""
        for _, line in reversed(self.lines):
            words = line.split()
            if not words or ".py:" not in words[-1]:
                continue  # not a progress line (rich ends those with the source column)
            if words[0].startswith("[") and words[0].endswith("]"):
                words = words[1:]  # rich's time column (blank when repeated)
            if len(words) > 1:
                return " ".join(words[:-1])
        return "starting"

    def kill(self) -> int | None:
        """SIGKILL (if still running); returns the exit status it had, None if killed."""
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            return None
        return code


def check_output(out: Path, *, must_exist: bool) -> str:
    """'bundle' (complete, every checksum verified) or 'absent'; AssertionError otherwise.
    Also checks that nothing but ``OUT`` and its named leftovers is beside it."""
    from clapedge.runtime.bundle import Bundle

    for entry in out.parent.iterdir():
        assert entry == out or entry.name.startswith((f".{out.name}.partial-",
                                                      f".{out.name}.old-")), \
            f"unexpected entry beside the bundle: {entry.name}"
    if not out.exists():
        assert not must_exist, f"{out} disappeared: a completed bundle must stay"
        return "absent"
    bundle = Bundle.load(out, providers="cpu", preload=("audio", "text", "tagger")
                         if (out / "tagger.onnx").exists() else ("audio", "text"))
    for name in bundle.manifest.banks:
        bundle.bank(name)
    bundle.tokenizer()
    files = sorted(p.name for p in out.iterdir())
    assert "manifest.json" in files and "audio.onnx" in files, files
    return "bundle"


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p != out)


@dataclass
class CrashStats:
    iterations: int = 0
    killed: int = 0
    finished_before_kill: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    killed_in_step: dict[str, int] = field(default_factory=dict)
    max_leftovers: int = 0
    full_export_s: float = 0.0
    write_s: float = 0.0
    seconds: float = 0.0


def kill_once(model: Path, out: Path, rng: random.Random, *, mode: str,
              full_s: float, write_s: float, must_exist: bool) -> tuple[str, str, bool]:
    """Start an export, kill it (mode "uniform": at U(0, full_s); "write": U(0, 1.5 write_s)
    after the "write bundle" line, ``write_s`` being how long the bundle took to appear;
    "appear": U(0, 20 ms) after the new bundle appeared at ``out``) and check ``out``.
    Returns (outcome, step, killed)."""
    before = out.stat().st_ino if out.exists() else None
    run = Run.start(model, out)
    if mode == "write":
        if not run.write_seen.wait(timeout=max(120.0, 4 * full_s)):
            run.kill()
            raise AssertionError(f"no '{WRITE_STEP}' line: {run.lines[-5:]}")
        time.sleep(rng.uniform(0.0, 1.5 * write_s))
    elif mode == "appear":
        def current():
            try:
                return out.stat().st_ino
            except FileNotFoundError:
                return None
        while current() in (None, before) and run.proc.poll() is None:
            time.sleep(0.0002)
        time.sleep(rng.uniform(0.0, 0.02))
    else:
        deadline = run.t0 + rng.uniform(0.0, full_s)
        while time.perf_counter() < deadline and run.proc.poll() is None:
            time.sleep(0.005)
    step = run.last_step()
    code = run.kill()
    if code not in (None, 0):
        raise AssertionError(f"clap-export failed on its own (exit {code}): {run.lines[-5:]}")
    outcome = check_output(out, must_exist=must_exist)
    if outcome == "bundle":
        outcome = "old bundle" if out.stat().st_ino == before else "new bundle"
    return outcome, step, code is None


def full_export(model: Path, out: Path) -> tuple[float, float]:
    """One export to completion; returns (total seconds, seconds from its "write bundle"
    line until ``out`` appeared)."""
    run = Run.start(model, out)
    run.write_seen.wait(timeout=600)
    t_write = time.perf_counter()
    while not out.exists() and run.proc.poll() is None:
        time.sleep(0.0005)
    appear = time.perf_counter() - t_write
    code = run.proc.wait()
    assert code == 0, f"clap-export failed (exit {code}): {run.lines[-8:]}"
    return time.perf_counter() - run.t0, appear


def run_crash_loop(model: Path, out: Path, iterations: int, *, seed: int = 0,
                   modes: tuple[str, ...] = ("write", "uniform"), log=None) -> CrashStats:
    """``iterations`` killed exports into ``out`` (its parent should be a fresh directory),
    then one to completion; AssertionError on the first violation."""
    rng = random.Random(seed)
    stats = CrashStats()
    t0 = time.perf_counter()
    probe = Path(tempfile.mkdtemp(prefix="clapedge-export-probe-"))
    try:  # time a whole export elsewhere
        full_s, write_s = full_export(model, probe / "bundle")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    stats.full_export_s, stats.write_s = full_s, write_s
    existed = False
    for it in range(iterations):
        mode = modes[it % len(modes)]
        outcome, step, killed = kill_once(model, out, rng, mode=mode, full_s=full_s,
                                          write_s=max(write_s, 0.01), must_exist=existed)
        existed = existed or outcome != "absent"
        stats.iterations += 1
        stats.killed += killed
        stats.finished_before_kill += not killed
        key = f"{outcome}{'' if killed else ' (had finished)'}"
        stats.outcomes[key] = stats.outcomes.get(key, 0) + 1
        stats.killed_in_step[step] = stats.killed_in_step.get(step, 0) + 1
        stats.max_leftovers = max(stats.max_leftovers, len(leftovers(out)))
        if log:
            log(f"{it + 1}/{iterations}: {mode:7s} kill in '{step}': {key}, "
                f"{len(leftovers(out))} leftovers")
    full_export(model, out)
    assert check_output(out, must_exist=True) == "bundle"
    left = leftovers(out)
    assert not left, f"leftovers of killed runs were not cleaned: {[p.name for p in left]}"
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="write,uniform,appear",
                    help="kill moments, in turn: write (around the final write), uniform "
                    "(any time), appear (just after the new bundle appeared)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory to export (default: a tiny random model)")
    ap.add_argument("--dir", type=Path, default=None, help="where to work (default: a "
                    "temporary directory, deleted afterwards)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="clapedge-export-crash-", dir=args.dir))
    try:
        model = args.model or make_tiny_model(base / "tiny")
        (base / "out").mkdir()
        stats = run_crash_loop(model, base / "out" / "bundle", args.iterations, seed=args.seed,
                               modes=tuple(args.modes.split(",")),
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    steps = ", ".join(f"{k}: {v}" for k, v in sorted(stats.killed_in_step.items(),
                                                       key=lambda kv: -kv[1]))
    print(f"{stats.iterations} clap-export runs killed with SIGKILL ({stats.killed} killed, "
          f"{stats.finished_before_kill} had finished) in {stats.seconds:.0f} s (a whole "
          f"export: {stats.full_export_s:.1f} s, its bundle appearing {1e3 * stats.write_s:.0f} ms "
          f"after the write step began); output after the kill: "
          f"{stats.outcomes}; kills by step: {steps}; at most {stats.max_leftovers} leftover "
          f"temporary directories at once, all removed by the final export; no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
