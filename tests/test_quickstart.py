"""docs/quickstart.md cannot drift: every ``sh`` and ``python`` block on it runs here.

The page's placeholders (its table of names in capitals) are replaced by tiny stand-ins:
the INT8 bundle, corpus, index input and stream file of the demo run on the tiny corpus (the
``tiny_demo`` fixture), and for the researcher's path tiny ParaSpeechCLAP / ParaCLAP
checkpoints in the released layout (``--tiny`` is added to ``clap-convert``, the only change
to a command). ``pip install`` lines are skipped. Blocks run in a fresh directory per section,
in page order (a section's later blocks see what its earlier ones wrote): ``sh`` blocks with
``bash -euo pipefail``, ``python`` blocks in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```$", re.M | re.S)


def sections() -> dict[str, list[tuple[str, str]]]:
    """{section title: [(language, code), ...]} in page order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^## ", PAGE.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = [(m.group(1), m.group(2)) for m in BLOCK.finditer(body)]
    return out


def placeholders() -> list[str]:
    table = PAGE.read_text().split("| placeholder |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, re.M)


def substitute(code: str, stand_ins: dict[str, Path], lang: str) -> str:
    for name in sorted(stand_ins, key=len, reverse=True):
        value = str(stand_ins[name])
        code = re.sub(rf"(?<![\w.]){re.escape(name)}(?![\w])",
                      (shlex.quote(value) if lang == "sh" else value).replace("\\", r"\\"), code)
    return code


def run_section(title: str, stand_ins: dict[str, Path], work: Path) -> list[str]:
    """Runs the section's blocks in order in ``work``; returns each block's output."""
    blocks = sections()[title]
    assert blocks, f"{PAGE}: section {title!r} has no code blocks"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               NO_COLOR="1", COLUMNS="200")
    outputs = []
    for lang, code in blocks:
        code = substitute(code, stand_ins, lang)
        if lang == "sh":
            lines = [line for line in code.splitlines() if not line.startswith("pip install")]
            lines = [re.sub(r"(--preset (paraspeechclap|paraclap))\b", r"\1 --tiny", line)
                     if line.startswith("clap-convert ") else line for line in lines]
            if not any(line.strip() and not line.startswith("#") for line in lines):
                continue
            cmd = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
        else:
            cmd = [sys.executable, "-c", code]
        done = subprocess.run(cmd, cwd=work, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=600)
        assert done.returncode == 0, f"{title}: this {lang} block failed:\n{code}\n---\n" \
                                     f"{done.stdout[-4000:]}"
        outputs.append(done.stdout)
    return outputs


