"""``clap-train``: train a ClapModel's audio tower and projections on a ``clap-corpus``.

    clap-train CORPUS_DIR -o MODEL_DIR [--preset default] [--steps 800] [--batch 32] [--lr 1e-3]
               [--seed 0] [--objectives infonce,intrinsic,rank,labels] [--max-seconds S]
               [--tiny] [--force]

The optimisation defaults are the committed default model's recipe; its architecture options
(``--conv-channels 128 --conv-bias --dropout 0.1``) and ``--precision bf16`` are given
explicitly (docs/default-model.md has the exact command).

What trains: the audio tower from scratch (or from ``--init``), both projections and the
temperature. The text backbone is frozen (the default model's all-MiniLM-L6-v2), so its
pooled output for every caption and prompt is computed once (``text_cache``) and a step runs
only the text projection on it.

Objectives (weights are options; see docs/default-model.md for the choice):

- ``infonce``: symmetric InfoNCE between each clip and one of its captions, drawn per step.
- ``intrinsic``: ParaSpeechCLAP-Intrinsic multi-label BCE on the unscaled cosine between the
  clip and one prompt paraphrase per tag of ``attributes.all_tags()``.
- ``rank``: EmotionRankCLAP Rank-N-Contrast on arousal: each clip against a prompt of its
  own arousal level, the denominator holding only prompts at least as far in level.
- ``labels``: zero-shot cross-entropy: per attribute, softmax over the label prompts at the
  model's temperature (what the zero-shot read-out of ``clap-eval`` does), labels that are
  None skipped.

Deterministic for a seed on one machine: the model init and dropout come from
``torch.manual_seed(seed)``, every batch from ``(seed, step)`` (``train.data``), torch runs
with ``use_deterministic_algorithms(True)`` and a fixed thread count. ``--max-seconds`` is a
safety stop and the only thing that can make two runs differ (where each stops).

Every ``--eval-every`` steps the model is scored on the first ``--val-clips`` clips of the
val split with ``clapedge.calib.evaluate`` (the same code as ``clap-eval``) and the best
state by the mean of the target metrics is kept; that state is saved with
``ClapModel.save_dir`` (atomic), plus ``training.json`` (recipe, timings, validation history).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clapedge.errors import ClapEdgeError, ConfigError
from clapedge.models.clap import ClapModel
from clapedge.models.config import ClapConfig
from clapedge.models.presets import PRESETS, build_preset
from clapedge.train.attributes import ATTRIBUTES, all_tags
from clapedge.train.data import SAMPLERS, BatchMaker, load_clips, prompt_pool
from clapedge.train.objectives import info_nce, intrinsic_tag_loss, rank_n_contrast_loss
from clapedge.train.text_cache import TextFeatures, default_cache_dir

OBJECTIVES = ("infonce", "intrinsic", "rank", "labels")
PRECISIONS = ("fp32", "bf16")
# The metrics the issue sets targets for; their mean picks the best checkpoint.
SELECTION = ("uar/sex", "uar/voice_quality", "uar/pitch", "uar/rate", "uar/loudness",
             "tau/arousal", "t2a/P@10")
LOG_SCALE_RANGE = (0.0, math.log(100.0))  # ParaSpeechCLAP / CLIP clamp, in log space
TINY_VOCAB = 128  # the tiny presets' text vocabulary


@dataclass
class TrainConfig:
    """A training run; ``clap-train`` flags map one to one onto these fields."""

    corpus: Path
    output: Path
    preset: str = "default"
    init: Path | None = None
    tiny: bool = False
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    objectives: tuple[str, ...] = ("infonce", "intrinsic", "rank", "labels")
    infonce_weight: float = 1.0
    intrinsic_weight: float = 1.0
    rank_weight: float = 0.5
    labels_weight: float = 1.0
    crop_seconds: float = 1.5
    conv_channels: int | None = None
    conv_bias: bool | None = None
    dropout: float | None = None
    causal_context: int | None = None
    sampler: str = "shuffle"
    eval_every: int = 200
    val_clips: int = 200
    max_seconds: float | None = None
    threads: int = 1
    precision: str = "fp32"
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    force: bool = False

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not known; accepted: {', '.join(PRESETS)}")
        if not self.objectives:
            raise ConfigError("objectives: name at least one of " + ", ".join(OBJECTIVES))
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ConfigError(f"objective {name!r} is not known; accepted: {', '.join(OBJECTIVES)}")
        for name in ("steps", "batch_size", "eval_every", "val_clips", "threads", "conv_channels"):
            value = getattr(self, name)
            if name == "conv_channels" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("lr", "crop_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("weight_decay", "grad_clip", "infonce_weight", "intrinsic_weight",
                     "rank_weight", "labels_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup={self.warmup!r} must be a fraction in [0, 1)")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} is not known; accepted: {', '.join(SAMPLERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds={self.max_seconds!r} must be > 0")
        manifest = Path(self.corpus) / "manifest.jsonl"
        if not manifest.is_file():
            raise ConfigError(f"{manifest} not found: CORPUS_DIR must be a corpus written by "
                              "`clap-corpus DIR` (e.g. clap-corpus data/corpus-default --size default)")
        if Path(self.output).exists() and not self.force:
            raise ConfigError(f"{self.output} already exists; pass --force to replace it")
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise ConfigError(f"--init {self.init}: not a model directory (no config.json)")
        if self.init is not None and (self.conv_channels is not None or self.conv_bias is not None):
            raise ConfigError("--conv-channels/--conv-bias change the architecture; they cannot "
                              "apply to --init")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.causal_context is not None and self.causal_context < 1:
            raise ConfigError(f"--causal-context={self.causal_context!r} must be >= 1 frame")

    def weight(self, objective: str) -> float:
        return getattr(self, f"{objective}_weight")


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_step: int
    best_score: float
    best_val: dict[str, float]
    seconds: float
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the weighted total of every step


# ----------------------------------------------------------------------------- model

def _word_tokenizer(texts: list[str], folder: Path, vocab_size: int = TINY_VOCAB) -> Path:
    """A lower-case WordLevel tokenizer.json over the most frequent words of ``texts``, small
    enough for the tiny presets' vocabulary (other words map to [UNK])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    counts = Counter(w.lower() for t in texts for w, _ in pre.pre_tokenize_str(t))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(special)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


