"""The Runtime API against numpy: embeddings, determinism, tags, rewards, ordinals, threads."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, tone  # noqa: E402

from clapedge.errors import BundleError, ConfigError  # noqa: E402
from clapedge.runtime import ClapRuntime, Runtime, Tag  # noqa: E402
from clapedge.runtime.audio import padded_length, segment  # noqa: E402

BUCKET = 1600  # clip_policy(): bucket_seconds 0.1 at 16 kHz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("api") / "b")


@pytest.fixture(scope="module")
def rt(tiny):
    return Runtime(tiny[0], threads=1)


@pytest.fixture(scope="module")
def tagger_rt(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("tagger") / "b", tagger_k=3)
    return Runtime(root, threads=1)


def twin_embedding(model, signal, clip):
    """The numpy twin of the runtime's audio path: clip policy, bucket padding, pooling."""
    windows = segment(signal, RATE, clip)
    embs = []
    for w in windows:
        padded = np.zeros(padded_length(len(w), BUCKET), np.float32)
        padded[:len(w)] = w
        embs.append(model.audio(padded, len(w)))
    if len(embs) == 1:
        return embs[0]
    mean = np.mean([e / np.linalg.norm(e) for e in embs], axis=0)
    return mean / np.linalg.norm(mean)


def numpy_topk(scores, labels, k):
    order = np.argsort(-scores, kind="stable")[:k]
    return [(labels[i], float(scores[i])) for i in order]


def as_pairs(tags):
    return [(t.label, t.score) for t in tags]


def assert_tags_match(tags, expected):
    assert [t.label for t in tags] == [label for label, _ in expected]
    np.testing.assert_allclose([t.score for t in tags], [s for _, s in expected], atol=1e-5)


# ---------------------------------------------------------------- embeddings

@pytest.mark.parametrize("seconds", [0.05, 0.5, 1.23, 3.0, 5.5, 7.77])
def test_audio_embedding_matches_numpy(rt, tiny, seconds):
    x = tone(seconds, seed=int(seconds * 100))
    emb = rt.embed_audio(x, RATE)
    assert emb.shape == (1, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], twin_embedding(tiny[1], x, rt.manifest.clip), atol=2e-5)
    assert abs(np.linalg.norm(emb[0]) - 1) < 1e-5


