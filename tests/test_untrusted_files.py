"""Untrusted model files: no pickle in the code base, ONNX external data that leaves the
bundle or its file, tampered manifests, and malformed or oversized ONNX towers that must fail
fast, in bounded time and memory (measured in a subprocess).

Complements tests/test_runtime_bundle.py (absolute, ``..`` and symlinked external data,
tampered files, unlisted external data), which this file does not repeat.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle, tone  # noqa: E402

from clapedge.errors import BundleError  # noqa: E402
from clapedge.subproc import fresh  # noqa: E402
from clapedge.runtime import Bundle, Runtime  # noqa: E402
from clapedge.runtime.manifest import (FORMAT_VERSION, MAX_MANIFEST_BYTES, read_manifest,  # noqa: E402
                                       sha256_file,
                                       write_manifest)
from clapedge.runtime.onnx_external import MAX_GRAPH_DEPTH, OnnxParseError, scan_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("runtime", "export", "models", "calib", "train", "bench", "kernels", "clapedge")


# ------------------------------------------------------------------ no pickle anywhere

# Modules whose loaders run code from the data (pickle and its relatives).
_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
             "marshal", "jsonpickle"}
# What the ``pickle`` module may be used for: naming its exceptions (to catch them).
_PICKLE_EXCEPTIONS = {"UnpicklingError", "PicklingError", "PickleError"}
# torch loaders that unpickle or run code; torch.load is allowed only with weights_only=True.
_TORCH_CODE_LOADERS = {"jit.load", "hub.load", "package.PackageImporter", "load",
                       "serialization.load"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, problem) for each way ``source`` could unpickle or run code from a file."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module it stands for
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                root = a.name.split(".")[0]
                aliases[a.asname or root] = a.name if a.asname else root
                if root in _PICKLERS and root != "pickle":
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                if root in _PICKLERS and not (root == "pickle"
                                              and a.name in _PICKLE_EXCEPTIONS):
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
                if root == "torch" and full.removeprefix("torch.") in _TORCH_CODE_LOADERS:
                    found.append((node.lineno, f"from {node.module} import {a.name} (a "
                                               f"torch.load wrapper)"))

    def resolve(name: str | None) -> str | None:
        if name is None:
            return None
        head, _, rest = name.partition(".")
        base = aliases.get(head, head)
        return f"{base}.{rest}" if rest else base

    parents = {id(child): node for node in ast.walk(tree)
               for child in ast.iter_child_nodes(node)}
    checked_calls: set[int] = set()  # torch.load nodes judged at their call
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = resolve(_dotted(node.func)) or "<call>"
        if target in ("torch.load", "torch.serialization.load"):
            checked_calls.add(id(node.func))
            if not _is_const(_kw(node, "weights_only"), True):
                found.append((node.lineno, f"{target}( without weights_only=True"))
        flag = _kw(node, "allow_pickle")
        if flag is not None and not _is_const(flag, False):
            found.append((node.lineno, f"{target}(allow_pickle={ast.unparse(flag)})"))
        if _kw(node, "pickle_module") is not None:
            found.append((node.lineno, f"{target}(pickle_module=...)"))
        remote = _kw(node, "trust_remote_code")
        if remote is not None and not _is_const(remote, False):
            found.append((node.lineno, f"{target}(trust_remote_code=...) runs downloaded code"))
        if _is_const(_kw(node, "use_safetensors"), False):
            found.append((node.lineno, f"{target}(use_safetensors=False) loads pickles"))
        if target in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            loader = _kw(node, "Loader")
            if target != "yaml.load" or loader is None or "Safe" not in ast.unparse(loader):
                found.append((node.lineno, f"{target}( without a SafeLoader"))
        if target.endswith("read_pickle"):
            found.append((node.lineno, target))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Attribute, ast.Name)) or id(node) in checked_calls \
                or not isinstance(node.ctx, ast.Load):
            continue
        target = resolve(_dotted(node))
        if target is None:
            continue
        if target.startswith("torch.") and \
                target.removeprefix("torch.") in _TORCH_CODE_LOADERS:
            found.append((node.lineno, f"{target} used as a value (a torch.load wrapper "
                                       f"could call it without weights_only=True)"))
        head, _, attr = target.partition(".")
        if head != "pickle":
            continue
        if isinstance(node, ast.Attribute) and attr.split(".")[0] not in _PICKLE_EXCEPTIONS:
            found.append((node.lineno, target))
        if isinstance(node, ast.Name) and not isinstance(parents.get(id(node)), ast.Attribute):
            found.append((node.lineno, "the pickle module passed as a value"))
    return sorted(set(found))


@pytest.mark.parametrize("snippet, problem", [
    ("import torch\ntorch.load('m.pt')", "without weights_only=True"),
    ("import torch\ntorch.load('m.pt', weights_only=False)", "without weights_only=True"),
    ("import torch as T\nT.load('m.pt', map_location='cpu')", "without weights_only=True"),
    ("from torch import load\nload('m.pt')", "torch.load wrapper"),
    ("import torch, functools\nf = functools.partial(torch.load, map_location='cpu')",
     "used as a value"),
    ("import torch\nloader = torch.load", "used as a value"),
    ("import torch\nm = torch.jit.load('m.pt')", "torch.jit.load"),
    ("import pickle\npickle.load(open('x', 'rb'))", "pickle.load"),
    ("import pickle as p\np.loads(b'')", "pickle.loads"),
    ("from pickle import load", "from pickle import load"),
    ("import cPickle", "import cPickle"),
    ("import dill", "import dill"),
    ("import joblib\njoblib.load('x')", "import joblib"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle=True"),
    ("import numpy\nnumpy.load('x.npy', allow_pickle=flag)", "allow_pickle=flag"),
    ("import yaml\nyaml.load(open('x'))", "SafeLoader"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x', "
     "trust_remote_code=True)", "trust_remote_code"),
    ("import torch\ntorch.save(x, 'p', pickle_module=pickle)", "pickle_module"),
])
def test_the_scanner_catches_each_unsafe_load(snippet, problem):
    found = unsafe_loads(snippet)
    assert any(problem in what for _, what in found), found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "import numpy as np\nnp.load(f, allow_pickle=False)\nnp.load(f)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)",
])
def test_the_scanner_allows_safe_loads(snippet):
    assert unsafe_loads(snippet) == []


def test_no_pickle_anywhere_in_the_code_base():
    files = sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))
    assert len(files) > 50  # the scan really covers the code base
    problems = []
    for path in files:
        for line, what in unsafe_loads(path.read_text(encoding="utf-8"), str(path)):
            problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "code that can unpickle or run code from a file:\n" + \
        "\n".join(problems)


# ------------------------------------------------------------------ bundles to damage

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("untrusted") / "b", tagger_k=3)
    write_manifest(root, read_manifest(root).with_sizes(root))
    return root


@pytest.fixture
def bundle_dir(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "b", symlinks=True))


def edit_manifest(root: Path, fn) -> None:
    data = json.loads((root / "manifest.json").read_text())
    fn(data)
    (root / "manifest.json").write_text(json.dumps(data))


def reseal(root: Path, role: str = "audio") -> None:
    """Record the tower's current sha256 and size, as a forger who rewrote it would."""
    file = root / f"{role}.onnx"
    edit_manifest(root, lambda d: d["towers"][role].update(sha256=sha256_file(file),
                                                          size=file.stat().st_size))