_AUDIO_DROPOUTS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout")


def model_config(cfg: TrainConfig) -> ClapConfig:
    """The preset's config with the run's architecture options: ``conv_channels`` (width of
    the audio conv front end, whose cost dominates a CPU step), ``conv_bias`` (a bias in the
    front-end convs: see docs/default-model.md, loudness) and ``dropout`` (every audio-tower
    and projection dropout; it changes training only, not the model used for inference)."""
    config = build_preset(cfg.preset, tiny=cfg.tiny)
    backbone = dict(config.audio.backbone_config)
    if cfg.conv_channels is not None:
        backbone["conv_dim"] = [cfg.conv_channels] * len(backbone["conv_dim"])
    if cfg.conv_bias is not None:
        backbone["conv_bias"] = cfg.conv_bias
    audio, text = config.audio, config.text
    if cfg.dropout is not None:
        backbone.update({k: cfg.dropout for k in _AUDIO_DROPOUTS})
        audio = dataclasses.replace(audio, projection=dataclasses.replace(
            audio.projection, dropout=cfg.dropout))
        text = dataclasses.replace(text, projection=dataclasses.replace(
            text.projection, dropout=cfg.dropout))
    audio = dataclasses.replace(audio, backbone_config=backbone,
                                causal_context=cfg.causal_context)
    return dataclasses.replace(config, audio=audio, text=text)


def build_model(cfg: TrainConfig, texts: list[str], scratch: Path) -> ClapModel:
    """The model to train: ``--init`` weights, the tiny preset with a word tokenizer built from
    the corpus, or the default preset with the real all-MiniLM-L6-v2 text tower."""
    if cfg.init is not None:
        model = ClapModel.from_dir(cfg.init)
        if cfg.causal_context is not None:  # same parameters: fine-tune into a causal encoder
            model.set_causal_context(cfg.causal_context)
    elif cfg.tiny:
        model = ClapModel.from_config(model_config(cfg))
        model.attach_tokenizer(_word_tokenizer(texts, scratch / "tokenizer"), max_length=64)
    elif cfg.preset == "default":
        from clapedge.models.minilm import load_minilm

        model = ClapModel.from_config(model_config(cfg))
        load_minilm(model)
    else:
        raise ConfigError(f"preset {cfg.preset!r} needs pretrained text weights that clapedge "
                          "cannot download; start from a converted model with --init MODEL_DIR")
    if not model.config.text.freeze:
        raise ConfigError("clap-train trains with a frozen text backbone (its outputs are "
                          "cached); this model has text.freeze=false")
    if cfg.init is None:
        _init_conv_biases(model)
    return model


