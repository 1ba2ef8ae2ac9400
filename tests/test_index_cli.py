"""clap-index / clap-search end to end on tiny bundles and generated wav files: windows, skips,
failures, JSON schema, filters, bundle refusal, the lock, damage and repair."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, tone  # noqa: E402

from clapedge.runtime import Runtime  # noqa: E402
from clapedge.runtime.cli_index import main as index_cli  # noqa: E402
from clapedge.runtime.cli_search import main as search_cli  # noqa: E402
from clapedge.runtime.index import Index, IndexDamagedWarning, SEGMENTS_DIR  # noqa: E402
from clapedge.runtime.segment import GALLERY_FILE  # noqa: E402

# the tiny bundle's clip policy: one input up to 3 s, else 2 s windows every 1 s
LENGTHS = {"a/short.wav": 1.0, "a/mid.wav": 2.5, "b/long.wav": 5.5, "b/c/tiny.wav": 0.2,
           "b/c/noise.wav": 3.5}
RESULT_KEYS = {"rank", "id", "path", "start", "end", "duration", "score", "tags"}


def write_wavs(root: Path) -> list[Path]:
    paths = []
    for i, (name, seconds) in enumerate(sorted(LENGTHS.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "noise" in name:
            x = 0.1 * np.random.default_rng(i).standard_normal(int(seconds * RATE))
        else:
            x = tone(seconds, seed=i, freq=140 + 90 * i)
        sf.write(path, x.astype(np.float32), RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def windows(n: int) -> list[tuple[int, int]]:
    if n <= 3 * RATE:
        return [(0, n)]
    spans = [(s, s + 2 * RATE) for s in range(0, n - 2 * RATE + 1, RATE)]
    if spans[-1][1] < n:
        spans.append((n - 2 * RATE, n))
    return spans


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("icli")
    bundle, _ = build_bundle(base / "bundle")
    other, _ = build_bundle(base / "other", seed=3)
    wavs = write_wavs(base / "wavs")
    return base, bundle, other, wavs


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def added(setup, name: str, extra=()) -> Path:
    base, bundle, _, _ = setup
    idx = base / name
    if idx.exists():
        shutil.rmtree(idx)
    r = run(index_cli, "add", idx, "--bundle", bundle, base / "wavs", "--json", *extra)
    assert r.exit_code == 0, r.output
    return idx


def test_add_then_search_matches_brute_force(setup):
    base, bundle, _, wavs = setup
    idx = base / "main.index"
    r = run(index_cli, "add", idx, "--bundle", bundle, base / "wavs", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    rt = Runtime(bundle)
    spans = {str(p): windows(len(rt.load_audio(p))) for p in wavs}
    assert summary["files_added"] == len(wavs) and summary["failed"] == []
    assert summary["records"] == sum(len(s) for s in spans.values()) == 11
    assert summary["embed_s"] > 0 and summary["store_s"] > 0

    r = run(search_cli, idx, "a calm female voice", "-k", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"query", "audio", "index", "model", "k", "results", "timing_ms"}
    assert out["query"] == "a calm female voice" and out["model"] == "tiny-test"
    assert set(out["timing_ms"]) == {"embed", "search", "total"}
    assert [set(x) for x in out["results"]] == [RESULT_KEYS] * 4
    assert [x["rank"] for x in out["results"]] == [1, 2, 3, 4]

    # brute force over the same windows embedded directly
    keys, vecs = [], []
    for path, ss in spans.items():
        signal = rt.load_audio(path)
        for a, b in ss:
            keys.append((path, round(a / RATE, 6), round(b / RATE, 6)))
            vecs.append(rt.embed_audio(signal[a:b], sample_rate=RATE)[0])
    scores = np.stack(vecs) @ rt.embed_text(["a calm female voice"])[0]
    order = np.argsort(-scores, kind="stable")[:4]
    assert [(x["path"], x["start"], x["end"]) for x in out["results"]] == \
        [keys[i] for i in order]
    np.testing.assert_allclose([x["score"] for x in out["results"]], scores[order], atol=1e-5)

    long = str(base / "wavs" / "b" / "long.wav")
    r = run(search_cli, idx, "--audio", long, "-k", "1", "--json")
    top = json.loads(r.stdout)["results"][0]
    assert top["path"] == long and top["duration"] == pytest.approx(5.5)

    r = run(search_cli, idx, "a voice")  # the table
    assert r.exit_code == 0 and "short.wav" in r.stdout and "search" in r.stderr


def test_second_add_skips_unchanged_and_replaces_changed(setup):
    base, bundle, _, wavs = setup
    idx = added(setup, "skip.index")
    r = run(index_cli, "add", idx, base / "wavs", "--json")  # bundle recorded in the index
    summary = json.loads(r.stdout)
    assert r.exit_code == 0 and summary["files_skipped"] == len(wavs)
    assert summary["files_added"] == 0

    changed = base / "wavs2"
    shutil.copytree(base / "wavs", changed)
    sf.write(changed / "a" / "short.wav", tone(4.0, seed=42), RATE)  # 1 s -> 4 s: 3 windows
    r = run(index_cli, "add", idx, changed, "--json")
    assert json.loads(r.stdout)["files_added"] == len(wavs)  # other paths: new files
    r = run(index_cli, "add", idx, changed / "a" / "short.wav", "--json")
    assert json.loads(r.stdout)["files_skipped"] == 1
    sf.write(changed / "a" / "short.wav", tone(1.0, seed=43), RATE)
    r = run(index_cli, "add", idx, changed / "a", "--json")
    summary = json.loads(r.stdout)
    assert (summary["files_added"], summary["files_skipped"]) == (1, 1)
    info = json.loads(run(index_cli, "info", idx, "--json").stdout)
    assert info["files"] == 2 * len(wavs)
    assert info["records"] == 2 * 11 and info["tombstones"] == 3  # the 3 windows replaced


def test_unreadable_files_are_reported_and_the_rest_indexed(setup):
    base, bundle, _, wavs = setup
    bad = base / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "broken.wav").write_bytes(b"RIFF\x00\x00")
    (bad / "notes.txt").write_text("not audio, not picked up from a directory")
    idx = base / "bad.index"
    r = run(index_cli, "add", idx, "--bundle", bundle, bad, wavs[0], base / "nope.flac",
            "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert summary["files_added"] == 1
    assert sorted(Path(f["path"]).name for f in summary["failed"]) == ["broken.wav", "nope.flac"]
    assert "cannot decode audio" in r.stderr and "2 of 3 files failed" in r.stderr
    assert "Traceback" not in r.output


def test_filters_and_windows_options(setup):
    base, bundle, _, _ = setup
    idx = added(setup, "filters.index", ["--window-s", "1.0", "--hop-s", "0.5", "--tag",
                                         "session=one"])
    r = run(search_cli, idx, "a voice", "-k", "50", "--json", "--path-prefix",
            base / "wavs" / "b", "--min-duration", "1", "--tag", "session=one")
    results = json.loads(r.stdout)["results"]
    assert results and all(x["path"].startswith(str(base / "wavs" / "b")) for x in results)
    assert all(x["duration"] >= 1 and x["tags"] == {"session": "one"} for x in results)
    assert {x["path"].rsplit("/", 1)[1] for x in results} == {"long.wav", "noise.wav"}
    long = [x for x in results if x["path"].endswith("long.wav")]
    assert len(long) == 10 and all(x["end"] - x["start"] == pytest.approx(1.0) for x in long)
    r = run(search_cli, idx, "a voice", "--json", "--tag", "session=two")
    assert json.loads(r.stdout)["results"] == []
    r = run(search_cli, idx, "a voice", "--json", "--max-duration", "0.5")
    assert {x["path"].rsplit("/", 1)[1] for x in json.loads(r.stdout)["results"]} == \
        {"tiny.wav"}


def test_another_bundle_is_refused(setup):
    base, _, other, wavs = setup
    idx = added(setup, "mismatch.index")
    r = run(search_cli, idx, "a voice", "--bundle", other)
    assert r.exit_code == 2 and "was built with bundle" in r.stderr
    r = run(index_cli, "add", idx, "--bundle", other, wavs[0])
    assert r.exit_code == 2 and "another space" in r.stderr
    r = run(search_cli, idx)
    assert r.exit_code == 2 and "either a QUERY" in r.stderr


def test_remove_compact_info_and_the_lock(setup):
    base, _, _, wavs = setup
    idx = added(setup, "maint.index")
    r = run(index_cli, "remove", idx, "--path-prefix", base / "wavs" / "b" / "c")
    assert r.exit_code == 0 and "removed 4 records" in r.stdout
    r = run(index_cli, "remove", idx, "0", "--path", wavs[-1])
    assert r.exit_code == 0
    r = run(index_cli, "compact", idx)
    assert r.exit_code == 0 and "dropped" in r.stdout
    info = json.loads(run(index_cli, "info", idx, "--json", "--verify").stdout)
    assert info["tombstones"] == 0 and len(info["segments"]) == 1 and info["verify"] == []
    assert info["records"] == 11 - 4 - 1 - 5  # b/c (4), id 0 (a/mid), b/long (5)
    with Index.open(idx):  # another writer holds it
        r = run(index_cli, "add", idx, wavs[0])
        assert r.exit_code == 2 and "open for writing by another writer" in r.stderr
        r = run(search_cli, idx, "a voice", "--json")  # readers are not refused
        assert r.exit_code == 0
    r = run(index_cli, "info", base / "wavs")
    assert r.exit_code == 2 and "not a clapedge index" in r.stderr


def test_damage_is_reported_and_repair_reembeds(setup):
    base, _, _, _ = setup
    idx = added(setup, "repair.index")
    with Index.open(idx, readonly=True) as i:
        ids = i.ids()
        before = i.vectors(ids)
        (seg,) = [s.name for _, s in i._view.segments]
    gallery = idx / SEGMENTS_DIR / seg / GALLERY_FILE
    data = bytearray(gallery.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gallery.write_bytes(bytes(data))
    r = run(index_cli, "info", idx)
    assert r.exit_code == 1 and f"damaged {seg}" in r.stdout
    r = run(search_cli, idx, "a voice", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["results"] == []
    assert f"damaged segment {seg}" in r.stderr
    r = run(index_cli, "add", idx, base / "wavs")
    assert r.exit_code == 2 and "repair" in r.stderr
    r = run(index_cli, "repair", idx)
    assert r.exit_code == 0, r.output
    assert f"repaired segment {seg}" in r.stdout and "re-embedded 11 records" in r.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexDamagedWarning)
        with Index.open(idx) as i:
            assert i.writable and i.ids().tolist() == ids.tolist()
            np.testing.assert_allclose(i.vectors(ids), before, atol=1e-6)
    assert "nothing to repair" in run(index_cli, "repair", idx).stdout


@pytest.fixture(scope="module")
def exported_bundle(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    from clapedge.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("exported") / "bundle"
    export_bundle(tiny_model_dir("default"), out, ExportOptions(precision="fp32", banks="none"))
    return out


def test_exported_bundle_end_to_end(setup, exported_bundle):
    base, _, _, wavs = setup
    idx = base / "exported.index"
    r = run(index_cli, "add", idx, "--bundle", exported_bundle, base / "wavs", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files_added"] == len(wavs)
    r = run(search_cli, idx, "a calm low pitched female voice", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["results"]) == 3 and [set(x) for x in out["results"]] == [RESULT_KEYS] * 3
    scores = [x["score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True)
    r = run(search_cli, idx, "--audio", wavs[0], "-k", "1", "--json")
    top = json.loads(r.stdout)["results"][0]
    assert top["path"] == str(wavs[0]) and top["score"] == pytest.approx(1.0, abs=1e-4)