# ------------------------------------------------------------------ external data

@pytest.fixture
def external_bundle(tmp_path):
    root, _ = build_bundle(tmp_path / "ext", external="audio.onnx.data", text=False)
    write_manifest(root, read_manifest(root).with_sizes(root))
    return root


def set_external(root: Path, **entries: str) -> None:
    """Set external_data entries (location / offset / length) of the first external
    initializer of audio.onnx; the tower is resealed."""
    model = onnx.load(root / "audio.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for key, value in entries.items():
        entry = next((e for e in tensor.external_data if e.key == key), None)
        if entry is None:
            entry = tensor.external_data.add(key=key)
        entry.value = value
    onnx.save_model(model, root / "audio.onnx")
    reseal(root)


def first_external(root: Path) -> dict[str, str]:
    model = onnx.load(root / "audio.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    return {e.key: e.value for e in tensor.external_data} | {"name": tensor.name}


def test_external_data_with_sizes_still_loads(external_bundle):
    assert read_manifest(external_bundle).towers.audio.external_data[0].size > 0
    assert Runtime(external_bundle).embed_audio(tone(1.0), 16000).shape == (1, 8)


def test_external_offset_past_the_end_refused(external_bundle):
    size = (external_bundle / "audio.onnx.data").stat().st_size
    name = first_external(external_bundle)["name"]
    set_external(external_bundle, offset=str(size + 4096))
    with pytest.raises(BundleError) as e:
        Bundle.load(external_bundle)
    msg = str(e.value)
    assert "audio.onnx.data" in msg and "runs past the end" in msg and name in msg
    assert f"offset {size + 4096}" in msg and f"({size} bytes)" in msg


def test_external_length_past_the_end_refused(external_bundle):
    info = first_external(external_bundle)
    set_external(external_bundle, length=str(int(info["length"]) + 10 ** 12))
    with pytest.raises(BundleError, match=r"audio\.onnx\.data: .* runs past the end"):
        Bundle.load(external_bundle)


@pytest.mark.parametrize("value", ["-4", "0x10", "12abc", "", "١٢"])
def test_external_offset_that_is_not_a_number_refused(external_bundle, value):
    set_external(external_bundle, offset=value)
    with pytest.raises(BundleError, match=r"audio\.onnx: not a valid ONNX model .*offset"):
        Bundle.load(external_bundle)


def test_external_location_with_a_nul_refused(external_bundle):
    set_external(external_bundle, location="audio.onnx.data\0/../../etc/passwd")
    with pytest.raises(BundleError, match="NUL"):
        Bundle.load(external_bundle)


def test_external_tensor_without_location_refused(external_bundle):
    model = onnx.load(external_bundle / "audio.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    kept = [e for e in tensor.external_data if e.key != "location"]
    del tensor.external_data[:]
    tensor.external_data.extend(kept)
    onnx.save_model(model, external_bundle / "audio.onnx")
    reseal(external_bundle)
    with pytest.raises(BundleError, match=f"tensor '{tensor.name}' is marked as external "
                                          f"data but names no location"):
        Bundle.load(external_bundle)


def test_external_data_through_a_symlinked_directory_refused(external_bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(external_bundle / "audio.onnx.data", outside / "w.data")
    (external_bundle / "weights").symlink_to(outside)
    set_external(external_bundle, location="weights/w.data")
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(external_bundle)


def test_external_data_file_of_the_wrong_size_refused(external_bundle):
    with open(external_bundle / "audio.onnx.data", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(BundleError, match=r"audio\.onnx\.data: external data has \d+ bytes "
                                          r"but the manifest says \d+"):
        Bundle.load(external_bundle)


# ------------------------------------------------------------------ manifest tampering

def test_manifest_checksum_edited(bundle_dir):
    edit_manifest(bundle_dir, lambda d: d["towers"]["audio"].update(sha256="ab" * 32))
    with pytest.raises(BundleError, match=r"audio\.onnx: checksum mismatch \(expected sha256 "
                                          r"(ab){32}"):
        Bundle.load(bundle_dir)


def test_manifest_pointing_a_tower_at_another_file(bundle_dir):
    # the tagger is a valid model too: only the checksum tells it from the audio tower
    edit_manifest(bundle_dir, lambda d: d["towers"]["audio"].update(
        file="tagger.onnx", size=(bundle_dir / "tagger.onnx").stat().st_size))
    with pytest.raises(BundleError, match=r"tagger\.onnx: checksum mismatch"):
        Bundle.load(bundle_dir)


def test_swapped_banks_are_caught(bundle_dir):
    banks = bundle_dir / "banks"
    emotion, style = banks / "emotion.npy", banks / "style.npy"
    data = emotion.read_bytes()
    emotion.write_bytes(style.read_bytes())
    style.write_bytes(data)
    edit_manifest(bundle_dir, lambda d: [d["banks"][n].pop("size") for n in ("emotion", "style")])
    with pytest.raises(BundleError, match=r"emotion\.npy: checksum mismatch"):
        Runtime(bundle_dir).bundle.bank("emotion")


@pytest.mark.parametrize("rel, open_it", [
    ("audio.onnx", lambda b: b.tower("audio")),
    ("text.onnx", lambda b: b.tower("text")),
    ("tokenizer.json", lambda b: b.tokenizer()),
    ("banks/style.npy", lambda b: b.bank("style")),
])
def test_file_bigger_than_its_declared_size_refused_unread(bundle_dir, rel, open_it):
    path = bundle_dir / rel
    declared = path.stat().st_size
    os.truncate(path, declared + (3 << 30))  # 3 GiB more, as a hole: nothing is written
    bundle = Bundle.load(bundle_dir, preload=())
    with pytest.raises(BundleError) as e:
        open_it(bundle)
    assert f"{path}: " in str(e.value)
    assert f"has {declared + (3 << 30)} bytes but the manifest says {declared}" in str(e.value)


def test_sizes_are_optional_and_a_1_0_manifest_loads(bundle_dir):
    def old(d):
        d["format_version"] = "1.0"
        for tower in d["towers"].values():
            tower.pop("size")
        d["tokenizer"].pop("size")
        for bank in d["banks"].values():
            bank.pop("size")
    edit_manifest(bundle_dir, old)
    assert Runtime(bundle_dir).embed_text(["a calm voice"]).shape == (1, 8)
    m = read_manifest(bundle_dir)
    assert m.towers.audio.size is None and m.with_sizes(bundle_dir).towers.audio.size == \
        (bundle_dir / "audio.onnx").stat().st_size
    assert m.with_sizes(bundle_dir).format_version == FORMAT_VERSION


def test_oversized_bank_refused_without_a_declared_size(bundle_dir):
    os.truncate(bundle_dir / "banks" / "emotion.npy", 1 << 30)
    edit_manifest(bundle_dir, lambda d: d["banks"]["emotion"].pop("size"))
    with pytest.raises(BundleError, match=r"emotion\.npy: bank 'emotion' has 1073741824 bytes, "
                                          r"more than a bank 'emotion' can need"):
        Runtime(bundle_dir).bundle.bank("emotion")


def test_manifest_bombs(bundle_dir):
    manifest = bundle_dir / "manifest.json"
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply"):
        Bundle.load(bundle_dir)
    os.truncate(manifest, MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleError, match="too large for a manifest"):
        Bundle.load(bundle_dir)


# ------------------------------------------------------------------ malformed towers

def _model(nodes, inits=(), sparse=(), outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "g", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in outputs],
        initializer=list(inits), sparse_initializer=list(sparse))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _nested_graphs(depth: int) -> bytes:
    """A model whose graph holds an If node whose branch holds an If node ... ``depth``
    levels deep (a few bytes per level)."""
    prefixes, size = [], 0
    # AttributeProto.g = 6 in NodeProto.attribute = 5 in GraphProto.node = 1, repeated
    for _ in range(depth):
        for tag in (b"\x32", b"\x2a", b"\x0a"):
            prefix = tag + _varint(size)
            prefixes.append(prefix)
            size += len(prefix)
    prefixes.append(b"\x3a" + _varint(size))  # ModelProto.graph = 7
    return b"".join(reversed(prefixes))


def _sparse_bomb(side: int) -> bytes:
    values = numpy_helper.from_array(np.array([1.0], np.float32), "bomb")
    indices = numpy_helper.from_array(np.array([5], np.int64), "bomb_idx")
    sparse = helper.make_sparse_tensor(values, indices, [side, side])
    return _model([helper.make_node("Identity", ["bomb"], ["y"])],
                  sparse=[sparse]).SerializeToString()


def _huge_dims() -> bytes:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 30, 1 << 10],
                    raw_data=b"\0" * 16)
    return _model([helper.make_node("Identity", ["w"], ["y"])], inits=[t]).SerializeToString()


def test_scan_bounds(monkeypatch):
    import clapedge.runtime.onnx_external as ox

    monkeypatch.setattr(ox, "MAX_FIELDS", 1000)
    with pytest.raises(OnnxParseError, match="more than 1000 protobuf fields"):
        scan_model(b"\x08\x01" * 1001)
    scan_model(b"\x08\x01" * 999)
    monkeypatch.undo()
    with pytest.raises(OnnxParseError, match="nested more than"):
        scan_model(_nested_graphs(MAX_GRAPH_DEPTH + 2))
    assert scan_model(_nested_graphs(MAX_GRAPH_DEPTH - 1)).external == []
    with pytest.raises(OnnxParseError, match="field number 0"):
        scan_model(_huge_dims() + b"\0" * 64)
    (bomb,) = scan_model(_sparse_bomb(1 << 20)).sparse
    assert bomb.tensor == "bomb" and bomb.dense_bytes == 4 << 40


# Each case: (name, how to damage BUNDLE/audio.onnx, reseal the manifest?, expected message).
# Built by the test, loaded in a child process that reports time and peak RSS per case.
MALFORMED = {
    "zero bytes": (lambda p: p.write_bytes(b""), True, "onnxruntime cannot load"),
    "truncated protobuf": (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
                           True, "not a valid ONNX model (truncated"),
    "random bytes (1 MiB)": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(1 << 20)),
                             True, "not a valid ONNX model"),
    "field claiming 2^60 bytes": (lambda p: p.write_bytes(b"\x3a" + _varint(1 << 60) + b"x"),
                                  True, "truncated length-delimited field"),
    "tensor claiming 2^40 elements": (lambda p: p.write_bytes(_huge_dims()), True,
                                      "onnxruntime cannot load"),
    "sparse tensor densifying to 4 TiB": (lambda p: p.write_bytes(_sparse_bomb(1 << 20)), True,
                                          "would take 4398046511104 bytes once densified"),
    "sparse tensor densifying to 1 GiB": (lambda p: p.write_bytes(_sparse_bomb(1 << 14)), True,
                                          "would take 1073741824 bytes once densified"),
    "subgraphs nested 100000 deep": (lambda p: p.write_bytes(_nested_graphs(100_000)), True,
                                     "nested more than 32 deep"),
    "model + 4 GiB of zeros, size declared": (lambda p: os.truncate(p, p.stat().st_size + (4 << 30)),
                                              False, "but the manifest says"),
    "3 GiB model file, resealed": (lambda p: os.truncate(p, 3 << 30), "size-only",
                                   "an ONNX model file holds at most"),
}

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from clapedge.errors import ClapEdgeError
    from clapedge.runtime import Bundle

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    Bundle.load(sys.argv[1])  # warm up: imports, one good session
    base = peak_mb()
    for case, path in json.loads(sys.argv[2]).items():
        t0 = time.perf_counter()
        try:
            Bundle.load(path)
            error = None
        except ClapEdgeError as e:
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"case": case, "error": error, "seconds": time.perf_counter() - t0,
                          "peak_mb": peak_mb(), "base_mb": base}), flush=True)
