"""Hugging Face backbones built from a config dict: never from the hub, never the network.

The audio backbones (wav2vec2, HuBERT, WavLM, data2vec-audio) share one layout that
``models.audio`` relies on: ``feature_extractor.conv_layers`` (conv front end),
``feature_projection`` and ``encoder``. The text backbones are built without their pooler:
every pooling we support reads ``last_hidden_state``, so the pooler would be dead weight.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers

from clapedge.errors import ConfigError

# kind -> (transformers config class, model class)
AUDIO_CLASSES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
}
TEXT_CLASSES = {
    "bert": ("BertConfig", "BertModel"),
    "minilm": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "distilroberta": ("RobertaConfig", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
}

# Settings ClapModel does not use; rejected so a config never creates weights that nothing
# reads (SpecAugment's masked_spec_embed) or a forward path we do not run (the adapter).
_AUDIO_UNSUPPORTED = {
    "mask_time_prob": (0, 0.0),
    "mask_feature_prob": (0, 0.0),
    "add_adapter": (False,),
}
# Applied under the user's settings: no SpecAugment (see above) and no LayerDrop unless asked
# (ParaSpeechCLAP fine-tunes with layerdrop=0; HF's defaults are 0.05-0.1).
_AUDIO_DEFAULTS = {"mask_time_prob": 0.0, "mask_feature_prob": 0.0, "layerdrop": 0.0}


def _classes(kind: str, audio: bool) -> tuple[type, type]:
    table = AUDIO_CLASSES if audio else TEXT_CLASSES
    config_name, model_name = table[kind]
    return getattr(transformers, config_name), getattr(transformers, model_name)


@functools.lru_cache(maxsize=None)
def _known_keys(config_cls: type) -> frozenset[str]:
    default = config_cls()
    return frozenset(k for k in dir(default) if not k.startswith("__")) | frozenset(default.to_dict())


def hf_config(kind: str, settings: dict[str, Any], *, audio: bool) -> Any:
    """The transformers config object for ``settings`` (already validated)."""
    config_cls, _ = _classes(kind, audio)
    merged = {**_AUDIO_DEFAULTS, **settings} if audio else dict(settings)
    merged.pop("model_type", None)
    return config_cls(**merged)


def check_backbone_config(where: str, kind: str, settings: dict[str, Any], *, audio: bool) -> None:
    """Raises ConfigError for an unknown key, an unsupported setting or a shape HF rejects."""
    config_cls, _ = _classes(kind, audio)
    unknown = sorted(k for k in settings if k not in _known_keys(config_cls))
    if unknown:
        raise ConfigError(f"{where}: unknown {config_cls.__name__} key(s) {unknown}")
    declared = settings.get("model_type")
    if declared is not None and declared != config_cls.model_type:
        raise ConfigError(f"{where}.model_type={declared!r} does not match backbone "
                          f"{kind!r} ({config_cls.model_type!r})")
    if audio:
        for key, allowed in _AUDIO_UNSUPPORTED.items():
            if key in settings and settings[key] not in allowed:
                raise ConfigError(f"{where}.{key}={settings[key]!r} is not supported by ClapModel; "
                                  f"accepted: {allowed[0]!r}")
    try:
        config = hf_config(kind, settings, audio=audio)
    except Exception as err:  # transformers raises several types for bad shapes
        raise ConfigError(f"{where}: {config_cls.__name__} rejects these settings: {err}") from err
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"{where}: hidden_size={config.hidden_size} is not divisible by "
                          f"num_attention_heads={config.num_attention_heads}")


def build_backbone(kind: str, settings: dict[str, Any], *, audio: bool) -> torch.nn.Module:
    """A randomly initialised backbone (weights come from a checkpoint or training)."""
    _, model_cls = _classes(kind, audio)
    config = hf_config(kind, settings, audio=audio)
    if audio:
        return model_cls(config)
    return model_cls(config, add_pooling_layer=False)
