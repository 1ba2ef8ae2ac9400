"""TorchEmbedder: a saved ClapModel behind the same numpy interface as the runtime.

``clapedge.calib.evaluate`` scores a PyTorch model directory and an exported bundle with the
same code; this is the PyTorch side (lists of 1-D float arrays / strings in, float32 [N, D]
L2-normalised embeddings out). Tokenisation uses the model directory's tokenizer.json with
``tokenizers``, padded with the text backbone's pad id, exactly as the runtime does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clapedge.errors import ConfigError
from clapedge.models.clap import ClapModel


class TorchEmbedder:
    def __init__(self, model: ClapModel, *, batch_size: int = 16, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.sample_rate = model.config.sample_rate
        # Unmasked-mean pooling (ParaCLAP, pre-fix ParaSpeechCLAP) depends on the padding, so
        # those models run one clip at a time: batch 1 is their clean reference.
        self.audio_batch = 1 if model.config.audio.pooling == "mean" else batch_size
        self.text_batch = batch_size
        self._tokenizer = None

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> TorchEmbedder:
        return cls(ClapModel.from_dir(path), **kwargs)

    def _tokenizer_obj(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            cfg, folder = self.model.config.tokenizer, self.model.tokenizer_dir
            if cfg is None or folder is None or "tokenizer.json" not in cfg.files:
                raise ConfigError("the model directory carries no tokenizer.json; attach one "
                                  "(ClapModel.attach_tokenizer / clap-convert --tokenizer)")
            tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
            tok.no_padding()
            tok.enable_truncation(cfg.max_length)
            self._tokenizer = tok
        return self._tokenizer

    @torch.no_grad()
    def embed_audio(self, signals: list[np.ndarray]) -> np.ndarray:
        """Mono float signals at ``sample_rate`` -> float32 [N, D]."""
        out = [torch.zeros(0, self.model.config.embed_dim)]
        for start in range(0, len(signals), self.audio_batch):
            chunk = [np.asarray(s, dtype=np.float32).reshape(-1)
                     for s in signals[start:start + self.audio_batch]]
            width = max(len(s) for s in chunk)
            wave = torch.zeros(len(chunk), width)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, s in enumerate(chunk):
                wave[row, : len(s)] = torch.from_numpy(s)
                mask[row, : len(s)] = 1
            out.append(self.model.embed_audio(wave.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 [N, D]."""
        tok = self._tokenizer_obj()
        pad = int(self.model.text_branch.base.config.pad_token_id or 0)
        out = [torch.zeros(0, self.model.config.embed_dim)]
        for start in range(0, len(texts), self.text_batch):
            ids = [e.ids for e in tok.encode_batch(list(texts[start:start + self.text_batch]))]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, : len(x)] = 1
            out.append(self.model.embed_text(input_ids.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(out).numpy().astype(np.float32)
