"""clapedge.models: the PyTorch CLAP dual encoder over Hugging Face backbones.

    from clapedge.models import ClapModel, build_preset
    model = ClapModel.from_config(build_preset("paraspeechclap", tiny=True)).eval()
    emb = model.embed_audio(wave, mask)          # [B, D], L2-normalised

Names resolve lazily so that importing a light submodule (config, convert --help) does not
load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClapConfig": "config", "AudioTowerConfig": "config", "TextTowerConfig": "config",
    "ProjectionConfig": "config", "HeadConfig": "config", "TokenizerConfig": "config",
    "ClapModel": "clap", "ClapOutput": "clap", "AudioEncoding": "clap",
    "PRESETS": "presets", "build_preset": "presets", "count_parameters": "presets",
    "ParameterCounts": "presets",
    "import_checkpoint": "checkpoint", "import_state_dict": "checkpoint",
    "read_state_dict": "checkpoint",
    "load_minilm": "minilm", "build_default_model": "minilm", "TorchEmbedder": "embedder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clapedge.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clapedge.models.{_EXPORTS[name]}"), name)
