"""Fuzzing in CI: every target of ``clapedge.bench.fuzz`` for a couple of seconds (atheris
where it is installed, hypothesis otherwise) must find nothing; the harness must report each
kind of finding (an unexpected exception, a native crash, a hang); and every input the
fuzzers found before the code was fixed stays fixed (regressions below).

Longer runs: ``python -m clapedge.bench.fuzz --seconds 600`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from clapedge.bench import fuzz
from clapedge.errors import AudioError, BundleError, ConfigError
from clapedge.kernels.frontend import FrontEndFileError
from clapedge.runtime.index_errors import IndexCorruptError
from clapedge.runtime.segment import MAGIC

SECONDS = 2.0
ATHERIS = fuzz.atheris_available()


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_target_survives_fuzzing(target, tmp_path):
    result = fuzz.run_target(target, SECONDS, tmp_path, timeout=5, max_restarts=1)
    report = "\n".join(f"{f.kind}: {f.signature}: {f.message} [{f.input_file}]"
                       for f in result.findings)
    assert not result.findings, f"{target}: fuzzing found\n{report}"
    assert result.iterations >= 50, result
    assert result.engine == ("atheris" if ATHERIS else "hypothesis")


def test_hypothesis_engine_reports_an_unexpected_exception(tmp_path):
    result = fuzz.run_target("selftest_exception", 30, tmp_path, engine="hypothesis", runs=20)
    assert [(f.kind, f.signature.split(" at ")[0]) for f in result.findings] == \
        [("exception", "KeyError")]
    assert (tmp_path / "findings" / "findings.jsonl").is_file()
    assert open(result.findings[0].input_file, "rb").read().startswith(b"X")


@pytest.mark.skipif(not ATHERIS, reason="atheris is not installed (Linux x86-64 wheels only)")
def test_atheris_engine_reports_exceptions_crashes_and_hangs(tmp_path):
    crash = fuzz.run_target("selftest_crash", 5, tmp_path / "c", engine="atheris", timeout=1,
                            max_restarts=0)
    kinds = {f.kind: f for f in crash.findings}
    assert set(kinds) == {"exception", "crash"}, crash.findings
    assert kinds["exception"].signature.startswith("KeyError")
    assert "deadly signal" in kinds["crash"].message
    hang = fuzz.run_target("selftest_hang", 5, tmp_path / "h", engine="atheris", timeout=1,
                           max_restarts=0)
    assert [f.kind for f in hang.findings] == ["timeout"], hang.findings
    assert open(hang.findings[0].input_file, "rb").read() == b"HHH"


# ------------------------------------------------------------------ regressions

def _manifest_with_nan_info() -> bytes:
    data = json.loads(fuzz.seed_manifest())
    data["model"]["info"] = {"note": float("nan")}
    return b"\0" + json.dumps(data, allow_nan=True).encode()


def _segment_with_deep_header() -> bytes:
    blob = b"[" * 50_000 + b"]" * 50_000
    head = MAGIC + struct.pack("<II", 1, len(blob)) + blob
    return b"\0" + head + struct.pack("<I", zlib.crc32(head))


def _gallery_with_void_codes(harness: fuzz.Harness) -> bytes:
    """Mode 2 (gallery bytes edited, segment header consistent): the int8 codes array's
    dtype "|i1" becomes "|V1" (void elements the kernel must never be handed)."""
    _, gallery = harness._segment_seed()[0]
    pos = gallery.index(b'"|i1"') + 2
    return bytes([2, 0, 0, 0]) + struct.pack("<H", pos) + b"V"


def _frontend_meta(**change):
    """Mode 0 (a whole file): the seed front end with its JSON record's first layer changed."""
    import io

    import numpy as np

    def make(harness: fuzz.Harness) -> bytes:
        with np.load(io.BytesIO(harness._frontend_seed()), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(bytes(arrays["meta"]).decode())
        meta["layers"][0].update(change)
        arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), np.uint8)
        out = io.BytesIO()
        np.savez(out, **arrays)
        return b"\0" + out.getvalue()
    return make