""")


def test_malformed_towers_fail_fast_in_bounded_memory(pristine, tmp_path):
    cases = {}
    for i, (case, (damage, reseal_it, _)) in enumerate(MALFORMED.items()):
        root = Path(shutil.copytree(pristine, tmp_path / f"case{i}"))
        damage(root / "audio.onnx")
        if reseal_it == "size-only":
            edit_manifest(root, lambda d: d["towers"]["audio"].update(
                size=(root / "audio.onnx").stat().st_size))
        elif reseal_it:
            reseal(root)
        cases[case] = str(root)
    proc = subprocess.run(fresh([sys.executable, "-c", _CHILD, str(pristine), json.dumps(cases)]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(results) == set(MALFORMED)
    for case, (_, _, expected) in MALFORMED.items():
        r = results[case]
        assert r["error"] is not None, f"{case}: loaded"
        assert r["error"].startswith("BundleError: ") and "audio.onnx" in r["error"], r
        assert expected in r["error"], (case, r["error"])
        assert r["seconds"] < 15, (case, r["seconds"])  # generous: a shared 2-core machine
    peak_growth = max(r["peak_mb"] for r in results.values()) - results[case]["base_mb"]
    assert peak_growth < 200, {c: round(r["peak_mb"]) for c, r in results.items()}
    print(json.dumps({c: {"s": round(r["seconds"], 4), "peak_mb": round(r["peak_mb"])}
                      for c, r in results.items()}, indent=1))
