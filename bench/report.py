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


def write_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replaces (or appends) the section between ``<!-- bench:NAME:begin/end -->``."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        old = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        old = old.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(old)
    os.replace(tmp, path)