FIRST_CONV_BIAS_STD = 0.01


@torch.no_grad()
def _init_conv_biases(model: ClapModel) -> None:
    """Front-end conv biases: N(0, 0.01) in the first conv, zero in the others.

    The corpus has digital silence (about 18 % of the samples are exactly 0). Without a bias
    the first conv's output there is exactly 0, every LayerNorm of the front end then sees a
    near-zero-variance frame and scales its gradient by 1/sqrt(eps) = 316, layer after layer:
    the gradient norm at initialisation was 4.6e16 on a real batch (4.6e16 also with zero-
    initialised biases; 1.4e3 with this init). A small first-layer bias gives silent frames
    a fixed, well-conditioned pattern and gives the level-normalising LayerNorms an absolute
    reference, so loudness becomes learnable. HF's own init, U(+-1/sqrt(fan_in)) = +-0.32,
    outweighs speech at -38 dBFS (conv output std about 0.02) and sex and voice quality were
    not learnt with it (docs/default-model.md)."""
    for i, layer in enumerate(model.audio_branch.base.feature_extractor.conv_layers):
        if layer.conv.bias is not None:
            if i == 0:
                layer.conv.bias.normal_(0.0, FIRST_CONV_BIAS_STD)
            else:
                layer.conv.bias.zero_()


