"""The fp32 and INT8 bundles of ``models/default`` that the accuracy and bundle benchmarks
measure, exported with ``clap-export`` as a user would and cached under ``build/bench/``
(keyed by the model's weights, so a retrained model is exported again).

The INT8 export's accuracy budget (``--max-drop``) is checked on the corpus's *validation*
split (``--eval`` with a manifest of those rows), so that the test split, on which the
accuracy benchmark reports, played no part in choosing what stays float.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clapedge.runtime.manifest import sha256_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("models/default")
CORPUS = Path("data/corpus-default")
WORK = Path("build/bench")
BIN = Path(sys.executable).parent
# ``python -m clapedge.bench`` exports the bundles once at the start of a run and sets this,
# so that every benchmark of the run measures the same files even when someone changes the
# export code meanwhile.
FROZEN = "CLAPEDGE_BENCH_FROZEN_BUNDLES"


@dataclass(frozen=True)
class DefaultBundles:
    fp32: Path
    int8: Path
    commands: dict[str, str]   # precision -> the exact clap-export command (run in ROOT)
    key: str                   # first 12 hex digits of the weights' sha256
    exported_at: dict[str, str]  # precision -> the code state the bundle was exported with


def _rel(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def val_manifest(corpus: Path, out: Path) -> Path:
    """A manifest of the corpus's val rows with absolute paths (written atomically)."""
    rows = []
    for line in (corpus / "manifest.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("split") == "val":
            row["path"] = str((corpus / row["path"]).resolve())
            rows.append(json.dumps(row, sort_keys=True))
    if not rows:
        raise SystemExit(f"{corpus}/manifest.jsonl has no val rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, out)
    return out


def code_key() -> str:
    """A hash of the code that decides what a bundle holds (export/, calib/, the manifest),
    so that a cached bundle is exported again after that code changes."""
    import hashlib

    h = hashlib.sha256()
    files = sorted([*(ROOT / "export").glob("*.py"), *(ROOT / "calib").glob("*.py"),
                    ROOT / "runtime" / "manifest.py"])
    for f in files:
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def code_state() -> str:
    """The commit, and the files of export/, calib/ and runtime/ that differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "export", "calib",
                                "runtime"], cwd=ROOT, text=True,
                               capture_output=True).stdout.splitlines()
    except OSError:
        return "unknown commit"
    if not head:
        return "unknown commit"
    files = [line[3:] for line in dirty]
    return f"commit {head}" + (f" with uncommitted changes to {', '.join(files)}" if files
                               else "")


def ensure_corpus(corpus: Path) -> None:
    if (ROOT / corpus / "manifest.jsonl").is_file():
        return
    cmd = [str(BIN / "clap-corpus"), str(corpus), "--size", "default", "--seed", "0"]
    print(f"$ {shlex.join(['clap-corpus', *cmd[1:]])}   (no corpus yet; takes a while)", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def default_bundles(model: Path = MODEL, corpus: Path = CORPUS, work: Path = WORK,
                    *, rebuild: bool = False) -> DefaultBundles:
    """Exports (or reuses) ``work/default-<key>-{fp32,int8}``."""
    weights = ROOT / model / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights} not found: the benchmarks measure the trained default "
                         f"model (see docs/default-model.md)")
    ensure_corpus(corpus)
    key = sha256_file(weights)[:12]
    val = val_manifest(ROOT / corpus, ROOT / work / f"{Path(corpus).name}-val.jsonl")
    out = {p: work / f"default-{key}-{p}" for p in ("fp32", "int8")}
    args = {
        "fp32": ["--fp32"],
        "int8": ["--int8", "--calib", str(corpus), "--eval", _rel(val)],
    }
    commands = {}
    code = code_key()
    for precision, extra in args.items():
        cmd = ["clap-export", str(model), "-o", str(out[precision]), *extra]
        commands[precision] = shlex.join(cmd)
        target = ROOT / out[precision]
        # The directory name is what bench/stream.py looks for; the export code's hash sits
        # beside it.
        stamp = target.with_name(target.name + ".code")
        current = stamp.read_text().strip() if stamp.is_file() else ""
        frozen = os.environ.get(FROZEN) == "1"  # set by the runner: one export per run
        if (target / "manifest.json").is_file() and (current == code or frozen) and not rebuild:
            continue
        if target.exists():
            shutil.rmtree(target)
        print(f"$ {commands[precision]}", flush=True)
        subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, check=True)
        stamp.write_text(f"{code}\n{code_state()}\n")
    states = {}
    for precision in out:
        lines = (ROOT / out[precision]).with_name(out[precision].name + ".code").read_text()
        states[precision] = (lines.splitlines()[1:] or ["unknown commit"])[0]
    return DefaultBundles(ROOT / out["fp32"], ROOT / out["int8"], commands, key, states)


if __name__ == "__main__":
    b = default_bundles(rebuild="--rebuild" in sys.argv)
    print(b)
