"""``python -m clapedge.bench`` (make bench): option filtering, skipping, the run section."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clapedge.bench import __main__ as runner
from clapedge.bench import report


def test_unknown_options_are_dropped_with_their_values():
    kept, dropped = runner.keep_supported(
        ("--n", "100", "--quick", "--gone", "5", "--wait-idle", "120"),
        {"--n", "--quick", "--wait-idle"})
    assert kept == ["--n", "100", "--quick", "--wait-idle", "120"]
    assert dropped == ["--gone", "5"]


def test_missing_benchmark_is_skipped_not_failed(monkeypatch):
    monkeypatch.setattr(runner, "module_exists", lambda name: False)
    out = runner.run_one(runner.Bench("nothing", "a bench that does not exist"), quick=True)
    assert out.status == "skipped" and "does not exist" in out.notes[0]
    text = runner.run_section([out], ["--quick"], runner.datetime.now(runner.timezone.utc), 0.0)
    assert "| nothing |" in text and "skipped" in text


def test_quick_run_needs_a_no_write_option(monkeypatch):
    monkeypatch.setattr(runner, "module_exists", lambda name: True)
    monkeypatch.setattr(runner, "supported_flags", lambda name: {"--n"})
    out = runner.run_one(runner.Bench("x", "writes docs", quick=("--n", "3")), quick=True)
    assert out.status == "skipped" and "--no-write" in out.notes[-1]


def test_run_section_goes_under_the_title_and_is_replaced(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n<!-- bench:topk:begin -->\ntopk\n<!-- bench:topk:end -->\n")
    monkeypatch.setattr(report, "BENCHMARKS", page)
    runner.write_run_section("## This run\n\nfirst\n")
    runner.write_run_section("## This run\n\nsecond\n")
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- bench:run:begin -->\n## This run\n\nsecond\n")
    assert "first" not in text and text.count("bench:run:begin") == 1
    assert text.index("bench:run:end") < text.index("bench:topk:begin")
    assert "topk\n" in text


def test_cli_lists_benchmarks_and_refuses_unknown_names():
    listed = subprocess.run([sys.executable, "-m", "clapedge.bench", "--list"], text=True,
                            capture_output=True)
    assert listed.returncode == 0
    for name in ("accuracy", "bundle", "export", "topk", "search"):
        assert name in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "clapedge.bench", "--only", "nope"], text=True,
                         capture_output=True)
    assert bad.returncode == 2 and "unknown benchmark nope" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["accuracy", "bundle"])
def test_new_benchmarks_have_help(name):
    done = subprocess.run([sys.executable, "-m", f"clapedge.bench.{name}", "--help"], text=True,
                          capture_output=True)
    assert done.returncode == 0 and "--no-write" in done.stdout
