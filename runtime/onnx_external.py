"""Find the external-data files an ONNX model references, without the ``onnx`` package.

A tensor stored outside the model names its file in ``TensorProto.external_data``
(key ``"location"``). A hostile or broken bundle could point that at ``/etc/passwd`` or
``../../secret``; onnxruntime resolves some such paths without complaint, so the runtime
checks every location itself before creating a session.

This is a minimal protobuf wire-format reader for exactly the fields on the way to a
tensor (field numbers from onnx.proto3):

    ModelProto      graph=7, functions=25
    FunctionProto   node=7
    GraphProto      node=1, initializer=5, sparse_initializer=15
    NodeProto       attribute=5
    AttributeProto  t=5, g=6, tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23
    SparseTensorProto values=1, indices=2
    TensorProto     external_data=13 (StringStringEntryProto key=1 value=2), data_location=14

Everything else (including large ``raw_data`` payloads) is skipped by length. The reader
works on offsets into any buffer (bytes, a memoryview, an ``mmap``) and never copies a
field, so a memory-mapped model of any size is scanned in place.
"""

from __future__ import annotations

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise OnnxParseError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxParseError("varint too long")


def _fields(buf, start: int, end: int):
    """Yield (field_number, wire_type, value) for the message in ``buf[start:end]``: an int
    for varints, a (start, end) span for length-delimited fields, None for fixed-width."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise OnnxParseError("truncated length-delimited field")
            value, pos = (pos, pos + size), pos + size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            value = None
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")
        if pos > end:
            raise OnnxParseError("truncated field")
        yield number, wire, value


def _sub(buf, span, numbers) -> list[tuple[int, int]]:
    return [v for n, w, v in _fields(buf, *span) if n in numbers and w == _LEN]


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _tensor(buf, span, out: list[str]) -> None:
    location, external = None, False
    for number, wire, value in _fields(buf, *span):
        if number == 14 and wire == _VARINT:
            external = value == 1  # DataLocation.EXTERNAL
        elif number == 13 and wire == _LEN:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if w == _LEN and n == 1:
                    key = _text(buf, v)
                elif w == _LEN and n == 2:
                    val = _text(buf, v)
            if key == "location":
                location = val
    if location is not None or external:
        out.append(location if location is not None else "")


def _sparse(buf, span, out: list[str]) -> None:
    for t in _sub(buf, span, (1, 2)):
        _tensor(buf, t, out)


def _node(buf, span, out: list[str]) -> None:
    for attr in _sub(buf, span, (5,)):
        for number, wire, value in _fields(buf, *attr):
            if wire != _LEN:
                continue
            if number in (5, 10):
                _tensor(buf, value, out)
            elif number in (6, 11):
                _graph(buf, value, out)
            elif number in (22, 23):
                _sparse(buf, value, out)


def _graph(buf, span, out: list[str]) -> None:
    for number, wire, value in _fields(buf, *span):
        if wire != _LEN:
            continue
        if number == 1:
            _node(buf, value, out)
        elif number == 5:
            _tensor(buf, value, out)
        elif number == 15:
            _sparse(buf, value, out)


def external_data_locations(model) -> list[str]:
    """Every external-data ``location`` in a serialized ModelProto (bytes, memoryview or
    mmap), in file order. A tensor marked EXTERNAL without a location yields ``""`` (the
    caller refuses it). Raises ``OnnxParseError`` when the bytes are not a well-formed
    protobuf."""
    out: list[str] = []
    for number, wire, value in _fields(model, 0, len(model)):
        if wire != _LEN:
            continue
        if number == 7:
            _graph(model, value, out)
        elif number == 25:
            for node in _sub(model, value, (7,)):
                _node(model, node, out)
    return out