def test_encode_audio_reports_windows_and_heads(rt, tiny):
    short, long = rt.encode_audio([(tone(0.05), RATE), (tone(5.5), RATE)])
    assert short.windows == 1 and short.duration_s == pytest.approx(0.05)
    assert long.windows == 5 and long.duration_s == pytest.approx(5.5)
    x = tone(0.05)
    padded = np.zeros(RATE // 2, np.float32)
    padded[:len(x)] = x  # padded to min_seconds, the padding counted as signal
    np.testing.assert_allclose(short.heads["sex"], tiny[1].head(padded, len(padded)), atol=1e-4)


def test_same_input_is_bit_identical_across_calls_and_neighbours(rt):
    x, a, b, c = (tone(s, seed=i) for i, s in enumerate((1.23, 1.25, 1.21, 1.29)))
    alone = rt.embed_audio(x, RATE)[0]
    assert rt.embed_audio(x, RATE)[0].tobytes() == alone.tobytes()
    # the same batch shape with other neighbours: bit-identical
    pair = rt.embed_audio([x, a], RATE)[0]
    assert rt.embed_audio([b, x], RATE)[1].tobytes() == pair.tobytes()
    assert rt.embed_audio([c, x, tone(3.0)], RATE, batch_size=2)[1].tobytes() == pair.tobytes()
    # batch_size=1: every input runs alone, whatever the call holds
    for batch, row in (([a, x, c], 1), ([tone(2.7), x], 1), ([x] * 3, 2)):
        got = rt.embed_audio(batch, RATE, batch_size=1)[row]
        assert got.tobytes() == alone.tobytes()
    # another batch shape: the same up to float rounding
    np.testing.assert_allclose(pair, alone, rtol=0, atol=1e-6)


def test_long_audio_is_deterministic(rt):
    x = tone(9.3, seed=5)
    a = rt.embed_audio(x, RATE)
    assert rt.embed_audio(x, RATE).tobytes() == a.tobytes()
    alone = rt.embed_audio(x, RATE, batch_size=1)
    b = rt.embed_audio([tone(2.0), x], RATE, batch_size=1)[1]
    assert b.tobytes() == alone[0].tobytes()
    np.testing.assert_allclose(a, alone, rtol=0, atol=1e-6)


def test_path_and_array_inputs_agree(rt, tmp_path):
    pcm = np.round(tone(1.5) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", pcm, RATE, subtype="PCM_16")
    from_path = rt.embed_audio(tmp_path / "a.wav")
    assert from_path.tobytes() == rt.embed_audio(pcm, RATE).tobytes()
    assert from_path.tobytes() == rt.embed_audio(str(tmp_path / "a.wav")).tobytes()


def test_other_rates_are_resampled(rt):
    x48 = tone(1.0, 48000)
    np.testing.assert_array_equal(rt.embed_audio(x48, 48000),
                                  rt.embed_audio(rt.load_audio(x48, 48000), RATE))


def test_silence_gives_a_finite_embedding(rt):
    emb = rt.embed_audio(np.zeros(RATE, np.float32), RATE)
    assert np.isfinite(emb).all() and abs(np.linalg.norm(emb) - 1) < 1e-5


def test_empty_batches(rt):
    assert rt.embed_audio([], RATE).shape == (0, 8)
    assert rt.embed_text([]).shape == (0, 8)


def test_text_embedding_matches_numpy_and_is_batch_independent(rt, tiny):
    texts = ["a calm voice", "ANGRY shout", "a low pitched female speaker", "unknownword"]
    emb = rt.embed_text(texts)
    ids = rt.bundle.tokenizer().encode(texts)
    assert ids[3] == [1]  # [UNK]
    for row, x in zip(emb, ids):
        np.testing.assert_allclose(row, tiny[1].text(x), atol=1e-6)
    alone = rt.embed_text("a calm voice")
    assert alone.shape == (1, 8) and alone[0].tobytes() == emb[0].tobytes()
    assert rt.embed_text(texts[::-1], batch_size=1)[3].tobytes() == emb[0].tobytes()


def test_text_is_truncated_to_max_length(rt):
    long = " ".join(["calm"] * 40)
    assert len(rt.bundle.tokenizer().encode([long])[0]) == 16
    np.testing.assert_allclose(rt.embed_text(long), rt.embed_text("calm"), atol=1e-6)


# ---------------------------------------------------------------- tags

def test_tag_matches_numpy(rt):
    x = tone(1.7, seed=7)
    emb = rt.embed_audio(x, RATE)[0]
    bank = np.load(rt.bundle.root / "banks" / "emotion.npy")
    expected = numpy_topk(bank @ emb, rt.labels("emotion"), 3)
    tags = rt.tag(x, "emotion", k=3, sample_rate=RATE)
    assert all(isinstance(t, Tag) for t in tags)
    assert_tags_match(tags, expected)
    assert rt.tag(x, sample_rate=RATE) == tags  # default_bank is emotion
    assert len(rt.tag(x, "emotion", k=None, sample_rate=RATE)) == 5
    assert len(rt.tag(x, "emotion", k=50, sample_rate=RATE)) == 5
    np.testing.assert_allclose(rt.bank_scores(x, "emotion", RATE), bank @ emb, atol=1e-6)


def test_tagger_onnx_is_used_when_it_fits(tagger_rt):
    x = tone(1.1, seed=8)
    bundle = tagger_rt.bundle
    emb = tagger_rt.embed_audio(x, RATE)[0]
    expected = numpy_topk(bundle.bank("emotion") @ emb, tagger_rt.labels("emotion"), 3)
    assert "tagger" not in bundle.load_times
    assert_tags_match(tagger_rt.tag(x, "emotion", k=2, sample_rate=RATE), expected[:2])
    assert "tagger" in bundle.load_times
    # k above the baked k, and long audio, fall back to the audio tower + kernel
    full = numpy_topk(bundle.bank("emotion") @ emb, tagger_rt.labels("emotion"), 5)
    assert_tags_match(tagger_rt.tag(x, "emotion", k=5, sample_rate=RATE), full)
    long = tone(6.0, seed=9)
    emb_long = tagger_rt.embed_audio(long, RATE)[0]
    assert_tags_match(tagger_rt.tag(long, "emotion", k=3, sample_rate=RATE),
                      numpy_topk(bundle.bank("emotion") @ emb_long,
                                 tagger_rt.labels("emotion"), 3))


def test_multi_label_uses_per_label_thresholds(rt):
    spec = rt.manifest.banks["style"]
    bank = np.load(rt.bundle.root / "banks" / "style.npy")
    for seed in range(6):
        x = tone(1.0, seed=seed, freq=100 + 150 * seed)
        scores = bank @ rt.embed_audio(x, RATE)[0]
        expected = [(label, s) for label, s in numpy_topk(scores, spec.labels, 4)
                    if s >= spec.thresholds[label]]
        assert_tags_match(rt.tag(x, "style", k=None, sample_rate=RATE), expected)
        assert_tags_match(rt.tag(x, "style", k=1, sample_rate=RATE), expected[:1])


def test_attribute_heads_are_softmax_probabilities(rt, tiny):
    x = tone(1.6, seed=11)
    padded = np.zeros(padded_length(len(x), BUCKET), np.float32)
    padded[:len(x)] = x
    logits = tiny[1].head(padded, len(x))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    tags = rt.tag(x, "sex", k=2, sample_rate=RATE)
    assert_tags_match(tags, numpy_topk(probs, ("female", "male"), 2))
    assert sum(t.score for t in tags) == pytest.approx(1.0)


def test_tag_all_is_one_pass_over_all_banks_and_heads(rt):
    x = tone(2.2, seed=12)
    every = rt.tag_all(x, k=2, sample_rate=RATE)
    assert list(every) == ["arousal", "emotion", "style", "sex"]
    for name, tags in every.items():
        assert_tags_match(tags, as_pairs(rt.tag(x, name, k=2, sample_rate=RATE)))
    assert list(rt.tag_all(x, ["sex", "emotion"], sample_rate=RATE)) == ["sex", "emotion"]


# ---------------------------------------------------------------- rewards and ordinals

def test_score_is_the_cosine(rt):
    x = tone(1.4, seed=13)
    expected = float(rt.embed_audio(x, RATE)[0] @ rt.embed_text("a calm voice")[0])
    assert rt.score(x, "a calm voice", sample_rate=RATE) == pytest.approx(expected, abs=1e-6)


def test_rerank_sorts_candidates_by_similarity(rt):
    candidates = [tone(1.0 + 0.3 * i, seed=20 + i, freq=150 + 90 * i) for i in range(6)]
    prompt = "a high pitched whisper"
    ranked = rt.rerank(candidates, prompt, sample_rate=RATE, batch_size=4)
    scores = rt.embed_audio(candidates, RATE) @ rt.embed_text(prompt)[0]
    order = np.argsort(-scores, kind="stable")
    assert [c is candidates[i] for (c, _), i in zip(ranked, order)] == [True] * 6
    np.testing.assert_allclose([s for _, s in ranked], scores[order], atol=1e-6)
    assert rt.rerank([], prompt) == []


def test_ordinal_is_a_softmax_weighted_mean_of_anchor_values(rt):
    spec = rt.manifest.banks["arousal"]
    values = np.array([spec.values[label] for label in spec.labels])
    for seed in range(4):
        x = tone(1.2, seed=30 + seed, freq=120 + 200 * seed)
        cos = np.load(rt.bundle.root / "banks" / "arousal.npy") @ rt.embed_audio(x, RATE)[0]
        z = rt.manifest.logit_scale * cos.astype(np.float64)
        w = np.exp(z - z.max())
        expected = float((w / w.sum()) @ values)
        got = rt.ordinal(x, "arousal", sample_rate=RATE)
        assert got == pytest.approx(expected, abs=1e-5)
        assert values.min() <= got <= values.max()


# ---------------------------------------------------------------- errors

def test_user_errors_are_config_errors(rt):
    x = tone(1.0)
    with pytest.raises(ConfigError, match=r"no label bank or attribute head 'pitch'.*'emotion'"):
        rt.tag(x, "pitch", sample_rate=RATE)
    with pytest.raises(ConfigError, match="'emotion' is categorical, not ordinal"):
        rt.ordinal(x, "emotion", sample_rate=RATE)
    with pytest.raises(ConfigError, match="k: 0"):
        rt.tag(x, "emotion", k=0, sample_rate=RATE)
    with pytest.raises(ConfigError, match="batch_size"):
        rt.embed_audio(x, RATE, batch_size=0)
    with pytest.raises(ConfigError, match="has no tokens"):
        rt.embed_text(["calm", ""])


def test_audio_only_bundle_and_model_without_mask(tmp_path):
    root, model = build_bundle(tmp_path / "b", text=False, mask=False)
    rt = ClapRuntime(root)
    x = tone(1.0, seed=40)
    emb = rt.embed_audio(x, RATE)[0]
    np.testing.assert_allclose(emb, model.audio(x, len(x)), atol=2e-5)  # 1 s: no padding
    with pytest.raises(BundleError, match="has no tokenizer|has no text tower"):
        rt.score(x, "calm", sample_rate=RATE)


# ---------------------------------------------------------------- threads

def test_threads_give_the_serial_results(tiny):
    inputs = [tone(0.3 + 0.7 * i, seed=50 + i) for i in range(8)]
    texts = ["a calm voice", "angry", "a low pitched female speaker", "fast shout"]

    def work(rt, i):
        x = inputs[i % len(inputs)]
        return (rt.embed_audio(x, RATE).tobytes(), rt.embed_text(texts[i % 4]).tobytes(),
                as_pairs(rt.tag(x, "style", k=None, sample_rate=RATE)),
                rt.ordinal(x, "arousal", sample_rate=RATE))

    serial_rt = Runtime(tiny[0], threads=1)
    serial = [work(serial_rt, i) for i in range(16)]
    shared = Runtime(tiny[0], threads=1)  # fresh: lazy sessions are created by the threads
    results, errors = [None] * 16, []
    barrier = threading.Barrier(8)

    def run(t):
        try:
            barrier.wait()
            for i in range(t, 16, 8):
                results[i] = work(shared, i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == serial
