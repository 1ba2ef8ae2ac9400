"""The native INT8 conv front end (kernels/frontend.py): its arithmetic against a numpy twin,
its SIMD levels against each other, frame locality, padding, threads, files and errors."""

from __future__ import annotations

from math import erf

import numpy as np
import pytest

from clapedge.kernels import available_simd_levels
from clapedge.kernels.errors import KernelInputError
from clapedge.kernels.frontend import FrontEndFileError, NativeFrontEnd

LEVELS = available_simd_levels()
FAST = [lv for lv in ("amx", "avx512") if lv in LEVELS]
_erf = np.vectorize(erf)


def _int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.maximum(np.abs(w).max(0), 1e-12) / 127).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def _stack(seed: int = 0, channels: int = 32, norm0: str = "group", norm: str = "none",
           kernels=(10, 3, 2), strides=(5, 2, 2), proj_out: int | None = 48, bias: bool = True):
    rng = np.random.default_rng(seed)
    layers = []
    for i, (k, s) in enumerate(zip(kernels, strides)):
        cin = 1 if i == 0 else channels
        w = (rng.standard_normal((k * cin, channels)) / np.sqrt(k * cin)).astype(np.float32)
        layer = dict(kernel=k, stride=s, cin=cin, cout=channels,
                     bias=(0.1 * rng.standard_normal(channels)).astype(np.float32) if bias else None,
                     norm=norm0 if i == 0 else norm)
        if layer["norm"] != "none":
            layer["norm_weight"] = (1 + 0.1 * rng.standard_normal(channels)).astype(np.float32)
            layer["norm_bias"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        if i == 0:
            layer["weight"] = w
        else:
            layer["weight"], layer["weight_scale"] = _int8(w)
        layers.append(layer)
    proj = None
    if proj_out:
        q, sc = _int8((rng.standard_normal((channels, proj_out)) / np.sqrt(channels)).astype(np.float32))
        proj = dict(din=channels, dout=proj_out, layer_norm=True,
                    ln_weight=np.ones(channels, np.float32), ln_bias=np.zeros(channels, np.float32),
                    weight=q, weight_scale=sc, bias=np.full(proj_out, 0.05, np.float32))
    return layers, proj


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def _ln(x, w, b, eps=1e-5):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def _rowwise(frames: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The per-row dynamic int8 GEMM of export/rowwise.py, in float64 from the same codes."""
    amax = np.abs(frames).max(1)
    inv = np.where(amax > 1e-30, np.float32(127) / np.maximum(amax, 1e-30).astype(np.float32), 0)
    codes = np.clip(np.rint(frames.astype(np.float32) * inv[:, None].astype(np.float32)), -127, 127)
    acc = codes.astype(np.float64) @ q.astype(np.float64)
    return acc * (amax[:, None] / 127) * scale[None].astype(np.float64)


def _reference(layers, proj, x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)[:, None]
    for i, lay in enumerate(layers):
        k, s = lay["kernel"], lay["stride"]
        n = (h.shape[0] - k) // s + 1
        frames = h[np.arange(n)[:, None] * s + np.arange(k)[None]].reshape(n, -1)
        y = frames @ lay["weight"].astype(np.float64) if i == 0 else _rowwise(
            frames, lay["weight"], lay["weight_scale"])
        if lay.get("bias") is not None:
            y = y + lay["bias"]
        if lay["norm"] == "group":
            y = (y - y.mean(0)) / np.sqrt(y.var(0) + 1e-5) * lay["norm_weight"] + lay["norm_bias"]
        elif lay["norm"] == "layer":
            y = _ln(y, lay["norm_weight"], lay["norm_bias"])
        h = _gelu(y)
    if proj is not None:
        h = _rowwise(_ln(h, proj["ln_weight"], proj["ln_bias"]), proj["weight"],
                     proj["weight_scale"]) + proj["bias"]
    return h


def _wave(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal(n)).astype(np.float32)
    x[: n // 4] *= 0.01  # a quiet stretch: its rows get their own small scales
    return x


@pytest.mark.parametrize("level", ["scalar"] + FAST)
@pytest.mark.parametrize("norm0,norm", [("group", "none"), ("layer", "layer"), ("none", "none")])
def test_matches_a_numpy_twin_of_the_int8_arithmetic(level, norm0, norm):
    layers, proj = _stack(norm0=norm0, norm=norm)
    x = _wave(8000)
    got = NativeFrontEnd(layers, proj)(x, simd_level=level, threads=2)
    ref = _reference(layers, proj, x)
    assert got.shape == ref.shape == (NativeFrontEnd(layers, proj).frames(8000), 48)
    # Same codes and integer sums; float32 vs float64 epilogue and the vector GELU (|error|
    # <= 1.5e-7) can flip a rare rounding of the next layer by one step.
    err = np.abs(got - ref)
    assert err.max() <= 0.02 * np.abs(ref).max()
    assert np.median(err) <= 1e-5 * np.abs(ref).max()


@pytest.mark.skipif(len(FAST) < 1, reason="no AVX-512 VNNI / AMX level on this CPU")
def test_simd_levels_agree():
    layers, proj = _stack(channels=64, kernels=(10, 3, 3, 2), strides=(5, 2, 2, 2))
    fe = NativeFrontEnd(layers, proj)
    x = _wave(24000, seed=3)
    outs = {lv: fe(x, simd_level=lv) for lv in ["scalar"] + FAST}
    if len(FAST) == 2:  # the same integer GEMM and the same epilogue code
        assert outs["amx"].tobytes() == outs["avx512"].tobytes()
    scale = np.abs(outs["scalar"]).max()
    for lv in FAST:
        assert np.median(np.abs(outs[lv] - outs["scalar"])) <= 1e-5 * scale


def test_threads_and_repeats_give_identical_bits():
    layers, proj = _stack()
    fe = NativeFrontEnd(layers, proj)
    x = _wave(40000)
    a = fe(x, threads=1)
    assert fe(x, threads=2).tobytes() == a.tobytes() == fe(x, threads=1).tobytes()


def test_layernorm_front_end_is_frame_local():
    """Frames of an aligned chunk equal the same frames of the whole signal, bit for bit
    (what lets a stream compute only its new frames)."""
    layers, proj = _stack(norm0="layer", norm="layer")
    fe = NativeFrontEnd(layers, proj)
    stride, field = 5 * 2 * 2, 10 + 5 * 2 + 5 * 2 * 1  # product of strides; receptive field
    x = _wave(12000)
    whole = fe(x)
    start_frame = 37
    chunk = x[start_frame * stride: start_frame * stride + 2000]
    part = fe(chunk)
    assert field <= 2000
    assert part.tobytes() == whole[start_frame:start_frame + len(part)].tobytes()


def test_padding_is_ignored_like_the_graph():
    """A right-padded clip: the valid frames equal those of the clip alone; GroupNorm
    statistics cover only the valid frames."""
    layers, proj = _stack(norm0="group")
    fe = NativeFrontEnd(layers, proj)
    x = _wave(6000)
    padded = np.concatenate([x, np.full(4000, 0.7, np.float32)])  # garbage past the length
    batch = np.stack([padded, _wave(10000, seed=9)])
    out = fe(batch, np.array([6000, 10000]))
    alone = fe(x)
    np.testing.assert_array_equal(out[0, : len(alone)], alone)
    np.testing.assert_array_equal(out[1], fe(_wave(10000, seed=9)))


def test_waveform_normalisation_option():
    layers, proj = _stack(norm0="layer", norm="layer")
    x = _wave(8000)
    fe = NativeFrontEnd(layers, proj, normalize_waveform=True)
    standardised = ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)
    np.testing.assert_allclose(fe(x), NativeFrontEnd(layers, proj)(standardised), atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    layers, proj = _stack()
    fe = NativeFrontEnd(layers, proj)
    fe.save(tmp_path / "f.npz")
    back = NativeFrontEnd.load(tmp_path / "f.npz")
    x = _wave(5000)
    assert back(x).tobytes() == fe(x).tobytes()
    data = (tmp_path / "f.npz").read_bytes()
    assert NativeFrontEnd.load(tmp_path / "f.npz", data)(x).tobytes() == fe(x).tobytes()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "meta"])
def test_bad_files_are_clear_errors(tmp_path, damage):
    layers, proj = _stack()
    path = tmp_path / "f.npz"
    NativeFrontEnd(layers, proj).save(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "pickle":
        np.savez(path, meta=np.array([{"evil": 1}], dtype=object))
    else:
        np.savez(path, meta=np.frombuffer(b'{"format": 1, "layers": [{"kernel": 3}]}', np.uint8))
    with pytest.raises(FrontEndFileError, match="f.npz"):
        NativeFrontEnd.load(path)


def test_bad_specs_and_inputs_are_clear_errors():
    layers, proj = _stack()
    bad = [dict(layer) for layer in layers]
    bad[1] = dict(bad[1], cout=24)
    with pytest.raises(KernelInputError, match="multiple of 16|int8 weight"):
        NativeFrontEnd(bad, proj)
    bad = [dict(layer) for layer in layers]
    bad[2] = dict(bad[2], norm="group")
    with pytest.raises(KernelInputError, match="first layer only"):
        NativeFrontEnd(bad, proj)
    with pytest.raises(KernelInputError, match="unknown norm"):
        NativeFrontEnd([dict(layers[0], norm="batch")] + layers[1:], proj)
    with pytest.raises(KernelInputError, match="int8"):
        NativeFrontEnd([layers[0], dict(layers[1], weight=layers[1]["weight"].astype(np.float32))]
                       + layers[2:], proj)
    fe = NativeFrontEnd(layers, proj)
    with pytest.raises(KernelInputError, match="too few"):
        fe(np.zeros(20, np.float32))
    with pytest.raises(KernelInputError, match="batch, samples"):
        fe(np.zeros((1, 1, 4000), np.float32))
    with pytest.raises(KernelInputError, match="lengths"):
        fe(np.zeros((2, 4000), np.float32), np.array([4000]))
