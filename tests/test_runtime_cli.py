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