@pytest.fixture(scope="module")
def stand_ins(tiny_demo, tmp_path_factory) -> dict[str, Path]:
    out, log, status = tiny_demo
    assert status == 0, f"demo.sh failed (exit {status}):\n{log[-4000:]}"
    from clapedge.train.corpus import load_manifest

    test = load_manifest(out / "corpus", split="test")
    candidates = tmp_path_factory.mktemp("tts")
    for i, row in enumerate(test[:4]):
        shutil.copy(row["path"], candidates / f"candidate_{i}.wav")
    return {
        "BUNDLE": out / "default-int8",
        "CLIP.wav": Path(test[0]["path"]),
        "LONG.wav": out / "arousal-ramp.wav",
        "CANDIDATES_DIR": candidates,
        "COLLECTION_DIR": out / "corpus" / "wavs",
        "CLIPS_DIR": out / "corpus" / "wavs",
        "LABELLED_CORPUS": out / "corpus",
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny ParaSpeechCLAP and ParaCLAP checkpoints (state dicts saved by torch) and a
    tokenizer, standing in for the released files."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_tiny_tokenizer

    from clapedge.models import ClapModel, build_preset

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {"PSC_TOKENIZER": write_tiny_tokenizer(root / "tok").parent}
    paths["BERT_TOKENIZER"] = paths["PSC_TOKENIZER"]
    for preset, name in (("paraspeechclap", "PSC_CHECKPOINT.pth.tar"),
                         ("paraclap", "PARACLAP_CHECKPOINT.pth.tar")):
        torch.manual_seed(0)
        model = ClapModel.from_config(build_preset(preset, tiny=True)).eval()
        torch.save(dict(model.state_dict()), root / f"{preset}.pth.tar")
        paths[name] = root / f"{preset}.pth.tar"
    return paths


def test_placeholders_are_documented_and_all_have_stand_ins(stand_ins, checkpoints):
    names = placeholders()
    assert sorted(names) == sorted({**stand_ins, **checkpoints}), \
        "the placeholder table of docs/quickstart.md and this test's stand-ins differ"
    code = "\n".join(c for blocks in sections().values() for _, c in blocks)
    for name in names:
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", code), f"{name} is unused"
    # A capitalised word in a code block that is not a placeholder would go unsubstituted.
    for word in set(re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", code)):
        assert any(name.startswith(word) for name in names) or word in {"INT8", "DIR", "NAME"}, \
            f"{word} looks like a placeholder but is not in the table"


def test_every_section_has_code():
    titles = list(sections())
    assert titles[:4] == ["Export a checkpoint", "Tag and stream from Python",
                          "Rerank TTS candidates", "Search a collection"]
    readme = (ROOT / "README.md").read_text()
    assert "docs/quickstart.md" in readme


@pytest.mark.slow
def test_researcher_converts_and_exports(stand_ins, checkpoints, tmp_path):
    from clapedge.runtime import read_manifest

    outputs = run_section("Export a checkpoint", {**stand_ins, **checkpoints}, tmp_path)
    for model in ("models/pscl", "models/paraclap"):
        assert (tmp_path / model / "config.json").is_file()
        assert (tmp_path / model / "model.safetensors").is_file()
    manifest = read_manifest(tmp_path / "build" / "pscl-int8")
    assert manifest.towers.audio.precision == "int8"
    assert len(manifest.banks) == 6  # ParaSpeechCLAP's six label sets
    assert (tmp_path / "build" / "pscl-int8" / "export_report.json").is_file()
    assert re.search(r"\| sex \| \d\.\d{3} \|", outputs[-1]) or "UAR" in outputs[-1] \
        or "uar" in outputs[-1], outputs[-1][-2000:]


def test_app_developer_tags_and_streams(stand_ins, tmp_path):
    tag, stream, shell = run_section("Tag and stream from Python", stand_ins, tmp_path)
    assert "'arousal'" in tag and "('low', 'mid', 'high')" in tag
    assert re.search(r"^(low|mid|high): -?\d\.\d{3}$", tag, re.M)
    assert re.search(r"\{'arousal': '(low|mid|high)', 'sex': '(male|female)'\}", tag)
    events = re.findall(r"^\s*(\d+\.\d\d)-\s*(\d+\.\d\d) s  (low|mid|high)$", stream, re.M)
    starts = [float(s) for s, _, _ in events]
    assert len(events) >= 10 and starts == sorted(starts)
    assert all(abs(float(e) - float(s) - 2.0) < 0.011 for s, e, _ in events)
    assert "arousal" in shell and shell.count('"start_s"') >= 5


def test_tts_team_reranks_candidates(stand_ins, tmp_path):
    (out,) = run_section("Rerank TTS candidates", stand_ins, tmp_path)
    ranked = re.findall(r"^([+-]\d\.\d{3})  (candidate_\d\.wav)$", out, re.M)
    assert sorted(name for _, name in ranked) == [f"candidate_{i}.wav" for i in range(4)]
    scores = [float(s) for s, _ in ranked]
    assert scores == sorted(scores, reverse=True)
    assert re.search(r"^-?\d\.\d+(e-?\d+)?$", out.strip().splitlines()[-1])


def test_search_a_collection(stand_ins, tmp_path):
    shell, python = run_section("Search a collection", stand_ins, tmp_path)
    assert (tmp_path / "clips.index" / "catalog.sqlite").is_file()
    assert shell.count("clip_") >= 10 and '"results"' in shell
    assert "'files_added': 60" in python
    hits = re.findall(r"^(-?\d\.\d{3})  (\S+clip_\d+\.wav)", python, re.M)
    assert len(hits) == 5
    assert re.search(r"^\['clip_\d+\.wav'", python, re.M)
