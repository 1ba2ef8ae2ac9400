"""Prebuilt TensorRT engines of a bundle (manifest ``engines``): use them, or say why not.

``clap-export --engine`` builds ``audio.plan`` on the device and, beside it, an EP-context
model ``audio_ctx.onnx``: one ``com.microsoft`` ``EPContext`` node whose ``ep_cache_context``
names the plan (relative to the context model, ``embed_mode`` 0) with the audio tower's
inputs and outputs. ONNX Runtime's TensorRT EP deserialises the plan from it instead of
building an engine (minutes for a large tower).

A plan is valid only for the TensorRT version and the GPU it was built with (NVIDIA/TensorRT
#70, #292), and only for the shapes of its optimisation profile. ``plan_problem`` compares
the manifest's record with this process (TensorRT version from the installed ``tensorrt``
package, GPU name from the CUDA driver or ``nvidia-smi``, the bundle's clip policy against
the profile); on any
mismatch, or when the EP refuses the plan, the runtime logs why and falls back to
``audio.onnx`` through the TensorRT EP (which builds, and caches under ``cache_dir``, its own
engine), then CUDA, then CPU. Not yet verified on a GPU: no machine here has one.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import subprocess
from functools import lru_cache

from clapedge.runtime.manifest import EngineSpec, Manifest

log = logging.getLogger("clapedge.runtime")

# pip distributions that carry TensorRT's Python bindings (and so its version)
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11",
                          "tensorrt_cu13", "tensorrt_cu12")


@lru_cache(maxsize=1)
def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version (None when none is installed)."""
    for name in TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cuda_device_name() -> str | None:
    """GPU 0's name from the CUDA driver (``cuDeviceGetName``, the string
    ``torch.cuda.get_device_name`` reports), without torch; works on Jetson, which has no
    ``nvidia-smi``. None without a driver or a device."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0 \
            or cuda.cuDeviceGetName(name, len(name), device) != 0:
        return None
    return name.value.decode(errors="replace").strip() or None


@lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """Name of GPU 0 as the driver reports it (what ``torch.cuda.get_device_name`` gave the
    exporter): from the CUDA driver, else ``nvidia-smi``; None without either or a GPU."""
    name = _cuda_device_name()
    if name is not None:
        return name
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return names[0] if names else None


def engine_for(manifest: Manifest, role: str) -> EngineSpec | None:
    """The tower's engine record that has an EP-context model, if any."""
    for engine in manifest.engines:
        if engine.tower == role and engine.context is not None:
            return engine
    return None


def plan_problem(engine: EngineSpec, manifest: Manifest, *, trt_version: str | None,
                 gpu: str | None) -> str | None:
    """Why the prebuilt plan cannot serve this process (None: it can)."""
    if trt_version is None:
        return ("the TensorRT version here is unknown (no tensorrt Python package); the plan "
                f"was built with TensorRT {engine.trt_version}")
    if trt_version != engine.trt_version:
        return f"built with TensorRT {engine.trt_version}, this process has {trt_version}"
    if gpu is None:
        return (f"cannot name the GPU here (no CUDA driver or nvidia-smi); the plan was built "
                f"on {engine.gpu}")
    if gpu != engine.gpu:
        return f"built on {engine.gpu}, this machine has {gpu}"
    rate, clip = manifest.sample_rate, manifest.clip
    shortest = int(round(clip.min_seconds * rate))
    longest = int(round(max(clip.max_seconds, clip.window_seconds) * rate))
    for profile in engine.profiles:
        for name, shape in profile.items():
            if len(shape.min) == 2 and not (shape.min[1] <= shortest and longest <= shape.max[1]):
                return (f"its profile for {name!r} covers {shape.min[1]}..{shape.max[1]} "
                        f"samples, the bundle's clip policy feeds {shortest}..{longest}")
    return None
