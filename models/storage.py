"""The model directory on disk: ``config.json`` + ``model.safetensors`` (+ tokenizer files).

Written atomically: everything goes to a temporary sibling directory, which is renamed into
place only when complete, so a crash never leaves a half-written model behind. Read back with
safetensors only (no pickle), strictly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clapedge.errors import CheckpointError, ClapEdgeError, ConfigError
from clapedge.models.config import ClapConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Files a HF tokenizer directory may hold; tokenizer.json is the one the runtime reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fill_dir(tmp: Path, config: ClapConfig, tensors: dict[str, torch.Tensor],
              tokenizer_dir: Path | None) -> None:
    (tmp / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    files = config.tokenizer.files if config.tokenizer else []
    if files and tokenizer_dir is None:
        raise ConfigError(f"tokenizer.files={files} but no tokenizer directory is attached; "
                          "call attach_tokenizer() first")
    for name in files:
        src = Path(tokenizer_dir) / name
        if not src.is_file():
            raise ConfigError(f"tokenizer file {src} is missing")
        shutil.copyfile(src, tmp / name)
    for item in tmp.iterdir():
        _fsync_file(item)


def write_model_dir(path: str | Path, config: ClapConfig, tensors: dict[str, torch.Tensor],
                    tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Writes the directory at ``path`` atomically; refuses to replace one unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ClapEdgeError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _fill_dir(tmp, config, tensors, tokenizer_dir)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "replaced")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_model_dir(path: str | Path) -> tuple[ClapConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a model directory; CheckpointError/ConfigError naming the file."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{path} is not a clapedge model directory: {needed.name} is missing")
    config = ClapConfig.from_json_file(config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: cannot read safetensors ({err})") from err
    return config, tensors
