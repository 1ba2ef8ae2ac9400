"""A real device install: build the wheel, install it with its base dependencies only into a
fresh venv, and check that the runtime and the kernel work there without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.skipif(os.environ.get("CLAPEDGE_SKIP_INSTALL_TEST") == "1",
                    reason="CLAPEDGE_SKIP_INSTALL_TEST=1")
def test_wheel_base_install_has_no_torch(tmp_path):
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(ROOT)])
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("clapedge-*.whl"))
    env_dir = tmp_path / "device"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    installed = _run([str(py), "-m", "pip", "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    listing = _run([str(py), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    for heavy in ("torch", "transformers", "onnx=", "tensorrt"):
        assert heavy not in listing, f"{heavy} was pulled into the device install"
    code = ("import sys, numpy as np, clapedge.runtime, clapedge.kernels as k\n"
            "s, i = k.topk(np.eye(3, dtype='f4')[:1], np.eye(3, dtype='f4'), 2)\n"
            "assert i.tolist() == [[0, 1]], i\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "print(k.simd_level())\n")
    ran = _run([str(py), "-c", code], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip()
