"""Bundle loading: checksums, path containment, external data, providers, lazy sessions."""

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle, tone  # noqa: E402

from clapedge.errors import BundleError, ConfigError  # noqa: E402
from clapedge.runtime import Bundle, Runtime  # noqa: E402
from clapedge.runtime import providers as prov  # noqa: E402
from clapedge.runtime.manifest import sha256_file  # noqa: E402
from clapedge.runtime.onnx_external import OnnxParseError, external_data_locations  # noqa: E402

TRT, CUDA, CPU = prov.TENSORRT, prov.CUDA, prov.CPU


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("pristine") / "b", tagger_k=3)
    return root


@pytest.fixture
def bundle_dir(pristine, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "b"))


def edit_manifest(root: Path, fn) -> None:
    data = json.loads((root / "manifest.json").read_text())
    fn(data)
    (root / "manifest.json").write_text(json.dumps(data))


def rehash(root: Path, rel: str, *keys) -> None:
    """Record the new sha256 of ``rel`` at manifest path ``keys``."""
    def fn(data):
        node = data
        for key in keys:
            node = node[key]
        node["sha256"] = sha256_file(root / rel)
    edit_manifest(root, fn)


# ---------------------------------------------------------------- load and checksums

def test_load_is_lazy_and_timed(bundle_dir):
    b = Bundle.load(bundle_dir, providers="cpu")
    assert set(b.load_times) == {"manifest", "audio", "load"}
    assert b.tower("audio").providers == [CPU]
    assert "text" not in b.load_times
    Runtime(b).embed_text(["a calm voice"])
    assert "text" in b.load_times and "tagger" not in b.load_times
    assert "tiny-test" in repr(b)


def test_load_accepts_the_manifest_path(bundle_dir):
    assert Bundle.load(bundle_dir / "manifest.json").root == bundle_dir


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.load(tmp_path / "nothing")
    with pytest.raises(BundleError, match="no manifest here"):
        Bundle.load(tmp_path)


def test_tampered_tower_is_refused(bundle_dir):
    data = bytearray((bundle_dir / "audio.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_dir / "audio.onnx").write_bytes(bytes(data))
    expected = json.loads((bundle_dir / "manifest.json").read_text())["towers"]["audio"]["sha256"]
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle_dir)
    msg = str(e.value)
    assert str(bundle_dir / "audio.onnx") in msg and "checksum mismatch" in msg
    assert expected in msg and sha256_file(bundle_dir / "audio.onnx") in msg


@pytest.mark.parametrize("rel, use", [
    ("banks/emotion.npy", lambda rt: rt.tag_all(tone(1.0), sample_rate=16000)),
    ("tokenizer.json", lambda rt: rt.embed_text(["calm"])),
    ("text.onnx", lambda rt: rt.embed_text(["calm"])),
])
def test_tampered_files_are_refused_when_opened(bundle_dir, rel, use):
    with open(bundle_dir / rel, "ab") as f:
        f.write(b"\0")
    rt = Runtime(bundle_dir)  # the audio tower is intact
    with pytest.raises(BundleError, match="checksum mismatch"):
        use(rt)


def test_missing_file(bundle_dir):
    (bundle_dir / "text.onnx").unlink()
    rt = Runtime(bundle_dir)
    with pytest.raises(BundleError, match="text tower named in the manifest is missing"):
        rt.embed_text(["calm"])


def test_symlinked_tower_outside_the_bundle(bundle_dir, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle_dir / "audio.onnx", outside)
    (bundle_dir / "audio.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle_dir)


def test_symlink_inside_the_bundle_is_fine(bundle_dir):
    (bundle_dir / "models").mkdir()
    shutil.move(bundle_dir / "audio.onnx", bundle_dir / "models" / "audio.onnx")
    (bundle_dir / "audio.onnx").symlink_to("models/audio.onnx")
    Bundle.load(bundle_dir)


def test_bank_rows_must_be_normalised(bundle_dir):
    bank = np.load(bundle_dir / "banks" / "emotion.npy") * 2
    np.save(bundle_dir / "banks" / "emotion.npy", bank)
    edit_manifest(bundle_dir, lambda d: d["banks"]["emotion"].update(
        sha256=sha256_file(bundle_dir / "banks" / "emotion.npy")))
    with pytest.raises(BundleError, match="L2-normalised"):
        Runtime(bundle_dir).tag_all(tone(1.0), ["emotion"], sample_rate=16000)


def test_pickled_bank_is_never_unpickled(bundle_dir):
    np.save(bundle_dir / "banks" / "emotion.npy", np.array([{"x": 1}], dtype=object),
            allow_pickle=True)
    rehash(bundle_dir, "banks/emotion.npy", "banks", "emotion")
    with pytest.raises(BundleError, match="not a readable .npy"):
        Runtime(bundle_dir).bundle.bank("emotion")


def test_manifest_and_model_io_must_agree(tmp_path):
    root, _ = build_bundle(tmp_path / "b", mask=False, text=False)

    def add_mask(d):
        d["towers"]["audio"]["inputs"].append(
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "samples"]})
    edit_manifest(root, add_mask)
    with pytest.raises(BundleError, match="names input 'attention_mask' but the model has"):
        Bundle.load(root)


