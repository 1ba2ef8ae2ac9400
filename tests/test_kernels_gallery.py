"""Gallery: the stored forms (int8 + scales + corrections + re-rank copy, fp16, float32) and
the file format the index memory-maps."""

import struct

import numpy as np
import pytest

from clapedge.kernels import Gallery, GalleryFileError, quantize_int8, topk
from clapedge.kernels.gallery import FORMAT_VERSION, MAGIC


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1003, 37)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((6, 37)).astype(np.float32)
    return g, q


def test_int8_storage(data):
    g, _ = data
    gal = Gallery(g, "int8")
    codes, scales = gal.codes(), gal.scales
    assert codes.shape == g.shape and codes.dtype == np.int8
    assert codes.min() >= -127 and codes.max() <= 127
    np.testing.assert_allclose(scales, np.abs(g).max(axis=1) / 127, rtol=1e-6)
    ref_codes, ref_scales = quantize_int8(g)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)
    assert np.abs(gal.decode() - g).max() <= scales.max() / 2 + 1e-7
    assert gal.rerank_dtype == "float32" and len(gal) == 1003 and gal.dim == 37
    assert "dtype=int8" in repr(gal)


def test_defaults_and_options(data):
    g, _ = data
    assert Gallery(g, "fp16").rerank_dtype is None
    assert Gallery(g, "float32").rerank_dtype is None
    assert Gallery(g, "int8", rerank=False).rerank_dtype is None
    assert Gallery(g, "int8", rerank_dtype="fp16").rerank_dtype == "fp16"
    assert Gallery(g, "float16").dtype == "fp16"
    with pytest.raises(ValueError, match="already exact"):
        Gallery(g, "float32", rerank=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Gallery(g, "int4")
    with pytest.raises(ValueError, match="overflow float16"):
        Gallery(g * 1e6, "fp16")
    with pytest.raises(ValueError, match="only for int8"):
        Gallery(g, "fp16").codes()


def test_fp16_rerank_copy_is_close(data):
    g, q = data
    s32, i32 = topk(q, g, 5)
    s16, i16 = topk(q, Gallery(g, "int8", rerank_dtype="fp16"), 5)
    np.testing.assert_allclose(s16, s32, atol=2e-3)


@pytest.mark.parametrize("dtype", ["int8", "fp16", "float32"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, data, dtype, mmap):
    g, q = data
    gal = Gallery(g, dtype)
    path = gal.save(tmp_path / "g.clapgal")
    assert not list(tmp_path.glob("*.tmp")), "the temp file is renamed into place"
    back = Gallery.load(path, mmap=mmap, verify=True)
    assert (back.dtype, back.shape, back.rerank_dtype) == (gal.dtype, gal.shape, gal.rerank_dtype)
    for name, arr in back._arrays.items():
        assert isinstance(arr, np.memmap) == mmap, name
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(gal._arrays[name]))
    a, b = topk(q, gal, 7), topk(q, back, 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_arrays_are_aligned_for_memory_mapping(tmp_path, data):
    path = Gallery(data[0], "int8").save(tmp_path / "g")
    back = Gallery.load(path)
    for arr in back._arrays.values():
        assert arr.offset % 64 == 0
        assert not arr.flags.writeable


def test_empty_gallery_roundtrip(tmp_path):
    gal = Gallery(np.zeros((0, 8), np.float32), "int8")
    back = Gallery.load(gal.save(tmp_path / "empty"))
    s, i = topk(np.ones((2, 8), np.float32), back, 3)
    assert (i == -1).all() and np.isneginf(s).all()


def test_corrupt_files_are_reported(tmp_path, data):
    path = Gallery(data[0], "int8").save(tmp_path / "g")
    raw = bytearray(path.read_bytes())

    bad = tmp_path / "bad"
    bad.write_bytes(b"not a gallery at all")
    with pytest.raises(GalleryFileError, match="not a clapedge gallery"):
        Gallery.load(bad)

    bad.write_bytes(raw[:-100])
    with pytest.raises(GalleryFileError, match="truncated"):
        Gallery.load(bad)

    newer = bytearray(raw)
    newer[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    bad.write_bytes(newer)
    with pytest.raises(GalleryFileError, match="format version"):
        Gallery.load(bad)

    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    bad.write_bytes(flipped)
    Gallery.load(bad)  # without verify: opens (sizes are fine)
    with pytest.raises(GalleryFileError, match="checksum"):
        Gallery.load(bad, verify=True)

    with pytest.raises(GalleryFileError, match="cannot read"):
        Gallery.load(tmp_path / "missing")
    assert raw[:8] == MAGIC


def test_queries_quantised_like_the_gallery(data):
    g, q = data
    # an int8 search of a gallery row finds itself first
    gal = Gallery(g, "int8", rerank=False)
    _, ids = topk(g[[5, 500, 1002]], gal, 1)
    assert ids[:, 0].tolist() == [5, 500, 1002]


def test_from_int8_matches_quantising_here(data):
    g, q = data
    codes, scales = quantize_int8(g)
    built = Gallery.from_int8(codes, scales, rerank=g)
    here = Gallery(g, "int8")
    for name in ("codes", "scales", "corrections", "rerank"):
        np.testing.assert_array_equal(built._arrays[name], here._arrays[name])
    np.testing.assert_array_equal(topk(q, built, 5)[1], topk(q, here, 5)[1])
    with pytest.raises(ValueError, match="-127, 127"):
        Gallery.from_int8(np.full((2, 3), -128, np.int8), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="scales must be"):
        Gallery.from_int8(codes, scales[:-1])


def test_copy_false_shares_float32_rows(data):
    g, q = data
    shared = Gallery(g, "int8", copy=False)
    assert shared._arrays["rerank"] is g
    assert Gallery(g, "float32", copy=False)._arrays["vectors"] is g
    assert Gallery(g, "int8")._arrays["rerank"] is not g
    np.testing.assert_array_equal(topk(q, shared, 5)[1], topk(q, Gallery(g, "int8"), 5)[1])


def test_rerank_vectors_accessor(tmp_path, data):
    g, _ = data
    assert Gallery(g, "fp16").rerank_vectors is None
    np.testing.assert_array_equal(Gallery(g, "int8").rerank_vectors, g)
    back = Gallery.load(Gallery(g, "int8", rerank_dtype="fp16").save(tmp_path / "g"))
    assert back.rerank_vectors.dtype == np.float16 and back.rerank_vectors.shape == g.shape
