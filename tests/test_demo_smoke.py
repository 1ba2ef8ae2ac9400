"""`make demo` in small: demo.sh on the tiny corpus with the tiny default model (the
``tiny_demo`` fixture, about 40 s), checking that every step's output exists and is sane.

The steps are the CLIs a user runs (clap-corpus, clap-export --int8, clap-tag, clap-index /
clap-search, clap-stream) joined with the corpus labels by ``clapedge.train.demo``; this test
reads what the demo prints and the files it leaves, the way a newcomer would.
"""

from __future__ import annotations

import json
import re

import pytest
import soundfile as sf

from clapedge.train.attributes import ATTRIBUTES
from clapedge.train.corpus import load_manifest

STEPS = ("1/5", "2/5", "3/5", "4/5", "5/5", "done in")
QUERIES = ("a woman whispering", "a calm, slow, low-pitched male voice",
           "a loud, fast, excited female speaker")
TAG_ROW = re.compile(r"│ (clip_\d+\.wav) +│(.+)│\s*$")
CELL = re.compile(r"^\s*(\S+) \(true (\S+)\)\s*$")
SEARCH_TITLE = re.compile(r'clap-search "(.+)" \((\d+\.\d) ms\)')
SEARCH_ROW = re.compile(r"│ (\d+) +│ (-?\d\.\d{3}) +│ (clip_\d+\.wav) +│ (.+?) +│\s*$")
STREAM_EVENT = re.compile(r"^\s*(\d+\.\d\d)-\s*(\d+\.\d\d) s  arousal: (\S+) \((-?\d\.\d\d)\)  "
                          r"\[(\d+) ms\]$")
TRUTH = re.compile(r"^\s*(\d+\.\d\d)-\s*(\d+\.\d\d) s  true arousal=(\S+)$")


@pytest.fixture(scope="module")
def demo(tiny_demo):
    out, log, status = tiny_demo
    assert status == 0, f"demo.sh failed (exit {status}):\n{log[-4000:]}"
    return out, log


def section(log: str, step: str) -> str:
    """The output of one step: from its header to the next one."""
    start = log.index(f"== {step}")
    ends = [log.find("\n== ", start + 1), log.find("\x1b[1m== ", start + 1)]
    ends = [e for e in ends if e > 0]
    return log[start:min(ends)] if ends else log[start:]


def test_every_step_runs_in_order(demo):
    _, log = demo
    positions = [log.find(f"== {s}") for s in STEPS]
    assert all(p >= 0 for p in positions), f"missing steps: {log[-2000:]}"
    assert positions == sorted(positions)
    assert "Traceback" not in log
    for name in ("corpus", "INT8 bundle", "index", "stream input"):
        assert re.search(rf"^  {name} +\S", log, re.M), f"summary lacks {name!r}"


def test_corpus_step(demo):
    out, _ = demo
    rows = load_manifest(out / "corpus")
    assert len(rows) == 60
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all((out / "corpus" / "wavs" / r["path"].rsplit("/", 1)[-1]).is_file() for r in rows)


def test_export_step_writes_a_verified_int8_bundle(demo):
    from clapedge.runtime import Bundle

    out, log = demo
    bundle = Bundle.load(out / "default-int8")  # checks every checksum of the audio tower
    manifest = bundle.manifest
    assert manifest.towers.audio.precision == "int8"
    assert {"arousal", "sex", "voice_quality"} <= set(manifest.banks)
    report = json.loads((out / "default-int8" / "export_report.json").read_text())
    text = json.dumps(report)
    assert "parity" in text and "task_drop" in text
    assert "parity audio (fp32 vs PyTorch)" in section(log, "2/5")


def test_tag_step_shows_predicted_and_true_attributes(demo):
    out, log = demo
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in load_manifest(out / "corpus", split="test")}
    tagged = [TAG_ROW.search(line) for line in section(log, "3/5").splitlines()]
    tagged = [m for m in tagged if m]
    assert len(tagged) >= 3, section(log, "3/5")
    for m in tagged:
        clip = m.group(1)
        assert clip in rows, f"{clip} is not a test clip"
        cells = [CELL.match(c) for c in m.group(2).split("│")]
        assert all(cells) and len(cells) == 3, m.group(0)
        for bank, cell in zip(("arousal", "sex", "voice_quality"), cells):
            predicted, true = cell.groups()
            assert predicted in ATTRIBUTES[bank], f"{bank}: {predicted}"
            assert true == str(rows[clip]["attributes"][bank])
    score = re.search(r"top-1 correct: arousal (\d+)/(\d+), sex (\d+)/(\d+), "
                      r"voice_quality (\d+)/(\d+)", log)
    assert score and int(score.group(2)) == len(tagged)


def test_search_step_shows_ranked_results_with_true_attributes(demo):
    out, log = demo
    clips = {r["path"].rsplit("/", 1)[-1] for r in load_manifest(out / "corpus")}
    part = section(log, "4/5")
    assert re.search(r"added 60 files", part), part[:500]
    titles = SEARCH_TITLE.findall(part)
    assert [q for q, _ in titles] == list(QUERIES)
    blocks = part.split("clap-search \"")[1:]
    for block in blocks:
        hits = [SEARCH_ROW.search(line) for line in block.splitlines()]
        hits = [h for h in hits if h]
        assert [int(h.group(1)) for h in hits] == [1, 2, 3, 4, 5]
        scores = [float(h.group(2)) for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 <= s <= 1.0 for s in scores)
        assert all(h.group(3) in clips for h in hits)
        assert all("sex=" in h.group(4) and "arousal=" in h.group(4) for h in hits)
    assert (out / "index" / "catalog.sqlite").is_file()


def test_stream_step_shows_tags_over_time(demo):
    out, log = demo
    part = section(log, "5/5")
    truth = [TRUTH.match(line) for line in part.splitlines()]
    truth = [t for t in truth if t]
    assert {t.group(3) for t in truth} <= {"low", "mid", "high"} and len(truth) >= 2
    events = [STREAM_EVENT.match(line) for line in part.splitlines()]
    events = [e for e in events if e]
    assert len(events) >= 5, part
    starts = [float(e.group(1)) for e in events]
    ends = [float(e.group(2)) for e in events]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(abs((b - a) - 2.0) < 0.011 for a, b in zip(starts, ends))  # --window 2
    assert all(abs(b - a - 1.0) < 0.011 for a, b in zip(starts[:-2], starts[1:-1]))  # --hop 1
    info = sf.info(str(out / "arousal-ramp.wav"))
    assert abs(ends[-1] - info.frames / info.samplerate) < 0.011  # the last window ends the file
    assert abs(ends[-1] - float(truth[-1].group(2))) < 0.011
    assert all(e.group(3) in ATTRIBUTES["arousal"] for e in events)
