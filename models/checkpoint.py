"""Import released seed checkpoints (ParaSpeechCLAP, ParaCLAP) onto ClapModel, safely.

Both release a bare ``torch.save(model.state_dict())`` (``.pth.tar``) with the layout
``audio_branch.base.*`` (HF audio model), ``text_branch.base.*`` (HF text model, pooler
included), ``audio_projection.{linear1,linear2,layer_norm}.*``, ``text_projection.*`` and the
log-space temperature ``log_logit_scale`` (ParaSpeechCLAP) or ``logit_scale`` (ParaCLAP).
ClapModel uses the same names, so the import is a strict load plus these documented steps:

* weight-norm keys of the positional conv are respelt for the running torch/transformers;
* the temperature is renamed when the checkpoint spells it the other way (same meaning);
* a single ``module.`` prefix (DataParallel) and a ``state_dict``/``model`` wrapper are removed;
* these extras are ignored and reported: the text pooler (unused: we pool last_hidden_state),
  legacy ``embeddings.position_ids``/``token_type_ids`` buffers, and the audio backbone's
  ``masked_spec_embed`` (SpecAugment, training only).

Reading never unpickles code: ``.safetensors`` through safetensors, everything else through
``torch.load(weights_only=True)`` with no fallback.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clapedge.errors import CheckpointError
from clapedge.models.clap import ClapModel
from clapedge.models.state_dict import LoadReport, strict_load

SEED_EXTRAS = (
    r"^text_branch\.base\.pooler\.",
    r"\.embeddings\.position_ids$",
    r"\.embeddings\.token_type_ids$",
    r"^audio_branch\.base\.masked_spec_embed$",
)
_SCALE_KEYS = ("log_logit_scale", "logit_scale")
_WRAPPERS = ("state_dict", "model")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _refused_global(err: Exception) -> str | None:
    """The global a weights-only load refused (e.g. "posix.system"), or None. Only that is
    reported, never torch's advice to allowlist it or retry with weights_only=False."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _short(err: Exception) -> str:
    """One informative line of a torch error (its first lines are generic advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "nsupported" in line or "rror" in line]
    return (specific or lines or [type(err).__name__])[-1][:200]


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:  # a damaged stream or an opcode the weights-only reader rejects
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_short(err)})") from err
        raise CheckpointError(
            f"{path}: refused: the pickle asks for {name}, code or objects that a weights-only "
            "load does not allow. clapedge never unpickles arbitrary objects; save the state "
            "dict as safetensors or as plain tensors") from err
    except Exception as err:  # torch reports damaged files with many exception types
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_short(err)})") from err


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPERS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, with no code execution."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _unwrap(_read_torch(path), path)


def _rename_scale(state: dict[str, torch.Tensor], wanted: str) -> tuple[dict, list[tuple[str, str]]]:
    other = next(k for k in _SCALE_KEYS if k != wanted)
    if wanted in state or other not in state:
        return state, []
    state = dict(state)
    state[wanted] = state.pop(other)
    return state, [(other, wanted)]


def import_state_dict(model: ClapModel, state: dict[str, torch.Tensor],
                      source: str = "<state dict>") -> LoadReport:
    """Strictly loads a seed-layout (or our own) state dict into ``model``."""
    state, renamed = _rename_scale(state, model.config.logit_scale_key)
    report = strict_load(model, state, source, ignore=SEED_EXTRAS)
    report.renamed = renamed + report.renamed
    return report


def import_checkpoint(model: ClapModel, path: str | Path) -> LoadReport:
    """Reads ``path`` safely and loads it into ``model``; CheckpointError names the file."""
    return import_state_dict(model, read_state_dict(path), source=str(path))
