"""Shared bits of the benchmark scripts: the machine line and docs/benchmarks.md sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}; load average at start {load:.1f}")


def replace_section(path: Path, block: str, begin: str, end: str) -> None:
    """Writes ``block`` (which starts with ``begin`` and ends with ``end``) over the old block
    between those markers in ``path``, or appends it; other sections are kept; atomic."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def write_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replaces (or appends) the section between ``<!-- bench:NAME:begin/end -->``."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    replace_section(path, f"{begin}\n{body.rstrip()}\n{end}\n", begin, end)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Writes a matplotlib figure atomically (temp file + rename) and closes it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
