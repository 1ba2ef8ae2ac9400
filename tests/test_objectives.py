"""The seed papers' objectives against small cases computed by hand (math / numpy)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from clapedge.errors import ConfigError
from clapedge.train import objectives as obj

# Two clips in 2-D: cosines [[1, .6], [0, .8]] (the second text is (.6, .8)).
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
SIM = np.array([[1.0, 0.6], [0.0, 0.8]])


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_kl_rows(p: np.ndarray, logits: np.ndarray) -> float:
    """mean over rows of KL(p_row || softmax(logits_row)), 0 log 0 = 0."""
    logq = np_log_softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - logq), 0.0)
    return float(terms.sum() / len(p))


def test_info_nce_by_hand():
    s = 2.0
    # logits [[2, 1.2], [0, 1.6]]: rows are audio->text, columns text->audio.
    rows = (-2 + lse(2, 1.2)) + (-1.6 + lse(0, 1.6))
    cols = (-2 + lse(2, 0)) + (-1.6 + lse(1.2, 1.6))
    expected = 0.5 * (rows / 2 + cols / 2)
    assert obj.info_nce(A, T, s).item() == pytest.approx(expected, rel=1e-6)
    # Embeddings are normalised inside: scaling an input changes nothing.
    assert obj.info_nce(3 * A, 0.5 * T, s).item() == pytest.approx(expected, rel=1e-6)


def test_logit_scale_is_learnable_and_clamped():
    scale = obj.LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    loss = obj.info_nce(A, T, scale())
    loss.backward()
    assert scale.log_scale.grad is not None and scale.log_scale.grad.item() != 0
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-6)  # clamped in the forward pass
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(-3.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        obj.LogitScale(init=500.0)


def test_intrinsic_tag_loss_uses_unscaled_cosine():
    audio = torch.tensor([[2.0, 0.0]])  # not unit length: only the direction counts
    tags = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # cosines 1, 0, -1
    targets = torch.tensor([[1, 0, 0]])
    # BCE-with-logits: y=1 -> log(1 + e^-x); y=0 -> log(1 + e^x).
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(-1))) / 3
    assert obj.intrinsic_tag_loss(audio, tags, targets).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="targets"):
        obj.intrinsic_tag_loss(audio, tags, torch.zeros(1, 2))


def test_class_balanced_weights_by_hand():
    w = obj.class_balanced_weights([{"a"}, {"a"}, {"a"}, {"b", "a"}, set()])
    # counts a: 4, b: 1 -> 1/4, 1/4, 1/4, max(1/4, 1) = 1, untagged 1/5.
    raw = np.array([0.25, 0.25, 0.25, 1.0, 0.2])
    np.testing.assert_allclose(w, raw / raw.sum())


def test_class_balanced_sampling_evens_out_the_tags():
    labels = [{"common"}] * 90 + [{"uncommon"}] * 10
    idx = obj.class_balanced_indices(labels, 20000, seed=0)
    share = np.mean([next(iter(labels[i])) == "uncommon" for i in idx])
    assert share == pytest.approx(0.5, abs=0.02)  # 90 x 1/90 vs 10 x 1/10
    np.testing.assert_array_equal(idx, obj.class_balanced_indices(labels, 20000, seed=0))
    assert not np.array_equal(idx, obj.class_balanced_indices(labels, 20000, seed=1))


def test_every_batch_gets_rare_tags():
    labels = [{"x"}] * 50 + [{"y"}] * 48 + [{"rare"}] * 2  # rare: 2% < 5%
    idx = obj.class_balanced_indices(labels, 640, seed=0, batch_size=16, min_rare=3)
    rare = {98, 99}
    for start in range(0, 640, 16):
        assert sum(i in rare for i in idx[start:start + 16]) >= 3


def test_sampler_is_deterministic_per_epoch():
    labels = [{"a"}] * 6 + [{"b"}] * 2
    sampler = obj.ClassBalancedSampler(labels, num_samples=32, seed=7)
    first = list(sampler)
    assert len(sampler) == 32 == len(first) and set(first) <= set(range(8))
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    counts = Counter(next(iter(labels[i])) for i in first)
    assert counts["b"] > 4  # 2 of 8 items, sampled about half of the time


def test_self_distillation_by_hand():
    s, w = 2.0, 0.3
    student_a, student_t = A, T
    teacher_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher_t = torch.tensor([[0.8, 0.6], [0.0, 1.0]])  # teacher cosines [[.8, 0], [.6, 1]]
    s_logits = s * SIM
    t_logits = s * np.array([[0.8, 0.0], [0.6, 1.0]])
    p_rows = np.exp(np_log_softmax(t_logits))
    p_cols = np.exp(np_log_softmax(t_logits.T))
    kl = 0.5 * (np_kl_rows(p_rows, s_logits) + np_kl_rows(p_cols, s_logits.T))
    hard = obj.info_nce(A, T, s).item()
    got = obj.self_distillation_loss(student_a, student_t, teacher_a, teacher_t, s, weight=w)
    assert got.item() == pytest.approx((1 - w) * hard + w * kl, rel=1e-6)
    # A student equal to its teacher pays only the hard term.
    same = obj.self_distillation_loss(A, T, A, T, s, weight=w)
    assert same.item() == pytest.approx((1 - w) * hard, rel=1e-6)
    assert obj.self_distillation_loss(A, T, teacher_a, teacher_t, s, weight=1.0).item() == \
        pytest.approx(kl, rel=1e-6)


def test_self_distillation_sends_no_gradient_to_the_teacher():
    a = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    ta = torch.randn(4, 8, requires_grad=True)
    tt = torch.randn(4, 8, requires_grad=True)
    scale = obj.LogitScale()
    obj.self_distillation_loss(a, t, ta, tt, scale(), temperature=2.0).backward()
    assert a.grad is not None and t.grad is not None
    assert ta.grad is None and tt.grad is None


def _rnc_numpy(logits: np.ndarray, dist: np.ndarray) -> float:
    n = len(logits)
    terms = []
    for i in range(n):
        for j in range(n):
            ks = [k for k in range(n) if dist[i, k] >= dist[i, j]]
            terms.append(-logits[i, j] + lse(*(logits[i, k] for k in ks)))
    return float(np.mean(terms))


def test_rank_n_contrast_by_hand():
    s = 1.5
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([0.0, 1.0, 2.0])  # arousal levels: d = |i - k|
    sim = audio.numpy() @ text.numpy().T
    dist = np.abs(values.numpy()[:, None] - values.numpy()[None, :])
    # Anchor 0, positive 1 (d = 1): the denominator holds texts 1 and 2, not text 0 (d = 0).
    assert [k for k in range(3) if dist[0, k] >= dist[0, 1]] == [1, 2]
    expected = 0.5 * (_rnc_numpy(s * sim, dist) + _rnc_numpy(s * sim.T, dist.T))
    got = obj.rank_n_contrast_loss(audio, text, values, s)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # The loop's term (i=0, j=1), written out: sim01 = 1, sim02 = 0, text 0 excluded.
    t01 = -s * sim[0, 1] + lse(s * sim[0, 1], s * sim[0, 2])
    assert t01 == pytest.approx(-1.5 + math.log(math.exp(1.5) + 1.0), rel=1e-6)


def test_rank_n_contrast_with_vector_labels_and_gradients():
    torch.manual_seed(0)
    audio = torch.randn(5, 4, requires_grad=True)
    text = torch.randn(5, 4, requires_grad=True)
    values = torch.tensor([[0, 1], [1, 1], [2, 0], [0, 0], [1, 2]])
    loss = obj.rank_n_contrast_loss(audio, text, values, 3.0)
    sim = torch.nn.functional.normalize(audio, dim=1) @ torch.nn.functional.normalize(
        text, dim=1).T
    dist = np.abs(values.numpy()[:, None, :] - values.numpy()[None, :, :]).sum(-1)
    sim = sim.detach().numpy() * 3.0
    expected = 0.5 * (_rnc_numpy(sim, dist) + _rnc_numpy(sim.T, dist.T))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(audio.grad).all() and torch.isfinite(text.grad).all()


def test_gemo_sl_by_hand():
    s, alpha = 2.0, 0.8
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    emotion = torch.tensor([0, 0, 1])
    sex = torch.tensor([0, 1, 1])
    m = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.2], [0.0, 0.2, 1.0]])  # .8 M_emo + .2 M_sex
    logits = s * (audio.numpy() @ text.numpy().T)
    targets = m / m.sum(axis=1, keepdims=True)
    expected = 0.5 * (np_kl_rows(targets, logits) + np_kl_rows(targets, logits.T))  # M = M^T
    got = obj.gemo_sl_loss(audio, text, emotion, sex, s, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_gemo_ml_by_hand():
    s, alpha = 2.0, 0.9
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    emotion = torch.tensor([0, 0, 1])
    sex = torch.tensor([0, 1, 1])
    logits = s * (audio.numpy() @ text.numpy().T)

    def soft(m):
        t = m / m.sum(axis=1, keepdims=True)
        return 0.5 * (np_kl_rows(t, logits) + np_kl_rows(t, logits.T))

    m_emo = np.array([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])
    m_sex = np.array([[1.0, 0, 0], [0, 1, 1], [0, 1, 1]])
    got = obj.gemo_ml_loss(audio, text, emotion, sex, s, alpha=alpha)
    assert got.item() == pytest.approx(alpha * soft(m_emo) + (1 - alpha) * soft(m_sex), rel=1e-6)
    head = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # sex classifier logits
    ce = np.mean([-2 + lse(2, 0), -1 + lse(0, 1), -1 + lse(1, 1)])
    got = obj.gemo_ml_loss(audio, text, emotion, sex, s, alpha=alpha, sex_logits=head)
    assert got.item() == pytest.approx(alpha * soft(m_emo) + (1 - alpha) * ce, rel=1e-6)


def test_losses_fall_when_pairs_align():
    """Sanity: every objective prefers matched embeddings to shuffled ones."""
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    noise = 0.05 * torch.randn(6, 16)
    good, bad = a + noise, a[torch.tensor([1, 2, 3, 4, 5, 0])] + noise
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for loss in (lambda t: obj.info_nce(a, t, 10.0),
                 lambda t: obj.rank_n_contrast_loss(a, t, labels, 10.0),
                 lambda t: obj.gemo_sl_loss(a, t, labels, labels % 2, 10.0)):
        assert loss(good) < loss(bad)
