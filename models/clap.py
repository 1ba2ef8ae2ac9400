"""ClapModel: the speech/text dual encoder over Hugging Face backbones.

Module names mirror the ParaSpeechCLAP / ParaCLAP checkpoints (``audio_branch.base``,
``text_branch.base``, ``audio_projection``, ``text_projection``, ``log_logit_scale`` or
``logit_scale``), so their state dicts map onto ours with no renaming beyond weight-norm
spelling. Extra pieces have their own names (``audio_branch.pooling`` for attention pooling,
``heads.layers.<name>``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clapedge.errors import ConfigError
from clapedge.models.audio import AudioTower
from clapedge.models.config import ClapConfig, TokenizerConfig, validate
from clapedge.models.heads import AttributeHeads
from clapedge.models.projection import build_projection
from clapedge.models.state_dict import LoadReport, strict_load
from clapedge.models.storage import TOKENIZER_FILES, read_model_dir, write_model_dir
from clapedge.models.text import TextTower

# State-dict keys of the text backbone, the part ``TextTowerConfig.external_weights`` covers.
EXTERNAL_PREFIX = "text_branch.base."


@dataclass
class AudioEncoding:
    """Audio tower outputs: ``pooled`` backbone features [B, H] and ``embedding`` [B, D]."""

    pooled: torch.Tensor
    embedding: torch.Tensor


@dataclass
class ClapOutput:
    """``forward`` result: L2-normalised embeddings, exp(log scale), attribute-head logits."""

    audio_emb: torch.Tensor
    text_emb: torch.Tensor
    logit_scale: torch.Tensor
    head_logits: dict[str, torch.Tensor]


def _lengths(wave: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Valid sample counts from a right-padding mask [B, T] (all valid when None)."""
    if mask is None:
        return torch.full((wave.shape[0],), wave.shape[1], dtype=torch.long, device=wave.device)
    return mask.to(torch.long).sum(dim=1)


class ClapModel(nn.Module):
    def __init__(self, config: ClapConfig) -> None:
        super().__init__()
        validate(config)  # again: dataclass fields may have been changed since construction
        self.config = config
        self.audio_branch = AudioTower(config.audio)
        self.text_branch = TextTower(config.text)
        self.audio_projection = build_projection(self.audio_branch.hidden_size, config.audio.projection)
        self.text_projection = build_projection(self.text_branch.hidden_size, config.text.projection)
        self.heads = AttributeHeads(config.heads, self.audio_branch.hidden_size, config.embed_dim)
        # Stored in log space under the seed's own name; see ClapConfig.logit_scale_key.
        init = torch.tensor(math.log(config.logit_scale_init), dtype=torch.float32)
        self.register_parameter(config.logit_scale_key, nn.Parameter(init))
        self.tokenizer_dir: Path | None = None

    # ------------------------------------------------------------------ construction, storage

    @classmethod
    def from_config(cls, config: ClapConfig) -> ClapModel:
        """A randomly initialised model (in train mode, like any new nn.Module); no network."""
        return cls(config)

    def save_dir(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Writes config.json + model.safetensors (+ tokenizer files) atomically. A text
        backbone with ``external_weights`` is left out (it is read from its package)."""
        skip = EXTERNAL_PREFIX if self.config.text.external_weights else None
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                   if skip is None or not k.startswith(skip)}
        return write_model_dir(path, self.config, tensors, self.tokenizer_dir, overwrite)

    @classmethod
    def from_dir(cls, path: str | Path) -> ClapModel:
        """Loads a directory written by ``save_dir`` strictly; returns the model in eval mode.
        External text weights come from their installed package (MissingDependencyError
        naming it when it is not installed)."""
        config, tensors = read_model_dir(path)
        model = cls(config)
        if config.text.external_weights:
            from clapedge.models.minilm import external_text_state

            tensors = {**external_text_state(model, EXTERNAL_PREFIX), **tensors}
        strict_load(model, tensors, source=str(Path(path) / "model.safetensors"))
        if config.tokenizer is not None and config.tokenizer.files:
            model.tokenizer_dir = Path(path)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "<state dict>") -> LoadReport:
        """Strict load of a state dict in our layout (weight-norm spelling adapted)."""
        return strict_load(self, state, source)

    def set_causal_context(self, frames: int | None) -> None:
        """Makes the audio encoder causal with ``frames`` of left context (None:
        bidirectional), config and module together; the parameters are the same, so a
        bidirectional model can be fine-tuned into a causal one (models/causal.py)."""
        self.config = dataclasses.replace(self.config, audio=dataclasses.replace(
            self.config.audio, causal_context=frames))  # validated: ConfigError if refused
        self.audio_branch.causal_context = frames

    def attach_tokenizer(self, source: str | Path, *, max_length: int | None = None) -> None:
        """Carries the HF tokenizer files found in ``source`` (a directory or a tokenizer.json)
        into saved model directories; the runtime reads tokenizer.json with ``tokenizers``."""
        source = Path(source)
        folder = source.parent if source.is_file() else source
        files = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if (source.is_file() and source.name != "tokenizer.json") or "tokenizer.json" not in files:
            raise ConfigError(f"tokenizer source {source}: a tokenizer.json (HF tokenizers) is needed")
        current = self.config.tokenizer
        self.config = dataclasses.replace(self.config, tokenizer=TokenizerConfig(
            source=current.source if current else str(folder),
            max_length=max_length or (current.max_length if current else 512),
            files=files))
        self.tokenizer_dir = folder

    # ------------------------------------------------------------------ inference

    def get_logit_scale(self) -> torch.Tensor:
        return getattr(self, self.config.logit_scale_key).exp()

    def encode_audio(self, wave: torch.Tensor, mask: torch.Tensor | None = None, *,
                     normalize: bool = True) -> AudioEncoding:
        """wave [B, T] float at ``config.sample_rate``; mask [B, T] (1 = real sample, right
        padding) or None when every clip fills the row."""
        pooled, _ = self.audio_branch(wave, _lengths(wave, mask))
        embedding = self.audio_projection(pooled)
        if normalize:
            embedding = F.normalize(embedding, dim=-1)
        return AudioEncoding(pooled=pooled, embedding=embedding)

    def embed_audio(self, wave: torch.Tensor, mask: torch.Tensor | None = None, *,
                    normalize: bool = True) -> torch.Tensor:
        """[B, D] audio embeddings (L2-normalised unless ``normalize=False``)."""
        return self.encode_audio(wave, mask, normalize=normalize).embedding

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   normalize: bool = True) -> torch.Tensor:
        """[B, D] text embeddings from token ids [B, L] and their attention mask [B, L]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedding = self.text_projection(self.text_branch(input_ids, attention_mask))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def classify_heads(self, wave: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Logits [B, n_labels] of every attribute head (labels: ``config.heads``)."""
        audio = self.encode_audio(wave, mask)
        return self.heads(audio.pooled, audio.embedding)

    def forward(self, wave: torch.Tensor, audio_mask: torch.Tensor | None,
                input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> ClapOutput:
        audio = self.encode_audio(wave, audio_mask)
        return ClapOutput(
            audio_emb=audio.embedding,
            text_emb=self.embed_text(input_ids, attention_mask),
            logit_scale=self.get_logit_scale(),
            head_logits=self.heads(audio.pooled, audio.embedding),
        )
