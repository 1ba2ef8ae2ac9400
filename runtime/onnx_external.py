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

Everything else (including large ``raw_data`` payloads) is skipped by length, without
copying.
"""

from __future__ import annotations

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxParseError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxParseError("varint too long")


def _fields(buf: memoryview):
    """Yield (field_number, wire_type, value): an int for varints, a memoryview for
    length-delimited fields, None for fixed-width ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise OnnxParseError("truncated length-delimited field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            value = None
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise OnnxParseError("truncated field")
        yield number, wire, value


def _sub(fields, numbers) -> list[memoryview]:
    return [v for n, w, v in fields if n in numbers and w == _LEN]


def _tensor(buf: memoryview, out: list[str]) -> None:
    location, external = None, False
    for number, wire, value in _fields(buf):
        if number == 14 and wire == _VARINT:
            external = value == 1  # DataLocation.EXTERNAL
        elif number == 13 and wire == _LEN:
            key = val = ""
            for n, w, v in _fields(value):
                if w == _LEN and n in (1, 2):
                    text = bytes(v).decode("utf-8", errors="replace")
                    key, val = (text, val) if n == 1 else (key, text)
            if key == "location":
                location = val
    if location is not None or external:
        out.append(location if location is not None else "")


def _sparse(buf: memoryview, out: list[str]) -> None:
    for t in _sub(_fields(buf), (1, 2)):
        _tensor(t, out)


def _node(buf: memoryview, out: list[str]) -> None:
    for attr in _sub(_fields(buf), (5,)):
        for number, wire, value in _fields(attr):
            if wire != _LEN:
                continue
            if number in (5, 10):
                _tensor(value, out)
            elif number in (6, 11):
                _graph(value, out)
            elif number in (22, 23):
                _sparse(value, out)


def _graph(buf: memoryview, out: list[str]) -> None:
    for number, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if number == 1:
            _node(value, out)
        elif number == 5:
            _tensor(value, out)
        elif number == 15:
            _sparse(value, out)


def external_data_locations(model: bytes | bytearray | memoryview) -> list[str]:
    """Every external-data ``location`` in a serialized ModelProto, in file order.

    A tensor marked EXTERNAL without a location yields ``""`` (the caller refuses it).
    Raises ``OnnxParseError`` when the bytes are not a well-formed protobuf.
    """
    buf = memoryview(model)
    out: list[str] = []
    for number, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if number == 7:
            _graph(value, out)
        elif number == 25:
            for node in _sub(_fields(value), (7,)):
                _node(node, out)
    return out
