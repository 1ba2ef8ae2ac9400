"""Parity of an exported graph with PyTorch on fresh inputs (several lengths, batch sizes,
padding): cosine and max abs error per output; a typed error when it fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clapedge.export.errors import ParityError


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def centred_cosine(a: np.ndarray, b: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Cosine after subtracting the mean reference embedding: untrained towers map every input
    near one direction (raw cosine 0.93-0.99 between different inputs), so raw cosine to fp32
    says little; centring removes that shared component."""
    return cosine_rows(a - mean, b - mean)


@dataclass
class ParityReport:
    cases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def min_cosine(self) -> float:
        return min((c["cosine"] for c in self.cases.values()), default=1.0)

    @property
    def max_abs_error(self) -> float:
        return max((c["max_abs_error"] for c in self.cases.values()), default=0.0)

    def to_dict(self) -> dict:
        return {"min_cosine": self.min_cosine, "max_abs_error": self.max_abs_error,
                "cases": self.cases}


def check_parity(reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 cases: dict[str, dict[str, np.ndarray]], *, what: str,
                 min_cosine: float = 0.9999) -> ParityReport:
    """Runs both on every case; raises ParityError naming each failing case and output."""
    report = ParityReport()
    failures = []
    for case, feeds in cases.items():
        ref = reference(feeds)
        got = candidate(feeds)
        for name, r in ref.items():
            g = got[name]
            key = f"{case} {name}"
            if g.shape != r.shape:
                report.cases[key] = {"cosine": -1.0, "max_abs_error": float("inf")}
                failures.append(f"{key}: shape {g.shape} != {r.shape}")
                continue
            cos = float(cosine_rows(r, g).min())
            err = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            report.cases[key] = {"cosine": cos, "max_abs_error": err}
            if not np.isfinite(g).all() or cos < min_cosine:
                failures.append(f"{key}: cosine {cos:.6f} < {min_cosine}, max abs error {err:.3g}")
    if failures:
        raise ParityError(f"the exported {what} disagrees with PyTorch: " + "; ".join(failures),
                          report.cases)
    return report
