"""Builds of the kernels beyond this machine's own Python module:

* the NEON levels: the C++ test program (tests/cpp/topk_levels_test.cc) cross-compiled with
  Debian's aarch64 compiler through CMake and run under qemu-user, with the dot-product
  instructions (qemu's default CPU) and without them (Cortex-A57), against the scalar level;
* the same program built natively, which checks every x86 level against the scalar one;
* the CUDA variant: a CMake configure + build with nvcc, so it cannot rot on machines without
  a GPU; its runtime tests run only where a GPU is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")


def cmake_build(build: Path, *defines: str, target: str, timeout: int = 300) -> str:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # -O1: these builds check correctness, not speed, and compile twice as fast.
    cfg = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), *gen,
                          "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CXX_FLAGS_RELEASE=-O1",
                          *defines], capture_output=True, text=True, timeout=timeout)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    out = subprocess.run([CMAKE, "--build", str(build), "--target", target, "-j",
                          str(os.cpu_count() or 2)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    return cfg.stdout


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    if CMAKE is None:
        pytest.skip("cmake is not installed")
    return tmp_path_factory.mktemp("kernels-build")


@pytest.fixture(scope="module")
def native_build(build_root) -> tuple[Path, str]:
    """The C++ test program for this machine, with the CUDA variant compiled in when nvcc
    exists (one build serves both checks)."""
    nvcc = find_nvcc()
    cuda = ["-DCLAPEDGE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
            "-DCMAKE_CUDA_ARCHITECTURES=87"] if nvcc else []
    cfg = cmake_build(build_root / "native", "-DCLAPEDGE_BUILD_TESTS=ON", *cuda,
                      target="topk_levels_test")
    return build_root / "native" / "topk_levels_test", cfg


def test_native_levels_agree_with_scalar(native_build):
    exe, _ = native_build
    # Checks every level this CPU runs against the scalar one (and the GPU, where present).
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK:" in out.stdout


def test_cuda_variant_compiles(native_build):
    if find_nvcc() is None:
        pytest.skip("nvcc is not installed: the CUDA variant cannot be compiled here")
    _, cfg = native_build
    assert "CUDA variant on" in cfg


def test_neon_levels_under_qemu(build_root):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user "
                    "(apt-get install g++-aarch64-linux-gnu qemu-user, or make system-deps)")
    build = build_root / "aarch64"
    cfg = cmake_build(build, "-DCLAPEDGE_BUILD_TESTS=ON", "-DCMAKE_SYSTEM_NAME=Linux",
                      "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={cxx}",
                      "-DCMAKE_EXE_LINKER_FLAGS=-static", target="topk_levels_test")
    assert "SIMD level NEON_DOTPROD" in cfg and "SIMD level NEON " in cfg
    exe = str(build / "topk_levels_test")
    with_dot = subprocess.run([qemu, exe], capture_output=True, text=True, timeout=300)
    assert with_dot.returncode == 0, with_dot.stdout + with_dot.stderr
    assert "levels: scalar neon neon_dotprod (best neon_dotprod)" in with_dot.stdout
    # A CPU without the dot-product instructions: the dispatch must fall back to plain NEON.
    without = subprocess.run([qemu, "-cpu", "cortex-a57", exe], capture_output=True, text=True,
                             timeout=300)
    assert without.returncode == 0, without.stdout + without.stderr
    assert "levels: scalar neon (best neon)" in without.stdout


def test_cuda_runtime_matches_cpu():
    from clapedge.kernels import Gallery, cuda_available, topk
    if not cuda_available():
        pytest.skip("no GPU here, or clapedge was built without CLAPEDGE_CUDA=ON "
                    "(pip install -C cmake.define.CLAPEDGE_CUDA=ON ...)")
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5000, 100)).astype(np.float32)
    q = rng.standard_normal((7, 100)).astype(np.float32)
    for gal in (g, Gallery(g, "fp16"), Gallery(g, "int8", rerank=False), Gallery(g, "int8")):
        cpu = topk(q, gal, 10)
        gpu = topk(q, gal, 10, device="cuda")
        np.testing.assert_array_equal(gpu[1], cpu[1])
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-5, atol=1e-5)
