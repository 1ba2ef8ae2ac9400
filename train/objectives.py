"""Training objectives of the seed papers (see /work/shared/SEEDS.md), in plain torch.

Every loss takes audio and text embeddings of one batch, ``[B, D]`` each, row i of both
describing the same clip; they are L2-normalised here, so raw projections may be passed.
Scaled losses take ``logit_scale``, the multiplier of the cosine (``LogitScale()`` or a float).

- ``info_nce``: symmetric InfoNCE (all seeds; ESS-CLAP stage 1).
- ``intrinsic_tag_loss`` + ``ClassBalancedSampler``: ParaSpeechCLAP-Intrinsic.
- ``self_distillation_loss``: RA-CLAP stage 2 (teacher similarity distribution as soft targets).
- ``rank_n_contrast_loss``: EmotionRankCLAP (cross-modal Rank-N-Contrast, ordinal labels).
- ``gemo_sl_loss`` / ``gemo_ml_loss``: GEmo-CLAP soft-label and multi-task variants.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Sampler

from clapedge.errors import ConfigError

INIT_LOGIT_SCALE = 1 / 0.07
MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """A learnable temperature kept as a log: ``forward()`` returns exp(log_scale) clamped to
    [min_scale, max_scale]; call ``clamp_()`` after each optimiser step so the parameter itself
    stays in range (CLIP / ParaSpeechCLAP: [0, ln 100] in log space)."""

    def __init__(self, init: float = INIT_LOGIT_SCALE, min_scale: float = 1.0,
                 max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        if not 0 < min_scale <= init <= max_scale:
            raise ConfigError(f"need 0 < min_scale <= init <= max_scale, got "
                              f"{min_scale}, {init}, {max_scale}")
        self.log_min, self.log_max = math.log(min_scale), math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(self.log_min, self.log_max).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(self.log_min, self.log_max)


def cosine_similarity_matrix(audio: Tensor, text: Tensor) -> Tensor:
    """``[B_audio, B_text]`` cosines."""
    return F.normalize(audio, dim=-1) @ F.normalize(text, dim=-1).T


def _logits(audio: Tensor, text: Tensor, logit_scale: Tensor | float) -> Tensor:
    return logit_scale * cosine_similarity_matrix(audio, text)


def info_nce(audio: Tensor, text: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: the mean of audio->text and text->audio cross-entropy over the
    scaled cosine matrix, with the paired item as the only positive."""
    logits = _logits(audio, text, logit_scale)
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# --- ParaSpeechCLAP-Intrinsic ---------------------------------------------------------------

def intrinsic_tag_loss(audio: Tensor, tag_text: Tensor, targets: Tensor) -> Tensor:
    """Multi-label BCE-with-logits on the UNSCALED cosine between each clip ``[B, D]`` and each
    tag prompt embedding ``[T, D]`` (e.g. "A person is speaking in a deep style."), against
    multi-hot ``targets [B, T]``. As in ParaSpeechCLAP, the logits are bounded to [-1, 1]."""
    if targets.shape != (audio.shape[0], tag_text.shape[0]):
        raise ValueError(f"targets {tuple(targets.shape)} must be "
                         f"[{audio.shape[0]}, {tag_text.shape[0]}]")
    logits = cosine_similarity_matrix(audio, tag_text)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def class_balanced_weights(label_sets: Sequence[Iterable[Hashable]]) -> np.ndarray:
    """Sampling probability of each item: inverse frequency of its rarest tag (an item without
    tags counts as one with a tag held by every item), normalised to sum to 1."""
    sets = [set(s) for s in label_sets]
    if not sets:
        raise ConfigError("class_balanced_weights needs at least one item")
    counts = Counter(tag for s in sets for tag in s)
    n = len(sets)
    w = np.array([max((1.0 / counts[t] for t in s), default=1.0 / n) for s in sets])
    return w / w.sum()


def class_balanced_indices(label_sets: Sequence[Iterable[Hashable]], num_samples: int,
                           seed: int | Sequence[int] = 0, batch_size: int | None = None,
                           min_rare: int = 2, rare_threshold: float = 0.05) -> np.ndarray:
    """``num_samples`` item indices drawn with replacement by ``class_balanced_weights``,
    deterministic for ``seed``. With ``batch_size``, every consecutive batch is topped up to
    hold at least ``min_rare`` items carrying a rare tag (one on fewer than ``rare_threshold``
    of the items), as ParaSpeechCLAP-Intrinsic does."""
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    sets = [set(s) for s in label_sets]
    w = class_balanced_weights(sets)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(sets), size=num_samples, replace=True, p=w)
    if not batch_size:
        return idx
    counts = Counter(tag for s in sets for tag in s)
    rare = {t for t, c in counts.items() if c < rare_threshold * len(sets)}
    carrier = np.array([bool(s & rare) for s in sets])
    if not carrier.any():
        return idx
    pool = np.flatnonzero(carrier)
    pool_p = w[pool] / w[pool].sum()
    for start in range(0, num_samples, batch_size):
        batch = idx[start:start + batch_size]  # a view: edits land in idx
        missing = min(min_rare, len(batch)) - int(carrier[batch].sum())
        if missing > 0:
            slots = np.flatnonzero(~carrier[batch])[:missing]
            batch[slots] = rng.choice(pool, size=len(slots), replace=True, p=pool_p)
    return idx