def _param_groups(model: ClapModel, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay: biases, norms, scale
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(steps: int, warmup: float):
    warm = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- evaluation

class _TrainingEmbedder:
    """The model being trained behind the ``calib.evaluate`` embedder interface; text goes
    through the cached frozen features and the current projection."""

    def __init__(self, model: ClapModel, features: TextFeatures, batch: int = 16) -> None:
        self.model, self.features, self.batch = model, features, batch
        self.sample_rate = model.config.sample_rate

    @torch.no_grad()
    def embed_audio(self, signals: list[np.ndarray]) -> np.ndarray:
        order = sorted(range(len(signals)), key=lambda i: len(signals[i]))
        out = torch.zeros(len(signals), self.model.config.embed_dim)
        for start in range(0, len(order), self.batch):
            rows = order[start:start + self.batch]
            width = max(len(signals[i]) for i in rows)
            wave = torch.zeros(len(rows), width)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                wave[r, :len(signals[i])] = torch.from_numpy(np.asarray(signals[i], np.float32))
                mask[r, :len(signals[i])] = 1
            out[rows] = self.model.embed_audio(wave, mask)
        return out.numpy()

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        self.features.ensure(texts)
        return F.normalize(self.model.text_projection(self.features.rows(list(texts))), dim=-1).numpy()


def selection_score(headline: dict[str, float]) -> float:
    return float(np.mean([headline.get(k, 0.0) for k in SELECTION]))


# ----------------------------------------------------------------------------- training

class Trainer:
    def __init__(self, cfg: TrainConfig, log=print) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log

    def _setup(self, scratch: Path) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        rate = (ClapConfig.from_json_file(Path(cfg.init) / "config.json").sample_rate
                if cfg.init is not None else build_preset(cfg.preset).sample_rate)
        self.clips = load_clips(cfg.corpus, "train", rate)
        self.log(f"loaded {len(self.clips)} training clips "
                 f"({sum(len(c.audio) for c in self.clips) / rate / 60:.1f} min) "
                 f"in {time.perf_counter() - t0:.1f} s")
        self.prompts = prompt_pool()
        captions = [c for clip in self.clips for c in clip.captions]
        prompts = [p for ps in self.prompts.values() for p in ps]
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, captions + prompts, scratch)
        t0 = time.perf_counter()
        self.features = TextFeatures(self.model, captions + prompts, cfg.cache_dir)
        self.text_seconds = time.perf_counter() - t0
        self.log(f"text features for {len(self.features)} captions and prompts: "
                 f"{'cache' if self.features.cache_hit else 'computed'} in {self.text_seconds:.1f} s")
        crop = int(round(cfg.crop_seconds * self.model.config.sample_rate))
        self.batches = BatchMaker(self.clips, cfg.batch_size, crop, cfg.seed, cfg.sampler)
        self.tags = all_tags()
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.steps, cfg.warmup))
        self.scale_param = getattr(self.model, self.model.config.logit_scale_key)

    # -- one step

    def _step_texts(self, step: int, batch) -> tuple[list[str], list[str], list[str]]:
        """The step's tag prompts (one paraphrase per tag) and each clip's arousal prompt."""
        pick = self.batches.prompt_choice(step, len(self.tags) + len(batch.captions), 1 << 30)
        tag_texts = [self.prompts[t][pick[i] % len(self.prompts[t])] for i, t in enumerate(self.tags)]
        arousal = ATTRIBUTES["arousal"]
        rank_texts = [self.prompts[("arousal", arousal[lvl])][
            pick[len(self.tags) + r] % len(self.prompts[("arousal", arousal[lvl])])]
            for r, lvl in enumerate(batch.levels["arousal"].tolist())]
        return batch.captions, tag_texts, rank_texts

    def _losses(self, step: int) -> dict[str, torch.Tensor]:
        cfg, model = self.cfg, self.model
        batch = self.batches.batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            audio = model.embed_audio(batch.wave, batch.mask, normalize=False)
        audio = audio.float()
        captions, tag_texts, rank_texts = self._step_texts(step, batch)
        projected = model.text_projection(self.features.rows(captions + tag_texts + rank_texts))
        n, t = len(captions), len(tag_texts)
        cap_emb, tag_emb, rank_emb = projected[:n], projected[n:n + t], projected[n + t:]
        scale = model.get_logit_scale()
        losses: dict[str, torch.Tensor] = {}
        if "infonce" in cfg.objectives:
            losses["infonce"] = info_nce(audio, cap_emb, scale)
        if "intrinsic" in cfg.objectives:
            losses["intrinsic"] = intrinsic_tag_loss(audio, tag_emb, batch.tag_targets)
        if "rank" in cfg.objectives:
            arousal = batch.levels["arousal"]
            losses["rank"] = rank_n_contrast_loss(audio, rank_emb, arousal, scale)
        if "labels" in cfg.objectives:
            losses["labels"] = self._label_loss(audio, tag_emb, batch.levels, scale)
        return losses

    def _label_loss(self, audio, tag_emb, levels, scale) -> torch.Tensor:
        audio_n, tags_n = F.normalize(audio, dim=-1), F.normalize(tag_emb, dim=-1)
        terms, start = [], 0
        for attribute, labels in ATTRIBUTES.items():
            logits = scale * audio_n @ tags_n[start:start + len(labels)].T
            start += len(labels)
            target = levels[attribute]
            keep = target >= 0
            if keep.any():
                terms.append(F.cross_entropy(logits[keep], target[keep]))
        return torch.stack(terms).mean()

    def _apply(self, losses: dict[str, torch.Tensor]) -> float:
        total = sum(self.cfg.weight(k) * v for k, v in losses.items())
        self.last_terms = {k: v.item() for k, v in losses.items()}
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
            self.last_terms["grad"] = norm.item()
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            self.scale_param.clamp_(*LOG_SCALE_RANGE)
        return total.item()

    # -- validation

    def validate_now(self) -> dict[str, float]:
        from clapedge.calib.evaluate import evaluate

        self.model.eval()
        try:
            report = evaluate(_TrainingEmbedder(self.model, self.features), self.cfg.corpus,
                              split="val", limit=self.cfg.val_clips)
        finally:
            self.model.train()
        return report.headline()

    # -- the loop

    def run(self, progress=None) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix="clap-train-"))
        # process-wide torch settings, restored afterwards (training may run inside a test)
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        try:
            torch.set_num_threads(cfg.threads)
            torch.use_deterministic_algorithms(True)
            # deterministic mode also NaN-fills every new tensor (a debugging aid, not needed
            # for determinism): 30% of a CPU step's time in the profile
            torch.utils.deterministic.fill_uninitialized_memory = False
            self._setup(scratch)
            setup_seconds = time.perf_counter() - start
            result = self._loop(progress, start)
            result.seconds = time.perf_counter() - start
            self._save(result, setup_seconds)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill
            shutil.rmtree(scratch, ignore_errors=True)
        return result

    def _loop(self, progress, start: float) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        best = (-math.inf, -1, {}, None)
        history: list[dict] = []
        running: dict[str, float] = {}
        losses: list[float] = []
        loop_start = time.perf_counter()
        step = 0
        for step in range(cfg.steps):
            total = self._apply(self._losses(step))
            losses.append(total)
            for k, v in {"loss": total, **self.last_terms}.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if progress is not None:
                progress(step + 1, cfg.steps, running, self.model.get_logit_scale().item())
            last = step + 1 == cfg.steps
            out_of_time = cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds
            if (step + 1) % cfg.eval_every == 0 or last or out_of_time:
                t0 = time.perf_counter()
                val = self.validate_now()
                score = selection_score(val)
                history.append({"step": step + 1, "score": score, "val": val,
                                "loss": dict(running), "seconds": time.perf_counter() - start,
                                "eval_seconds": time.perf_counter() - t0})
                self.log(f"step {step + 1}: val score {score:.3f} " + " ".join(
                    f"{k}={val[k]:.3f}" for k in SELECTION if k in val)
                    + f" (eval {time.perf_counter() - t0:.0f} s)")
                if score > best[0]:
                    state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    best = (score, step + 1, val, state)
            if out_of_time:
                self.log(f"stopping at step {step + 1}: --max-seconds {cfg.max_seconds:g} reached")
                break
        self.model.load_state_dict(best[3])
        self.train_seconds = time.perf_counter() - loop_start
        return TrainResult(output=Path(cfg.output), steps=step + 1, best_step=best[1],
                           best_score=best[0], best_val=best[2], seconds=0.0, history=history,
                           losses=losses)

    def _save(self, result: TrainResult, setup_seconds: float) -> None:
        cfg = self.cfg
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_root = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            staged = self.model.eval().save_dir(tmp_root / "model")
            record = {
                "recipe": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in asdict(cfg).items()
                           if k not in ("output", "force", "cache_dir")},
                "command": "clap-train " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
                "steps_run": result.steps, "best_step": result.best_step,
                "best_val_score": result.best_score, "best_val": result.best_val,
                "seconds": {"total": round(result.seconds, 1), "setup": round(setup_seconds, 1),
                            "text_features": round(self.text_seconds, 1),
                            "training_and_validation": round(self.train_seconds, 1)},
                "history": result.history,
                "versions": {"torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "threads": cfg.threads},
                "corpus": _corpus_summary(cfg.corpus),
            }
            (staged / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if out.exists():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.replace(out, old / "replaced")
                os.replace(staged, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, out)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)


