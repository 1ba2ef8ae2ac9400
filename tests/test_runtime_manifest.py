"""The bundle manifest: round trip, validation, versioning, atomic sorted writing."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle  # noqa: E402

from clapedge.errors import BundleError, ConfigError  # noqa: E402
from clapedge.runtime.manifest import (  # noqa: E402
    FORMAT_VERSION, ClipPolicy, LabelBank, Manifest, TensorSpec, TowerSpec, read_manifest,
    sha256_file, write_manifest)

SHA = "0" * 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("m") / "b", tagger_k=3)
    return root


def _data(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_round_trip_is_exact(bundle):
    m = read_manifest(bundle)
    text = (bundle / "manifest.json").read_text()
    assert m.to_json() == text
    assert Manifest.from_json(text) == m
    assert m.format_version == FORMAT_VERSION
    assert m.towers.audio.heads == {"sex": ("female", "male")}
    assert m.towers.tagger.bank == "emotion" and m.towers.tagger.k == 3
    assert m.banks["style"].thresholds["slow"] == 0.3
    assert m.banks["arousal"].values == {"low": 0.0, "medium": 0.5, "high": 1.0}


def test_written_sorted_indented_with_newline(bundle):
    text = (bundle / "manifest.json").read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2,
                              ensure_ascii=False) + "\n"


def test_files_lists_everything_with_checksums(bundle):
    m = read_manifest(bundle)
    files = dict(m.files())
    assert set(files) == {"audio.onnx", "text.onnx", "tagger.onnx", "tokenizer.json",
                          "banks/emotion.npy", "banks/style.npy", "banks/arousal.npy"}
    for rel, sha in files.items():
        assert sha256_file(bundle / rel) == sha


def test_write_is_atomic_and_accepts_file_or_dir(bundle, tmp_path):
    m = read_manifest(bundle)
    out = write_manifest(tmp_path, m)
    assert out == tmp_path / "manifest.json"
    write_manifest(tmp_path / "manifest.json", m)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.1"])
def test_unknown_major_version_names_file_and_version(bundle, tmp_path, version):
    data = _data(bundle)
    data["format_version"] = version
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value)
    assert version in str(e.value)


def test_newer_minor_version_ignores_unknown_keys(bundle):
    data = _data(bundle)
    data["format_version"] = "1.7"
    data["future_field"] = {"x": 1}
    data["towers"]["audio"]["future"] = True
    m = Manifest.from_dict(data)
    assert m.format_version == "1.7"


def test_same_minor_version_refuses_unknown_keys(bundle):
    data = _data(bundle)
    data["towers"]["audio"]["precison"] = "int8"  # a typo must not pass silently
    with pytest.raises(BundleError, match=r"towers\.audio: unknown keys \['precison'\]"):
        Manifest.from_dict(data, source="x/manifest.json")


@pytest.mark.parametrize("path, value, message", [
    (("towers", "audio", "precision"), "int4", "precision"),
    (("towers", "audio", "sha256"), "abc", "sha256"),
    (("towers", "audio", "file"), "/etc/passwd", "absolute"),
    (("towers", "audio", "file"), "../audio.onnx", "'..'"),
    (("sample_rate",), 0, "sample_rate"),
    (("sample_rate",), "16000", "expected an integer"),
    (("logit_scale",), -1.0, "logit_scale"),
    (("clip", "hop_seconds"), 5.0, "hop_seconds"),
    (("clip", "window_seconds"), 10.0, "window_seconds"),
    (("banks", "style", "thresholds"), None, "multi_label bank needs a threshold"),
    (("banks", "arousal", "values"), {"low": 0.0}, "exactly one entry per label"),
    (("banks", "emotion", "kind"), "nominal", "kind"),
    (("default_bank",), "pitch", "default_bank"),
    (("towers", "tagger", "k"), 9, "at most the bank's 5 labels"),
    (("towers", "tagger", "bank"), "pitch", "not one of the banks"),
    (("embed_dim",), 16, "embed_dim is 16"),
])
def test_invalid_fields_name_the_path(bundle, path, value, message):
    data = _data(bundle)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(data, source="B/manifest.json")
    assert str(e.value).startswith("B/manifest.json: ")
    assert message in str(e.value)


def test_missing_required_field(bundle):
    data = _data(bundle)
    del data["towers"]["audio"]["inputs"]
    with pytest.raises(BundleError, match=r"towers\.audio\.inputs: is required"):
        Manifest.from_dict(data)


def test_io_convention_is_checked(bundle):
    data = _data(bundle)
    data["towers"]["audio"]["inputs"][0]["name"] = "input_values"
    with pytest.raises(BundleError, match="needs an input named 'waveform'"):
        Manifest.from_dict(data)
    data = _data(bundle)
    data["towers"]["audio"]["outputs"] = [o for o in data["towers"]["audio"]["outputs"]
                                          if o["name"] != "head_sex"]
    with pytest.raises(BundleError, match="head 'sex' needs an output 'head_sex'"):
        Manifest.from_dict(data)


def test_text_tower_needs_a_tokenizer(bundle):
    data = _data(bundle)
    del data["tokenizer"]
    with pytest.raises(BundleError, match="needs a tokenizer"):
        Manifest.from_dict(data)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="no manifest here"):
        read_manifest(tmp_path / "elsewhere")


def test_construction_validates_with_config_errors():
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        TensorSpec("x", "float64", ("batch",))
    with pytest.raises(ConfigError, match="shape entry"):
        TensorSpec("x", "float32", ("batch", -3))
    with pytest.raises(ConfigError, match="hop_seconds"):
        ClipPolicy(min_seconds=1, max_seconds=10, window_seconds=5, hop_seconds=6)
    with pytest.raises(ConfigError, match="duplicate labels"):
        LabelBank(labels=["a", "a"], file="banks/x.npy", sha256=SHA)
    with pytest.raises(ConfigError, match="ordinal bank needs"):
        LabelBank(labels=["a", "b"], file="banks/x.npy", sha256=SHA, kind="ordinal")
    with pytest.raises(ConfigError, match="duplicate names"):
        TowerSpec("a.onnx", SHA, "fp32", [TensorSpec("x", "float32", (1,))] * 2, [])