class ClassBalancedSampler(Sampler[int]):
    """A ``torch.utils.data.Sampler`` over ``class_balanced_indices``; call ``set_epoch`` each
    epoch for a new deterministic draw."""

    def __init__(self, label_sets: Sequence[Iterable[Hashable]], num_samples: int | None = None,
                 seed: int = 0, batch_size: int | None = None, min_rare: int = 2,
                 rare_threshold: float = 0.05):
        self.label_sets = [set(s) for s in label_sets]
        self.num_samples = len(self.label_sets) if num_samples is None else num_samples
        self.seed, self.epoch = seed, 0
        self.batch_size, self.min_rare, self.rare_threshold = batch_size, min_rare, rare_threshold

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        idx = class_balanced_indices(self.label_sets, self.num_samples, (self.seed, self.epoch),
                                     self.batch_size, self.min_rare, self.rare_threshold)
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples


# --- RA-CLAP ----------------------------------------------------------------------------------

def distillation_kl(student_logits: Tensor, teacher_logits: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Symmetric KL(teacher || student) between the row-wise (audio->text) and column-wise
    (text->audio) softmax distributions, times temperature^2 (Hinton et al.)."""
    teacher_logits = teacher_logits.detach()
    kl = 0.0
    for s, t in ((student_logits, teacher_logits), (student_logits.T, teacher_logits.T)):
        kl = kl + F.kl_div(F.log_softmax(s / temperature, dim=1),
                           F.softmax(t / temperature, dim=1), reduction="batchmean")
    return 0.5 * kl * temperature ** 2


def self_distillation_loss(audio: Tensor, text: Tensor, teacher_audio: Tensor,
                           teacher_text: Tensor, logit_scale: Tensor | float,
                           teacher_logit_scale: Tensor | float | None = None,
                           weight: float = 0.5, temperature: float = 1.0) -> Tensor:
    """RA-CLAP stage 2: ``(1 - weight) * InfoNCE + weight * KL`` where the KL pulls the student's
    similarity distributions towards the stage-1 teacher's (embeddings of the same batch from
    the frozen teacher; no gradient reaches them), so partial matches are not hard negatives."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"weight must be in [0, 1], got {weight}")
    logits = _logits(audio, text, logit_scale)
    t_scale = logit_scale if teacher_logit_scale is None else teacher_logit_scale
    if isinstance(t_scale, Tensor):
        t_scale = t_scale.detach()
    with torch.no_grad():
        teacher = _logits(teacher_audio, teacher_text, t_scale)
    hard = info_nce(audio, text, logit_scale)
    return (1.0 - weight) * hard + weight * distillation_kl(logits, teacher, temperature)


# --- EmotionRankCLAP --------------------------------------------------------------------------

def _rank_n_contrast_rows(logits: Tensor, dist: Tensor) -> Tensor:
    # term (i, j) = -logits[i, j] + logsumexp over k with dist[i, k] >= dist[i, j] of logits[i, k]
    keep = dist[:, None, :] >= dist[:, :, None]  # [anchor i, positive j, candidate k]
    masked = logits[:, None, :].expand_as(keep).masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(masked, dim=2) - logits).mean()


def rank_n_contrast_loss(audio: Tensor, text: Tensor, values: Tensor,
                         logit_scale: Tensor | float) -> Tensor:
    """Cross-modal Rank-N-Contrast. ``values`` ``[B]`` or ``[B, K]`` are ordinal labels (e.g.
    arousal level 0/1/2, or several levels); d(i, k) is their L1 distance. For anchor i (an
    audio clip) and every positive j (a text, its own included), the softmax denominator holds
    only the texts k with d(i, k) >= d(i, j); averaged over i, j and both directions."""
    v = values.to(audio.dtype).reshape(len(values), -1)
    dist = torch.cdist(v, v, p=1)
    logits = _logits(audio, text, logit_scale)
    return 0.5 * (_rank_n_contrast_rows(logits, dist) + _rank_n_contrast_rows(logits.T, dist.T))


# --- GEmo-CLAP --------------------------------------------------------------------------------

def agreement_matrix(labels: Tensor) -> Tensor:
    """``M[i, j] = 1`` where items i and j share the label, else 0."""
    return (labels[:, None] == labels[None, :]).float()


def soft_label_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """KL(normalised targets || softmax(logits)) over rows (audio->text) and over columns
    (text->audio), averaged. ``targets`` are non-negative with a positive diagonal."""
    targets = targets.to(logits.dtype)
    loss = 0.0
    for s, m in ((logits, targets), (logits.T, targets.T)):
        loss = loss + F.kl_div(F.log_softmax(s, dim=1), m / m.sum(dim=1, keepdim=True),
                               reduction="batchmean")
    return 0.5 * loss


def gemo_sl_loss(audio: Tensor, text: Tensor, emotion: Tensor, sex: Tensor,
                 logit_scale: Tensor | float, alpha: float = 0.8) -> Tensor:
    """SL-GEmo-CLAP: one soft target ``M = alpha * M_emotion + (1 - alpha) * M_sex``."""
    m = alpha * agreement_matrix(emotion) + (1 - alpha) * agreement_matrix(sex)
    return soft_label_loss(_logits(audio, text, logit_scale), m)


def gemo_ml_loss(audio: Tensor, text: Tensor, emotion: Tensor, sex: Tensor,
                 logit_scale: Tensor | float, alpha: float = 0.9,
                 sex_logits: Tensor | None = None) -> Tensor:
    """ML-GEmo-CLAP: ``alpha * L_emotion + (1 - alpha) * L_sex``. L_emotion is the soft-label
    contrastive loss on emotion agreement; L_sex is the same on sex agreement, or, given
    ``sex_logits [B, 2]`` from a classifier head, its cross-entropy."""
    logits = _logits(audio, text, logit_scale)
    emo = soft_label_loss(logits, agreement_matrix(emotion))
    if sex_logits is not None:
        sex_loss = F.cross_entropy(sex_logits, sex.long())
    else:
        sex_loss = soft_label_loss(logits, agreement_matrix(sex))
    return alpha * emo + (1 - alpha) * sex_loss