def test_not_an_onnx_model(bundle_dir):
    (bundle_dir / "audio.onnx").write_bytes(b"\xff\xff\xff\xff garbage")
    rehash(bundle_dir, "audio.onnx", "towers", "audio")
    with pytest.raises(BundleError, match="audio.onnx"):
        Bundle.load(bundle_dir)


# ---------------------------------------------------------------- external data

@pytest.fixture
def external_bundle(tmp_path):
    root, _ = build_bundle(tmp_path / "b", external="audio.onnx.data", text=False)
    return root


def retarget(root: Path, location: str) -> None:
    """Point every external tensor of audio.onnx at ``location`` (checksum kept valid)."""
    model = onnx.load(root / "audio.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, root / "audio.onnx")
    rehash(root, "audio.onnx", "towers", "audio")


def test_external_data_inside_the_bundle_loads(external_bundle):
    rt = Runtime(external_bundle)
    assert rt.embed_audio(tone(1.0), 16000).shape == (1, 8)


def test_external_data_is_checksummed(external_bundle):
    with open(external_bundle / "audio.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    with pytest.raises(BundleError, match="audio.onnx.data: checksum mismatch"):
        Bundle.load(external_bundle)


def test_external_data_absolute_path_refused(external_bundle):
    retarget(external_bundle, str(external_bundle / "audio.onnx.data"))
    with pytest.raises(BundleError, match="is absolute"):
        Bundle.load(external_bundle)


def test_external_data_dotdot_refused(external_bundle):
    shutil.copy(external_bundle / "audio.onnx.data", external_bundle.parent / "stolen.data")
    retarget(external_bundle, "../stolen.data")
    with pytest.raises(BundleError, match="uses '..'"):
        Bundle.load(external_bundle)


def test_external_data_symlink_outside_refused(external_bundle, tmp_path):
    outside = tmp_path / "outside.data"
    shutil.move(external_bundle / "audio.onnx.data", outside)
    (external_bundle / "audio.onnx.data").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(external_bundle)


def test_external_data_must_be_listed(external_bundle):
    shutil.copy(external_bundle / "audio.onnx.data", external_bundle / "other.data")
    retarget(external_bundle, "other.data")
    with pytest.raises(BundleError, match="not listed in the manifest"):
        Bundle.load(external_bundle)


def test_parser_finds_every_external_tensor_kind():
    def ext(name, location):
        t = numpy_helper.from_array(np.zeros(4, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        t.external_data.add(key="offset", value="0")
        return t

    const = helper.make_node("Constant", [], ["c"], value=ext("cv", "const.bin"))
    sub = helper.make_graph([helper.make_node("Constant", [], ["s"],
                                              value=ext("sv", "../sub.bin"))],
                            "then", [], [helper.make_tensor_value_info("s", 1, [4])])
    iff = helper.make_node("If", ["cond"], ["y"], then_branch=sub, else_branch=sub)
    graph = helper.make_graph(
        [const, iff], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", 1, [4])],
        initializer=[ext("w", "/abs/w.bin"), numpy_helper.from_array(np.ones(3), "inline")])
    fn_node = helper.make_node("Constant", [], ["f"], value=ext("fv", "fn.bin"))
    fn = helper.make_function("local", "F", [], ["f"], [fn_node], [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[fn])
    found = external_data_locations(model.SerializeToString())
    assert sorted(found) == sorted(["/abs/w.bin", "const.bin", "../sub.bin", "../sub.bin",
                                    "fn.bin"])
    assert external_data_locations(helper.make_model(helper.make_graph(
        [], "e", [], [])).SerializeToString()) == []
    with pytest.raises(OnnxParseError):
        external_data_locations(b"\x3a\xff\xff")


# ---------------------------------------------------------------- providers

def test_auto_order_prefers_tensorrt_then_cuda_then_cpu():
    choice = prov.choose_providers("auto", available=[CPU, CUDA, TRT, "AzureExecutionProvider"])
    assert choice.providers == (TRT, CUDA, CPU) and choice.skipped == ()
    choice = prov.choose_providers("auto", available=[CPU, CUDA])
    assert choice.providers == (CUDA, CPU)
    assert choice.skipped[0][0] == TRT and "install clapedge[gpu]" in choice.skipped[0][1]
    choice = prov.choose_providers("auto", available=[CPU])
    assert choice.providers == (CPU,)
    assert [name for name, _ in choice.skipped] == [TRT, CUDA]
    assert "CPUExecutionProvider; TensorrtExecutionProvider skipped" in choice.describe()


def test_explicit_providers_and_aliases():
    assert prov.choose_providers("cpu", available=[CPU]).providers == (CPU,)
    assert prov.choose_providers(["trt", "CUDA", CPU], available=[TRT, CUDA, CPU]).providers \
        == (TRT, CUDA, CPU)
    with pytest.raises(ConfigError, match="'cuda' is not available.*install clapedge\\[gpu\\]"):
        prov.choose_providers(["cuda", "cpu"], available=[CPU])
    with pytest.raises(ConfigError, match="empty"):
        prov.choose_providers([], available=[CPU])


def test_load_logs_the_choice_and_the_skipped(bundle_dir, caplog, monkeypatch):
    monkeypatch.setattr(prov, "available_providers", lambda: [CPU])
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        Bundle.load(bundle_dir)
    text = caplog.text
    assert "TensorrtExecutionProvider skipped: not available: install clapedge[gpu]" in text
    assert "CUDAExecutionProvider skipped: not available: install clapedge[gpu]" in text
    assert "audio tower (audio.onnx, fp32): CPUExecutionProvider" in text


def test_session_options_are_tuned_for_latency():
    so = prov.session_options(3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.execution_mode.name == "ORT_SEQUENTIAL"
    assert so.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert prov.session_options().intra_op_num_threads == prov.physical_cores() >= 1
    with pytest.raises(ConfigError, match="threads"):
        prov.session_options(0)
    opts = prov.provider_options(TRT, precision="int8", cache_dir=Path("/c"))
    assert opts["trt_int8_enable"] == "True" and opts["trt_engine_cache_path"] == "/c/tensorrt"
    assert prov.provider_options(CPU, precision="int8", cache_dir=None) == {}


def test_optimised_model_cache(bundle_dir, tmp_path):
    cache = tmp_path / "cache"
    x = tone(1.3)
    first = Runtime(bundle_dir, cache_dir=cache, threads=1).embed_audio(x, 16000)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[1] == "verified-files.json"
    assert files[0].startswith("audio-") and files[0].endswith(".onnx")
    second = Runtime(bundle_dir, cache_dir=cache, threads=1).embed_audio(x, 16000)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)


def test_model_metadata_must_agree_with_the_manifest(bundle_dir):
    model = onnx.load(bundle_dir / "audio.onnx")
    onnx.helper.set_model_props(model, {"role": "audio", "sample_rate": "16000",
                                        "embed_dim": "8"})
    onnx.save_model(model, bundle_dir / "audio.onnx")
    rehash(bundle_dir, "audio.onnx", "towers", "audio")
    Bundle.load(bundle_dir)
    onnx.helper.set_model_props(model, {"sample_rate": "22050"})
    onnx.save_model(model, bundle_dir / "audio.onnx")
    rehash(bundle_dir, "audio.onnx", "towers", "audio")
    with pytest.raises(BundleError, match="metadata says sample_rate=22050 but the manifest"):
        Bundle.load(bundle_dir)


def test_verified_files_are_not_hashed_again_until_they_change(bundle_dir, tmp_path,
                                                               monkeypatch):
    import hashlib as real_hashlib

    from clapedge.runtime import bundle as bundle_module
    cache = tmp_path / "cache"
    Bundle.load(bundle_dir, cache_dir=cache)
    assert (cache / "verified-files.json").is_file()

    calls = []

    class CountingHashlib:
        @staticmethod
        def sha256(data=b""):
            calls.append(len(data))
            return real_hashlib.sha256(data)

    monkeypatch.setattr(bundle_module, "hashlib", CountingHashlib)
    Bundle.load(bundle_dir, cache_dir=cache)
    assert calls == []  # untouched: the record stands
    Bundle.load(bundle_dir)
    assert len(calls) == 1  # without a cache directory, always hashed
    # a changed byte with the old mtime put back is still caught (size/ctime/mtime identity)
    path = bundle_dir / "audio.onnx"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="checksum mismatch"):
        Bundle.load(bundle_dir, cache_dir=cache)


def test_text_tower_runs_on_one_thread_unless_told(tmp_path):
    root, _ = build_bundle(tmp_path / "b")
    b = Bundle.load(root)
    assert b.threads_for("text") == 1 and b.threads_for("audio") is None
    b2 = Bundle.load(root, threads=2)
    assert b2.threads_for("text") == 2 and b2.threads_for("audio") == 2
    assert b.tower("text").session.get_session_options().intra_op_num_threads == 1
