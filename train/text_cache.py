"""Pooled outputs of a frozen text backbone, computed once per text and cached on disk.

The default model's MiniLM text backbone never trains, so its pooled output for a caption or
a prompt is a constant: ``TextFeatures`` computes it once for every text training will see
and each step then runs only the (trained) text projection on the stored rows. This is what
makes training on two CPU cores feasible: MiniLM is three times the size of the audio tower.

Tokenisation is the one ``TorchEmbedder`` and the runtime use (the model's tokenizer.json,
no padding, truncation at ``tokenizer.max_length``), so cached features equal what the model
computes at evaluation. The cache file is keyed by a hash of the backbone weights, the
tokenizer, the pooling and the texts: a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clapedge.errors import ConfigError
from clapedge.models.clap import ClapModel

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "clapedge" / "text-features"


def _tokenizer(model: ClapModel):
    from tokenizers import Tokenizer

    cfg, folder = model.config.tokenizer, model.tokenizer_dir
    if cfg is None or folder is None or "tokenizer.json" not in cfg.files:
        raise ConfigError("the model carries no tokenizer.json; attach one first "
                          "(ClapModel.attach_tokenizer)")
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(cfg.max_length)
    return tok


def _fingerprint(model: ClapModel, texts: list[str]) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for name, tensor in sorted(model.text_branch.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cfg = model.config
    digest.update(json.dumps([cfg.text.pooling, cfg.tokenizer.max_length]).encode())
    digest.update((Path(model.tokenizer_dir) / "tokenizer.json").read_bytes())
    digest.update(json.dumps(texts).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def pooled_text_features(model: ClapModel, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[N, H] pooled text-backbone outputs (before the projection), fp32, in ``texts`` order.
    Batches are formed from length-sorted texts (less padding; masked pooling makes the
    result independent of the batch)."""
    if not model.config.text.freeze:
        raise ConfigError("cached text features need a frozen text tower (text.freeze=true)")
    tok = _tokenizer(model)
    pad = int(model.text_branch.base.config.pad_token_id or 0)
    ids = [e.ids for e in tok.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    out = torch.zeros(len(texts), model.text_branch.hidden_size)
    was_training = model.text_branch.training
    model.text_branch.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                mask[r, :len(ids[i])] = 1
            out[rows] = model.text_branch(input_ids, mask).float()
    finally:
        model.text_branch.train(was_training)
    return out


class TextFeatures:
    """Text -> row of a [N, H] tensor of frozen pooled features; ``rows(texts)`` indexes it,
    ``ensure(texts)`` computes any text not seen yet (evaluation queries)."""

    def __init__(self, model: ClapModel, texts: Iterable[str], cache_dir: Path | None = None) -> None:
        self.model = model
        self.cache_hit = False
        unique = sorted(set(texts))
        self.features = self._load_or_compute(unique, cache_dir)
        self.index = {t: i for i, t in enumerate(unique)}

    def _load_or_compute(self, texts: list[str], cache_dir: Path | None) -> torch.Tensor:
        if cache_dir is None:
            return pooled_text_features(self.model, texts)
        path = Path(cache_dir) / f"text-{_fingerprint(self.model, texts)}.safetensors"
        if path.is_file():
            try:
                features = load_file(str(path))["features"]
                if features.shape == (len(texts), self.model.text_branch.hidden_size):
                    self.cache_hit = True
                    return features
            except (SafetensorError, OSError, KeyError):
                pass  # unreadable: recompute and overwrite below
        features = pooled_text_features(self.model, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"features": features.contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return features

    def __len__(self) -> int:
        return len(self.index)

    def ensure(self, texts: Iterable[str]) -> None:
        new = sorted(set(t for t in texts if t not in self.index))
        if new:
            extra = pooled_text_features(self.model, new)
            self.features = torch.cat([self.features, extra])
            for t in new:
                self.index[t] = len(self.index)

    def rows(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), H] features (KeyError for a text never added)."""
        return self.features[torch.tensor([self.index[t] for t in texts], dtype=torch.long)]
