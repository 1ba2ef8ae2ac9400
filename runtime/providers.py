"""Execution providers and ONNX Runtime session options.

``providers="auto"`` takes, in order, TensorRT EP > CUDA EP > CPU EP among those that
``onnxruntime.get_available_providers()`` reports, and says why each one it skipped was
skipped (the log names what to install). An explicit list (names or the aliases ``cpu``,
``cuda``, ``tensorrt``/``trt``) is used as given; a provider that is not available is then
an error, because silently running on another device is the surprise users complain about.

Session options are tuned for single-request latency: ``intra_op`` threads = the ``threads``
argument or the number of physical cores this process may run on, ``inter_op`` 1,
sequential execution, all graph optimisations.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

from clapedge.errors import ConfigError

log = logging.getLogger("clapedge.runtime")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
AUTO_ORDER = (TENSORRT, CUDA, CPU)

ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}

INSTALL_HINT = {
    TENSORRT: "install clapedge[gpu] (onnxruntime-gpu with the TensorRT libraries; on Jetson, "
              "the onnxruntime-gpu wheel for your JetPack)",
    CUDA: "install clapedge[gpu] (onnxruntime-gpu) and an NVIDIA driver",
    CPU: "reinstall onnxruntime",
}


@dataclass(frozen=True)
class ProviderChoice:
    """The providers handed to ONNX Runtime, best first, and why the others were skipped."""

    providers: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        text = " > ".join(self.providers)
        for name, reason in self.skipped:
            text += f"; {name} skipped: {reason}"
        return text


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(requested: str | Sequence[str] = "auto",
                     available: Sequence[str] | None = None) -> ProviderChoice:
    """Resolve ``requested`` ("auto", an alias, a provider name, or a list of them)."""
    available = list(available_providers() if available is None else available)
    if isinstance(requested, str) and requested.lower() == "auto":
        chosen, skipped = [], []
        for name in AUTO_ORDER:
            if name in available:
                chosen.append(name)
            else:
                skipped.append((name, f"not available: {INSTALL_HINT[name]}"))
        if not chosen:
            raise ConfigError(f"no usable execution provider among {available}; "
                              f"{INSTALL_HINT[CPU]}")
        return ProviderChoice(tuple(chosen), tuple(skipped))
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise ConfigError("providers: the list is empty; use 'auto' or name at least one")
    chosen = []
    for raw in names:
        if not isinstance(raw, str):
            raise ConfigError(f"providers: {raw!r} is not a provider name")
        name = ALIASES.get(raw.lower(), raw)
        if name not in available:
            hint = INSTALL_HINT.get(name, f"known here: {', '.join(available)}")
            raise ConfigError(f"providers: {raw!r} is not available in this onnxruntime "
                              f"(available: {', '.join(available)}); {hint}")
        if name not in chosen:
            chosen.append(name)
    return ProviderChoice(tuple(chosen))


def provider_options(name: str, *, precision: str, cache_dir: Path | None) -> dict[str, str]:
    """Per-provider options. TensorRT: engine + timing caches under ``cache_dir/tensorrt``
    (building an engine takes minutes; the cache makes the second load fast), reduced
    precision allowed to match the bundle's precision."""
    if name != TENSORRT:
        return {}
    opts = {"trt_fp16_enable": str(precision in ("fp16", "int8")),
            "trt_int8_enable": str(precision == "int8")}
    if cache_dir is not None:
        path = str(Path(cache_dir) / "tensorrt")
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=path,
                    trt_timing_cache_enable="True", trt_timing_cache_path=path)
    return opts


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads share a core and
    slow GEMMs down when both run)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Latency-tuned options; ``threads`` = intra-op threads (None: physical cores)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads <= 0):
        raise ConfigError(f"threads: {threads!r} must be a positive integer or None")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; the runtime logs its own choices
    # ORT's workers otherwise spin after each call and take the cores from what runs next
    # (the top-k kernel after a text query: 44 ms instead of 30 ms measured by bench/search).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so
