"""Strict state-dict loading with readable errors, shared by ``from_dir`` and the importers.

The positional conv of wav2vec2-family encoders is weight-normalised, and its state-dict keys
depend on the torch/transformers versions that wrote them: ``conv.weight_g``/``conv.weight_v``
(old ``nn.utils.weight_norm``) or ``conv.parametrizations.weight.original0``/``original1``
(``nn.utils.parametrizations.weight_norm``). Both hold the same tensors (g = magnitude, v =
direction), so we rename them to whatever the running model uses. A non-strict load would
silently keep the random init here, which is why everything else must match exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from clapedge.errors import CheckpointError

_WEIGHT_NORM_PAIRS = (
    (".weight_g", ".parametrizations.weight.original0"),
    (".weight_v", ".parametrizations.weight.original1"),
)
_SHOWN = 25  # keys listed per category in an error; the rest are counted


@dataclass
class LoadReport:
    """What a strict load did besides copying tensors one to one."""

    source: str
    loaded: int = 0
    renamed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.renamed:
            parts.append(f"renamed {len(self.renamed)} (weight-norm / scale spelling)")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} unused: {', '.join(self.ignored)}")
        return "; ".join(parts)


def _alternate_spelling(key: str) -> str | None:
    for old, new in _WEIGHT_NORM_PAIRS:
        if key.endswith(old):
            return key[: -len(old)] + new
        if key.endswith(new):
            return key[: -len(new)] + old
    return None


def align_weight_norm(state: dict[str, torch.Tensor], expected: Iterable[str]
                      ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Renames weight-norm keys to the spelling in ``expected``; other keys untouched."""
    expected = set(expected)
    out: dict[str, torch.Tensor] = {}
    renamed: list[tuple[str, str]] = []
    for key, value in state.items():
        alt = _alternate_spelling(key)
        if key not in expected and alt is not None and alt in expected and alt not in state:
            out[alt] = value
            renamed.append((key, alt))
        else:
            out[key] = value
    return out, renamed


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    more = len(keys) - _SHOWN
    return shown + (f", ... and {more} more" if more > 0 else "")


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                ignore: Iterable[str] = ()) -> LoadReport:
    """Loads ``state`` into ``module``; any missing, unexpected or mis-shaped key is a
    CheckpointError listing them. ``ignore`` holds regexes of documented extras that may be
    present in ``state`` and are dropped (only when the model has no such key)."""
    target = module.state_dict()
    state, renamed = align_weight_norm(state, target)
    patterns = [re.compile(p) for p in ignore]
    ignored = sorted(k for k in state if k not in target and any(p.search(k) for p in patterns))
    state = {k: v for k, v in state.items() if k not in ignored}

    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(target[k].shape)})"
                        for k in set(state) & set(target) if state[k].shape != target[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model architecture: "
                              + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return LoadReport(source=source, loaded=len(state), renamed=renamed, ignored=ignored)