def _corpus_summary(corpus: Path) -> dict:
    path = Path(corpus) / "corpus.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: data.get(k) for k in ("seed", "size", "num_clips", "augment", "splits")}


def train(cfg: TrainConfig, log=print, progress=None) -> TrainResult:
    """Runs ``cfg`` and writes the best model to ``cfg.output``."""
    return Trainer(cfg, log).run(progress)


# ----------------------------------------------------------------------------- CLI

class _Display:
    """A rich progress bar on a terminal; plain log lines every ``every`` steps otherwise."""

    def __init__(self, console, every: int = 25) -> None:
        self.console, self.every = console, every
        self.bar = self.task = None
        self.started = time.perf_counter()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=self.console)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def __call__(self, step: int, total: int, running: dict[str, float], scale: float) -> None:
        info = " ".join(f"{k} {v:.3f}" for k, v in running.items()) + f" scale {scale:.1f}"
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("steps", total=total, info="")
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / step * (total - step)
            self.log(f"step {step}/{total} {info} | {elapsed / step:.2f} s/step, "
                     f"eta {eta / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``clap-train``."""
    import click
    from rich.console import Console

    defaults = TrainConfig(corpus=Path("."), output=Path("."))

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("corpus", type=click.Path(path_type=Path))
    @click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
                  help="Model directory to write (config.json, model.safetensors, tokenizer, "
                       "training.json).")
    @click.option("--preset", default=defaults.preset, show_default=True)
    @click.option("--init", type=click.Path(path_type=Path), default=None,
                  help="Start from this model directory (fine-tuning) instead of a preset.")
    @click.option("--tiny", is_flag=True, help="The preset's tiny variant (tests, smoke runs).")
    @click.option("--steps", type=int, default=defaults.steps, show_default=True)
    @click.option("--batch", "batch_size", type=int, default=defaults.batch_size, show_default=True)
    @click.option("--lr", type=float, default=defaults.lr, show_default=True,
                  help="Peak learning rate (AdamW; linear warm-up, cosine decay).")
    @click.option("--weight-decay", type=float, default=defaults.weight_decay, show_default=True)
    @click.option("--seed", type=int, default=defaults.seed, show_default=True)
    @click.option("--objectives", default=",".join(defaults.objectives), show_default=True,
                  help=f"Comma-separated, from: {', '.join(OBJECTIVES)}.")
    @click.option("--infonce-weight", type=float, default=defaults.infonce_weight, show_default=True)
    @click.option("--intrinsic-weight", type=float, default=defaults.intrinsic_weight, show_default=True)
    @click.option("--rank-weight", type=float, default=defaults.rank_weight, show_default=True)
    @click.option("--labels-weight", type=float, default=defaults.labels_weight, show_default=True)
    @click.option("--crop-seconds", type=float, default=defaults.crop_seconds, show_default=True,
                  help="Longest training crop; evaluation uses whole clips.")
    @click.option("--conv-channels", type=int, default=None,
                  help="Width of the audio conv front end (default: the preset's).")
    @click.option("--conv-bias/--no-conv-bias", default=None,
                  help="Bias in the audio conv front end, first layer N(0, 0.01), the others 0 "
                       "(default: the preset's); see docs/default-model.md.")
    @click.option("--dropout", type=float, default=None,
                  help="Every audio-tower and projection dropout (default: the preset's).")
    @click.option("--causal-context", type=int, default=None, metavar="FRAMES",
                  help="Train a causal (streaming) audio encoder: each frame attends to at most "
                       "FRAMES earlier ones, the positional conv reads only the past "
                       "(models/causal.py); with --init, fine-tunes a bidirectional model into one.")
    @click.option("--sampler", type=click.Choice(SAMPLERS), default=defaults.sampler, show_default=True)
    @click.option("--eval-every", type=int, default=defaults.eval_every, show_default=True)
    @click.option("--val-clips", type=int, default=defaults.val_clips, show_default=True)
    @click.option("--max-seconds", type=float, default=None,
                  help="Stop after this much wall time (keeps the best state so far).")
    @click.option("--threads", type=int, default=defaults.threads, show_default=True)
    @click.option("--precision", type=click.Choice(PRECISIONS), default=defaults.precision,
                  show_default=True, help="bf16: autocast the audio tower (CPUs with AMX/AVX512-BF16).")
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=defaults.cache_dir,
                  show_default="~/.cache/clapedge/text-features",
                  help="Where frozen text features are cached.")
    @click.option("--force", is_flag=True, help="Replace an existing output directory.")
    def cli(corpus, output, objectives, **options):
        """Train a ClapModel on a clap-corpus directory CORPUS; write the best model by
        validation score to OUTPUT."""
        console = Console(stderr=True)
        try:
            cfg = TrainConfig(corpus=corpus, output=output,
                              objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()),
                              **options)
            with _Display(console) as display:
                result = train(cfg, log=display.log, progress=display)
        except ClapEdgeError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        console.print(f"wrote {result.output} (best val score {result.best_score:.3f} at step "
                      f"{result.best_step} of {result.steps}) in {result.seconds / 60:.1f} min",
                      highlight=False, soft_wrap=True)

    cli.main(args=argv, prog_name="clap-train")


if __name__ == "__main__":
    main()
