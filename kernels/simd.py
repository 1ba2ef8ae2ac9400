"""Which SIMD code path the native kernel runs, and how to force a lower one.

At import the best level compiled in and supported by this CPU is picked (CPUID on x86,
HWCAP on ARM) and logged on the ``clapedge.kernels`` logger. Two ways to force another one,
so that every path can be tested on one machine:

* the environment variable ``CLAPEDGE_SIMD=amx|avx512|avx2|neon_dotprod|neon|scalar``, read at
  every call (a level the CPU lacks is ignored with a warning);
* ``set_simd_level("avx2")`` in the process, which wins over the variable
  (``set_simd_level(None)`` goes back to the variable / the best level).
"""

from __future__ import annotations

import logging
import os

from clapedge.kernels import _native
from clapedge.kernels.errors import KernelInputError

log = logging.getLogger("clapedge.kernels")

ENV_VAR = "CLAPEDGE_SIMD"
LEVELS = ("amx", "avx512", "avx2", "neon_dotprod", "neon", "scalar")

_forced: str | None = None
_warned_env: set[str] = set()


def available_simd_levels() -> list[str]:
    """Levels this build and CPU can run, best first (``scalar`` is always there)."""
    return list(_native.available_simd_levels())


def best_simd_level() -> str:
    """The fastest level this build and CPU can run."""
    return str(_native.best_simd_level())


def set_simd_level(level: str | None) -> None:
    """Force a level for every later call in this process; ``None`` restores the default."""
    global _forced
    if level is None:
        _forced = None
        return
    level = level.strip().lower()
    if level not in LEVELS:
        raise KernelInputError(f"unknown SIMD level {level!r}; expected one of {', '.join(LEVELS)}")
    if level not in available_simd_levels():
        raise KernelInputError(
            f"SIMD level {level!r} is not available here (available: "
            f"{', '.join(available_simd_levels())})")
    _forced = level


def simd_level() -> str:
    """The level the next call will run: set_simd_level, else $CLAPEDGE_SIMD, else the best."""
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env in available_simd_levels():
            return env
        if env not in _warned_env:
            _warned_env.add(env)
            log.warning("%s=%s is not available here (available: %s); using %s", ENV_VAR, env,
                        ", ".join(available_simd_levels()), best_simd_level())
    return best_simd_level()


def _log_choice() -> None:
    chosen = simd_level()
    how = "forced by " + ENV_VAR if os.environ.get(ENV_VAR) and chosen != best_simd_level() else "best"
    log.info("SIMD level %s (%s; available: %s)", chosen, how,
             ", ".join(available_simd_levels()))