def _frontend_zip_entry(offset: int, value: bytes):
    """Mode 0: the seed with a field of every central-directory entry overwritten (offset
    6: the version needed to extract; 8: the flags, bit 0 = encrypted)."""
    def make(harness: fuzz.Harness) -> bytes:
        data = bytearray(harness._frontend_seed())
        at = data.find(b"PK\x01\x02")
        while at >= 0:
            data[at + offset:at + offset + len(value)] = value
            at = data.find(b"PK\x01\x02", at + 4)
        return b"\0" + bytes(data)
    return make


# (target, input or a function of the harness giving it, expected error, message regex,
#  what escaped before the fix)
REGRESSIONS = [
    ("tokenizer", b"\1calm \xed\xa0\x80 voice", ConfigError, "not valid Unicode",
     "TypeError from tokenizers (a lone surrogate)"),
    ("tokenizer", b"\3\xffcalm ", ConfigError, "characters; at most 100000",
     "1.5 GB and 17 s for a 12 M-character text"),
    ("manifest", b"\0" + b"[" * 50_000 + b"]" * 50_000, BundleError, "nested too deeply",
     "RecursionError"),
    ("manifest", _manifest_with_nan_info(), BundleError, r"model: info: must be JSON",
     "ValueError from to_json: a manifest that loads could not be written back"),
    ("audio", b"\x01\x02\x027\x01\xff\xff\x00\xb5\x01\xfc\x00\x01sn\xff\x1da{\x99\x1e\x05\x00",
     AudioError, "sample of magnitude 1.58e\\+38",
     "finite float32 samples near 3e38 came out of mixing/resampling as Inf"),
    ("segment", _segment_with_deep_header(), IndexCorruptError, "segment.bin is corrupt",
     "RecursionError"),
    ("segment", _gallery_with_void_codes, IndexCorruptError, r"array 'codes' is \|V1",
     "a gallery whose codes were void elements opened, and search raised TypeError"),
    ("segment", b"CLAPS.09\xff\xff\x136", IndexCorruptError, r"array 'rerank' is missing",
     "KeyError from compaction's re-rank copy: a gallery naming a re-rank dtype without the "
     "array opened"),
    ("segment", b"\x02'\x04\x05\x05\x030CLAPSEG\x00", IndexCorruptError,
     r"array 'codes' has dtype '\|01'", "SyntaxError from numpy parsing a dtype string"),
    ("onnx", b"\0" + fuzz.external_model("w.data\0/../../etc/passwd"), BundleError,
     "contains a NUL character", "ValueError (embedded null byte) from Path.resolve"),
    ("frontend", _frontend_meta(kernel=2 ** 63), FrontEndFileError, "out of range",
     "RuntimeError (std::bad_cast) from nanobind: an int past int64"),
    ("frontend", _frontend_meta(kernel=float("inf")), FrontEndFileError, "not a valid",
     "OverflowError from int(inf)"),
    ("frontend", _frontend_zip_entry(8, b"\x01"), FrontEndFileError, "not a valid",
     "RuntimeError from zipfile: an entry flagged encrypted"),
    ("frontend", _frontend_zip_entry(6, bytes([93, 0])), FrontEndFileError, "not a valid",
     "NotImplementedError from zipfile: zip version 9.3"),
    ("frontend", lambda h: b"\0" + h._frontend_seed()[:-200], FrontEndFileError, "not a valid",
     "EOFError / BadZipFile from a truncated archive"),
]


@pytest.mark.parametrize("target, data, error, message, before", REGRESSIONS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REGRESSIONS)])
def test_fuzz_findings_stay_fixed(tmp_path, target, data, error, message, before):
    harness = fuzz.Harness(tmp_path)
    if callable(data):
        data = data(harness)
    with pytest.raises(error, match=message):
        harness.run(target, data)
