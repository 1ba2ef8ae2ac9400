"""clap-tag: JSON lines, the table, per-file failures and exit codes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, tone  # noqa: E402

from clapedge.runtime import Runtime  # noqa: E402
from clapedge.runtime.cli_tag import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root, _ = build_bundle(base / "b", tagger_k=3)
    files = []
    for i, seconds in enumerate((1.0, 2.5, 0.2)):
        path = base / f"clip{i}.wav"
        sf.write(path, tone(seconds, seed=i, freq=200 + 100 * i), RATE, subtype="PCM_16")
        files.append(str(path))
    (base / "broken.wav").write_bytes(b"RIFF\x00\x00")
    return root, files, str(base / "broken.wav")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_json_lines_per_file(setup):
    root, files, _ = setup
    result = run(root, *files, "--json", "-k", "2")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [x["path"] for x in lines] == files
    rt = Runtime(root)
    for line, path in zip(lines, files):
        assert line["model"] == "tiny-test" and line["timing_ms"] > 0
        expected = rt.tag(path, "emotion", k=2)
        assert [t["label"] for t in line["tags"]["emotion"]] == [t.label for t in expected]
        np.testing.assert_allclose([t["score"] for t in line["tags"]["emotion"]],
                                   [t.score for t in expected], atol=1e-5)


def test_unreadable_files_are_reported_and_the_rest_tagged(setup):
    root, files, broken = setup
    result = run(root, files[0], broken, "/no/such/file.flac", files[1], "--json")
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [("error" in x) for x in lines] == [False, True, True, False]
    assert "broken.wav: cannot decode audio" in lines[1]["error"]
    assert "no such file" in lines[2]["error"]
    assert "2 of 4 files failed" in result.stderr
    assert "Traceback" not in result.output


def test_several_banks_and_heads(setup):
    root, files, _ = setup
    result = run(root, files[0], "--bank", "emotion", "--bank", "sex", "--bank", "style",
                 "--json", "-k", "1")
    assert result.exit_code == 0, result.output
    tags = json.loads(result.stdout)["tags"]
    assert list(tags) == ["emotion", "sex", "style"]
    assert len(tags["emotion"]) == 1 and tags["sex"][0]["label"] in ("female", "male")


def test_table_output(setup):
    root, files, broken = setup
    result = run(root, files[0], broken)
    assert result.exit_code == 1
    assert "clip0.wav" in result.stdout and "broken.wav" in result.stdout
    assert "emotion" in result.stdout and "cannot decode audio" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--bank", "pitch"], "no label bank or attribute head 'pitch'"),
    (["--providers", "cuda"], "'cuda' is not available"),
])
def test_bad_options_exit_2_without_traceback(setup, args, message):
    root, files, _ = setup
    result = run(root, files[0], *args)
    assert result.exit_code == 2
    assert f"clap-tag: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.output


def test_bad_bundle_exits_2(setup, tmp_path):
    _, files, _ = setup
    result = run(tmp_path, files[0])
    assert result.exit_code == 2
    assert "no manifest here" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------- clap-stream, clap-bench

def test_clap_stream_file_prints_the_offline_windows(setup):
    from clapedge.runtime.audio import frame_windows
    from clapedge.runtime.cli_stream import main as stream_main
    root, files, _ = setup
    result = CliRunner().invoke(stream_main, [str(root), files[1], "--speed", "0",
                                              "--window", "1.0", "--hop", "0.5", "-k", "2"])
    assert result.exit_code == 0, result.output
    events = [json.loads(x) for x in result.stdout.splitlines()]
    signal = Runtime(root).load_audio(files[1])
    spans = frame_windows(len(signal), RATE, RATE // 2)
    assert [(e["start_s"], e["end_s"]) for e in events] == [(a / RATE, b / RATE)
                                                            for a, b in spans]
    rt = Runtime(root)
    for event, (a, b) in zip(events, spans):
        assert [t["label"] for t in event["tags"]["emotion"]] == \
            [t.label for t in rt.tag(signal[a:b], "emotion", k=2, sample_rate=RATE)]


def test_clap_stream_raw_pcm_from_stdin(setup):
    from clapedge.runtime.cli_stream import main as stream_main
    root, _, _ = setup
    pcm = np.round(tone(2.2, 8000) * 32767).astype("<i2")
    result = CliRunner().invoke(stream_main, [str(root), "-", "--rate", "8000", "--window",
                                              "1.0", "--hop", "1.0", "--bank", "sex"],
                                input=pcm.tobytes())
    assert result.exit_code == 0, result.output
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(e["start_s"], e["end_s"]) for e in events] == [(0.0, 1.0), (1.0, 2.0), (1.2, 2.2)]
    assert all(list(e["tags"]) == ["sex"] for e in events)


def test_clap_stream_unreadable_file_exits_2(setup):
    from clapedge.runtime.cli_stream import main as stream_main
    root, _, broken = setup
    result = CliRunner().invoke(stream_main, [str(root), broken, "--speed", "0"])
    assert result.exit_code == 2
    assert "cannot decode audio" in result.stderr and "Traceback" not in result.output


def test_clap_bench_json(setup):
    from clapedge.runtime.cli_bench import main as bench_main
    root, _, _ = setup
    result = CliRunner().invoke(bench_main, [str(root), "--runs", "5", "--warmup", "1",
                                             "--batch", "2", "--stream-seconds", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "tiny-test" and report["providers"] == ["CPUExecutionProvider"]
    assert report["offline"]["runs"] == 5 and report["load_ms"] > 0
    assert 0 < report["offline"]["p50_ms"] <= report["offline"]["p99_ms"]
    assert report["stream"]["runs"] == 3  # 3 s, window 2 s, hop 0.5 s: 0-2, 0.5-2.5, 1-3
    assert report["peak_rss_mb"] > 0
    table = CliRunner().invoke(bench_main, [str(root), "--runs", "2", "--stream-seconds", "2"])
    assert table.exit_code == 0 and "offline 4 s clip" in table.stdout
