"""Importing seed checkpoints: layout mapping, weight-norm spellings, strictness, safety."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from clapedge.errors import CheckpointError
from clapedge.models.checkpoint import import_checkpoint, import_state_dict, read_state_dict
from clapedge.models.clap import ClapModel
from clapedge.models.presets import build_preset

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

POS_CONV = "audio_branch.base.encoder.pos_conv_embed.conv."


def tiny_model(name: str, seed: int) -> ClapModel:
    torch.manual_seed(seed)
    return ClapModel.from_config(build_preset(name, tiny=True)).eval()


def seed_layout(model: ClapModel, spelling: str) -> dict[str, torch.Tensor]:
    """The state dict as the seed repos save it: our names plus the extras they carry
    (text pooler, legacy buffers, SpecAugment vector), weight norm in ``spelling``."""
    hidden_t = model.text_branch.hidden_size
    hidden_a = model.audio_branch.hidden_size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_branch.base.pooler.dense.weight"] = torch.randn(hidden_t, hidden_t)
    state["text_branch.base.pooler.dense.bias"] = torch.randn(hidden_t)
    state["text_branch.base.embeddings.position_ids"] = torch.arange(66)[None]
    state["audio_branch.base.masked_spec_embed"] = torch.rand(hidden_a)
    names = {"old": ("weight_g", "weight_v"),
             "new": ("parametrizations.weight.original0", "parametrizations.weight.original1")}
    g, v = (state.pop(POS_CONV + k, None) for k in names["new"])
    g = g if g is not None else state.pop(POS_CONV + "weight_g")
    v = v if v is not None else state.pop(POS_CONV + "weight_v")
    state[POS_CONV + names[spelling][0]] = g
    state[POS_CONV + names[spelling][1]] = v
    return state


def embeddings(model: ClapModel) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    wave = torch.randn(2, 6000, generator=gen)
    mask = torch.ones(2, 6000, dtype=torch.long)
    mask[1, 4000:] = 0
    ids = torch.randint(3, 100, (2, 5), generator=gen)
    with torch.no_grad():
        return model.embed_audio(wave, mask), model.embed_text(ids, torch.ones_like(ids))


@pytest.mark.parametrize("spelling", ["old", "new"])
@pytest.mark.parametrize("name", ["paraspeechclap", "paraclap"])
def test_seed_checkpoint_round_trips_with_identical_outputs(name, spelling, tmp_path):
    source = tiny_model(name, seed=0)
    path = tmp_path / f"{name}.pth.tar"
    torch.save(seed_layout(source, spelling), path)
    target = tiny_model(name, seed=1)
    assert not torch.equal(embeddings(source)[0], embeddings(target)[0])
    report = import_checkpoint(target, path)
    for a, b in zip(embeddings(source), embeddings(target)):
        assert torch.equal(a, b)
    assert "text_branch.base.pooler.dense.weight" in report.ignored
    assert "audio_branch.base.masked_spec_embed" in report.ignored
    assert str(path) in report.summary()
    key = source.config.logit_scale_key
    assert torch.equal(getattr(target, key), getattr(source, key))
    if spelling == "old":  # this torch/transformers uses parametrizations; the old one is respelt
        assert (POS_CONV + "weight_g", POS_CONV + "parametrizations.weight.original0") in report.renamed


def test_scale_spelt_the_other_way_is_renamed_not_dropped():
    source = tiny_model("paraspeechclap", seed=0)
    state = source.state_dict()
    state["logit_scale"] = state.pop("log_logit_scale") + 1.0
    target = tiny_model("paraspeechclap", seed=1)
    report = import_state_dict(target, state)
    assert ("logit_scale", "log_logit_scale") in report.renamed
    assert target.log_logit_scale.item() == pytest.approx(source.log_logit_scale.item() + 1.0)


def test_renamed_key_fails_naming_it(tmp_path):
    state = tiny_model("paraspeechclap", seed=0).state_dict()
    state["audio_projection.linear_a.weight"] = state.pop("audio_projection.linear1.weight")
    path = tmp_path / "renamed.pth.tar"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(tiny_model("paraspeechclap", seed=1), path)
    message = str(err.value)
    assert str(path) in message
    assert "missing 1 key(s): audio_projection.linear1.weight" in message
    assert "unexpected 1 key(s): audio_projection.linear_a.weight" in message


def test_wrong_architecture_lists_shape_mismatches():
    state = tiny_model("paraspeechclap", seed=0).state_dict()
    state["text_projection.linear1.weight"] = torch.zeros(16, 48)
    with pytest.raises(CheckpointError, match=r"text_projection.linear1.weight \(16, 48\)"):
        import_state_dict(tiny_model("paraspeechclap", seed=1), state)


def test_a_different_seed_architecture_is_refused():
    state = tiny_model("paraclap", seed=0).state_dict()
    with pytest.raises(CheckpointError, match="gru_rel_pos"):  # WavLM keys absent from wav2vec2
        import_state_dict(tiny_model("paraspeechclap", seed=1), state)


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_with_a_code_payload_is_refused(writer, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    if writer == "torch":
        torch.save({"audio_projection.linear1.weight": torch.zeros(2), "x": _Payload(str(marker))}, path)
    else:  # a bare pickle (protocol 2, as torch's legacy format) holding only the payload
        path.write_bytes(pickle.dumps({"x": _Payload(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)
    assert "asks for posix.system" in str(err.value) or "asks for nt.system" in str(err.value)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "cut-pickle"])
def test_corrupt_file_is_refused_naming_it(damage, tmp_path):
    good = tmp_path / "good.pth.tar"
    torch.save(tiny_model("paraspeechclap", seed=0).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.pth.tar"
    bad.write_bytes({"truncated": data[: len(data) // 3], "garbage": b"\x00not a checkpoint" * 50,
                     "empty": b"", "cut-pickle": pickle.dumps({"a": [1, 2]}, protocol=2)[:9]}[damage])
    with pytest.raises(CheckpointError, match=str(bad)) as err:
        read_state_dict(bad)
    assert "corrupt or truncated" in str(err.value)


def test_corrupt_safetensors_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "absent.pth.tar")


def test_safetensors_checkpoint_is_accepted(tmp_path):
    source = tiny_model("gemo-clap", seed=0)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = tiny_model("gemo-clap", seed=1)
    import_checkpoint(target, path)
    assert torch.equal(embeddings(source)[0], embeddings(target)[0])
    assert torch.equal(source.heads.layers.gender.weight, target.heads.layers.gender.weight)


@pytest.mark.parametrize("wrap", ["state_dict", "module"])
def test_wrapped_and_data_parallel_state_dicts(wrap, tmp_path):
    source = tiny_model("ess-clap", seed=0)
    state = source.state_dict()
    obj = {"state_dict": state} if wrap == "state_dict" else {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "wrapped.pt"
    torch.save(obj, path)
    target = tiny_model("ess-clap", seed=1)
    import_checkpoint(target, path)
    assert torch.equal(embeddings(source)[1], embeddings(target)[1])


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"epoch": 3, "log_logit_scale": torch.zeros(())}, path)
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        read_state_dict(path)
