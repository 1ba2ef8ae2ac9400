"""Training data for ``clap-train``: a corpus split held in memory, deterministic batches.

Audio is decoded once with the runtime's frontend (the code evaluation and inference use) and
kept as float32 in memory: the default corpus' 3,200 training clips take about 550 MB. The
waveform is never normalised or gain-changed here: loudness labels are absolute levels in the
file (docs/corpus.md), so the level the model sees must be the level the label describes.

Every random choice of a step (which clips, where each crop starts, which caption and which
prompt paraphrase) comes from ``numpy.random.default_rng([seed, step, stream])``, so a batch
depends only on the seed and the step number: the same seed gives the same batches whatever
else happened before (evaluation, restarts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clapedge.errors import ConfigError
from clapedge.runtime.audio import load_audio
from clapedge.train.attributes import ATTRIBUTES, all_tags, label_prompts, tag_targets
from clapedge.train.corpus import load_manifest

SAMPLERS = ("shuffle", "balanced")
# Streams of default_rng([seed, step, stream]): one per kind of choice.
_ORDER, _CROP, _CAPTION, _PROMPT = 0, 1, 2, 3
# Paraphrases per label used as training prompts: the eval ensemble's two words and a third.
PROMPT_WORDS = 3


@dataclass(frozen=True)
class Clip:
    id: str
    audio: np.ndarray  # float32 mono at the model rate, unnormalised
    attributes: dict[str, str | None]
    captions: tuple[str, ...]


@dataclass
class Batch:
    """One training step's inputs. ``wave``/``mask`` [B, T] (right padding); ``captions`` one
    caption per clip; ``tag_targets`` [B, n_tags] multi-hot over ``all_tags()``; ``levels``
    {attribute: [B] level index, -1 where the label is None}."""

    wave: torch.Tensor
    mask: torch.Tensor
    captions: list[str]
    tag_targets: torch.Tensor
    levels: dict[str, torch.Tensor]
    indices: np.ndarray


def load_clips(corpus_dir: str | Path, split: str, sample_rate: int,
               limit: int | None = None) -> list[Clip]:
    """The clips of one split of a ``clap-corpus`` directory (ConfigError when missing)."""
    rows = load_manifest(corpus_dir, split)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ConfigError(f"{corpus_dir}: the {split!r} split has no clips")
    return [Clip(id=row["id"], audio=load_audio(row["path"], target_rate=sample_rate),
                 attributes=dict(row["attributes"]), captions=tuple(row["captions"]))
            for row in rows]


def prompt_pool() -> dict[tuple[str, str], list[str]]:
    """(attribute, label) -> its prompt paraphrases (every template x the first
    ``PROMPT_WORDS`` adjectives); one is drawn per tag per step."""
    pool: dict[tuple[str, str], list[str]] = {}
    for attribute in ATTRIBUTES:
        for label, prompts in label_prompts(attribute, words_per_label=PROMPT_WORDS).items():
            pool[(attribute, label)] = prompts
    return pool


class BatchMaker:
    """Deterministic batches over ``clips``: ``batch(step)``.

    ``shuffle``: epochs of a seeded permutation. ``balanced``: ParaSpeechCLAP's class-balanced
    draw (inverse frequency of a clip's rarest tag, at least two rare-tag clips per batch).
    Training crops are at most ``crop_samples`` long, starting anywhere in the clip.
    """

    def __init__(self, clips: list[Clip], batch_size: int, crop_samples: int, seed: int,
                 sampler: str = "shuffle") -> None:
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is not known; accepted: {', '.join(SAMPLERS)}")
        if batch_size < 2 or batch_size > len(clips):
            raise ConfigError(f"batch size {batch_size} must be in [2, {len(clips)}] (the number "
                              "of training clips)")
        self.clips, self.batch_size, self.crop, self.seed = clips, batch_size, crop_samples, seed
        self.sampler = sampler
        self.tags = all_tags()
        self._targets = torch.tensor([tag_targets(c.attributes) for c in clips], dtype=torch.float32)
        self._per_epoch = len(clips) // batch_size

    def _rng(self, step: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, stream])

    def indices(self, step: int) -> np.ndarray:
        if self.sampler == "balanced":
            from clapedge.train.objectives import class_balanced_indices

            sets = [{f"{a}={v}" for a, v in c.attributes.items() if v is not None}
                    for c in self.clips]
            return class_balanced_indices(sets, self.batch_size, seed=[self.seed, step, _ORDER],
                                          batch_size=self.batch_size)
        epoch, slot = divmod(step, self._per_epoch)
        order = np.random.default_rng([self.seed, epoch, _ORDER]).permutation(len(self.clips))
        return order[slot * self.batch_size:(slot + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        crop_rng, caption_rng = self._rng(step, _CROP), self._rng(step, _CAPTION)
        pieces = []
        for i in idx:
            audio = self.clips[i].audio
            start = int(crop_rng.integers(0, len(audio) - self.crop + 1)) if len(audio) > self.crop else 0
            pieces.append(audio[start:start + self.crop])
        width = max(len(p) for p in pieces)
        wave = torch.zeros(len(pieces), width)
        mask = torch.zeros(len(pieces), width, dtype=torch.long)
        for row, piece in enumerate(pieces):
            wave[row, :len(piece)] = torch.from_numpy(piece)
            mask[row, :len(piece)] = 1
        captions = [self.clips[i].captions[int(caption_rng.integers(len(self.clips[i].captions)))]
                    for i in idx]
        levels = {a: torch.tensor([labels.index(self.clips[i].attributes[a])
                                   if self.clips[i].attributes.get(a) is not None else -1
                                   for i in idx])
                  for a, labels in ATTRIBUTES.items()}
        return Batch(wave=wave, mask=mask, captions=captions,
                     tag_targets=self._targets[torch.from_numpy(np.asarray(idx))],
                     levels=levels, indices=np.asarray(idx))

    def prompt_choice(self, step: int, count: int, options: int) -> np.ndarray:
        """``count`` paraphrase indices in [0, options) for this step."""
        return self._rng(step, _PROMPT).integers(0, options, size=count)
