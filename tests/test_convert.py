"""clap-convert: seed checkpoint -> model directory, through click's CliRunner."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from clapedge.models.clap import ClapModel
from clapedge.models.convert import main
from clapedge.models.presets import build_preset

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


@pytest.fixture()
def source(tmp_path):
    """A tiny ParaSpeechCLAP model and its checkpoint in the released layout."""
    torch.manual_seed(0)
    model = ClapModel.from_config(build_preset("paraspeechclap", tiny=True)).eval()
    state = dict(model.state_dict())
    state["text_branch.base.pooler.dense.weight"] = torch.zeros(32, 32)
    state["text_branch.base.pooler.dense.bias"] = torch.zeros(32)
    path = tmp_path / "paraspeechclap-tiny.pth.tar"
    torch.save(state, path)
    return model, path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def audio_embedding(model: ClapModel) -> torch.Tensor:
    wave = torch.randn(2, 5000, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5000, dtype=torch.long)
    mask[0, 3000:] = 0
    with torch.no_grad():
        return model.embed_audio(wave, mask)


def test_convert_writes_a_loadable_directory(source, tmp_path):
    model, ckpt = source
    out = tmp_path / "converted"
    result = run(ckpt, "--preset", "paraspeechclap", "--tiny", "-o", out)
    assert result.exit_code == 0, result.output
    assert "ignored 2 unused: text_branch.base.pooler.dense.bias" in result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    converted = ClapModel.from_dir(out)
    assert converted.config.name == "paraspeechclap-tiny"
    assert torch.equal(audio_embedding(converted), audio_embedding(model))


def test_existing_output_needs_force(source, tmp_path):
    _, ckpt = source
    out = tmp_path / "converted"
    assert run(ckpt, "--preset", "paraspeechclap", "--tiny", "-o", out).exit_code == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    refused = run(ckpt, "--preset", "paraspeechclap", "--tiny", "-o", out)
    assert refused.exit_code == 1
    assert "already exists; pass --force" in refused.output
    assert "Traceback" not in refused.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    forced = run(ckpt, "--preset", "paraspeechclap", "--tiny", "-o", out, "--force",
                 "--audio-pooling", "mean")
    assert forced.exit_code == 0, forced.output
    assert ClapModel.from_dir(out).config.audio.pooling == "mean"


def test_wrong_preset_is_an_error_not_a_traceback(source, tmp_path):
    _, ckpt = source
    result = run(ckpt, "--preset", "paraclap", "--tiny", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert str(ckpt) in result.output and "does not match the model architecture" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_exits_1_naming_the_file(tmp_path):
    bad = tmp_path / "broken.pth.tar"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run(bad, "--preset", "paraspeechclap", "--tiny", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "broken.pth.tar" in result.output
    assert "Traceback" not in result.output


def test_config_option_gives_the_architecture(source, tmp_path):
    model, ckpt = source
    config = tmp_path / "config.json"
    config.write_text(model.config.to_json())
    out = tmp_path / "from-config"
    result = run(ckpt, "--config", config, "-o", out)
    assert result.exit_code == 0, result.output
    assert torch.equal(audio_embedding(ClapModel.from_dir(out)), audio_embedding(model))


def test_preset_or_config_exactly_one(source, tmp_path):
    _, ckpt = source
    neither = run(ckpt, "-o", tmp_path / "out")
    assert neither.exit_code == 1 and "exactly one of --preset or --config" in neither.output
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"audio": {"backbone": "whisper"}}')
    result = run(ckpt, "--config", bad_config, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "bad.json" in result.output
    unknown = run(ckpt, "--preset", "clip", "-o", tmp_path / "out")
    assert unknown.exit_code == 2  # click's usage error lists the choices
    assert "paraspeechclap" in unknown.output


def test_tokenizer_option_carries_tokenizer_json(source, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    _, ckpt = source
    tok = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"[UNK]": 0, "calm": 1}, unk_token="[UNK]")).save(str(tok))
    out = tmp_path / "with-tok"
    result = run(ckpt, "--preset", "paraspeechclap", "--tiny", "--tokenizer", tok, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert ClapModel.from_dir(out).config.tokenizer.files == ["tokenizer.json"]
