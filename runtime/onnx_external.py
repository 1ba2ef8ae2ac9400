"""Scan an ONNX model for what a hostile file could abuse, without the ``onnx`` package.

Two things in a model make ONNX Runtime touch more than the file itself:

- external data: a tensor stored outside the model names its file in
  ``TensorProto.external_data`` (keys ``location``, ``offset``, ``length``). A hostile or
  broken bundle could point that at ``/etc/passwd`` or ``../../secret``, or past the end
  of the data file; onnxruntime resolves some such paths without complaint, so the runtime
  checks every reference itself before creating a session (``Bundle``).
- sparse tensors: ONNX Runtime turns every sparse initializer (and sparse ``Constant``)
  into a dense tensor while it loads the model. A 100-byte file can declare a sparse
  tensor of 16384 x 16384 floats and cost 1 GiB and many seconds at load; the runtime
  refuses dense sizes above a limit (``Bundle``).

This is a minimal protobuf wire-format reader for exactly the fields on the way to a
tensor (field numbers from onnx.proto3):

    ModelProto      graph=7, functions=25
    FunctionProto   node=7
    GraphProto      node=1, initializer=5, sparse_initializer=15
    NodeProto       attribute=5
    AttributeProto  t=5, g=6, tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23
    SparseTensorProto values=1, indices=2, dims=3
    TensorProto     dims=1, data_type=2, name=8, external_data=13 (StringStringEntryProto
                    key=1 value=2), data_location=14

Everything else (including large ``raw_data`` payloads) is skipped by length. The reader
works on offsets into any buffer (bytes, a memoryview, an ``mmap``) and never copies a
field, so a memory-mapped model of any size is scanned in place. Bounds, so that a hostile
file fails fast: subgraphs nest at most ``MAX_GRAPH_DEPTH`` deep (a few bytes per level
would otherwise exhaust the stack), and a scan visits at most ``MAX_FIELDS`` fields (about
0.6 us each here: a file of nothing but 2-byte fields would otherwise take minutes; real
towers have about 10,000, the default model's audio tower 10,418).
"""

from __future__ import annotations

from dataclasses import dataclass

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
MAX_GRAPH_DEPTH = 32
MAX_FIELDS = 10_000_000

# bytes per element of each TensorProto.DataType (STRING: a std::string in ONNX Runtime;
# 4-bit types rounded up; unknown types count as 8)
_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 32, 9: 1, 10: 2, 11: 8, 12: 4,
               13: 8, 14: 8, 15: 16, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: ``location`` ("" when the tensor names none),
    ``offset`` and ``length`` in bytes (None when absent: offset 0, up to the end)."""

    tensor: str
    location: str
    offset: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class SparseRef:
    """One sparse tensor: its name, dense shape and the bytes its dense form takes."""

    tensor: str
    dims: tuple[int, ...]
    dense_bytes: int


@dataclass
class ModelScan:
    external: list[ExternalRef]
    sparse: list[SparseRef]


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


class _Budget:
    """How many more fields a scan may visit."""

    def __init__(self):
        self.left = MAX_FIELDS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise OnnxParseError(f"more than {MAX_FIELDS} protobuf fields; not a model this "
                                 f"runtime loads")


def _fields(buf, start: int, end: int, budget: _Budget):
    """Yield (field_number, wire_type, value) for the message in ``buf[start:end]``: an int
    for varints, a (start, end) span for length-delimited fields, None for fixed-width.
    Each field spends one unit of ``budget``. (Single-byte keys and varints, nearly all of
    them, are read inline: this loop is the scan's cost.)"""
    pos = start
    while pos < end:
        budget.left -= 1
        if budget.left < 0:
            budget.spend()  # raises
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxParseError("invalid field number 0")
        if wire == _VARINT:
            if pos < end and buf[pos] < 0x80:
                value, pos = buf[pos], pos + 1
            else:
                value, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise OnnxParseError("truncated length-delimited field")
            value, pos = (pos, pos + size), pos + size
        elif wire == _I64 or wire == _I32:
            pos += 8 if wire == _I64 else 4
            value = None
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")
        if pos > end:
            raise OnnxParseError("truncated field")
        yield number, wire, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _int64s(buf, wire: int, value, budget: _Budget) -> list[int]:
    """A repeated int64 field's values: one varint, or a packed run of them."""
    if wire == _VARINT:
        return [value]
    if wire != _LEN:
        raise OnnxParseError("a tensor's dims field has the wrong wire type")
    out, pos, end = [], value[0], value[1]
    while pos < end:
        budget.spend()
        v, pos = _varint(buf, pos, end)
        out.append(v)
    return out


def _size_field(tensor: str, key: str, text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise OnnxParseError(f"tensor {tensor!r}: external_data {key} {text!r} is not a "
                             f"non-negative integer")
    return int(text)


class _Scanner:
    def __init__(self, buf):
        self.buf = buf
        self.scan = ModelScan([], [])
        self.budget = _Budget()

    def fields(self, span):
        return _fields(self.buf, span[0], span[1], self.budget)

    def sub(self, span, numbers) -> list[tuple[int, int]]:
        return [v for n, w, v in self.fields(span) if n in numbers and w == _LEN]

    def tensor(self, span) -> tuple[str, int, list[int]]:
        """Record the tensor's external data; returns (name, data_type, dims)."""
        buf = self.buf
        name, dtype, dims = "", 0, []
        entries: dict[str, str] = {}
        external = False
        for number, wire, value in self.fields(span):
            if number == 1:
                dims += _int64s(buf, wire, value, self.budget)
            elif number == 2 and wire == _VARINT:
                dtype = value
            elif number == 8 and wire == _LEN:
                name = _text(buf, value)
            elif number == 14 and wire == _VARINT:
                external = value == 1  # DataLocation.EXTERNAL
            elif number == 13 and wire == _LEN:
                key = val = ""
                for n, w, v in self.fields(value):
                    if w == _LEN and n == 1:
                        key = _text(buf, v)
                    elif w == _LEN and n == 2:
                        val = _text(buf, v)
                entries[key] = val
        if "location" in entries or external:
            offset = entries.get("offset")
            length = entries.get("length")
            self.scan.external.append(ExternalRef(
                name, entries.get("location", ""),
                None if offset is None else _size_field(name, "offset", offset),
                None if length is None else _size_field(name, "length", length)))
        return name, dtype, dims

    def sparse(self, span) -> None:
        dims: list[int] = []
        name, dtype = "", 0
        for number, wire, value in self.fields(span):
            if number == 3:
                dims += _int64s(self.buf, wire, value, self.budget)
            elif number in (1, 2) and wire == _LEN:
                t_name, t_dtype, _ = self.tensor(value)
                if number == 1:
                    name, dtype = t_name, t_dtype
        dense = _ELEM_BYTES.get(dtype, 8)
        for d in dims:  # a negative dim reads as a huge varint: refused as too large
            dense = min(dense * d, 1 << 64)  # clamped: dims may be a long packed run
        self.scan.sparse.append(SparseRef(name, tuple(dims), dense))

    def node(self, span, depth: int) -> None:
        for attr in self.sub(span, (5,)):
            for number, wire, value in self.fields(attr):
                if wire != _LEN:
                    continue
                if number in (5, 10):
                    self.tensor(value)
                elif number in (6, 11):
                    self.graph(value, depth + 1)
                elif number in (22, 23):
                    self.sparse(value)

    def graph(self, span, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise OnnxParseError(f"subgraphs nested more than {MAX_GRAPH_DEPTH} deep")
        for number, wire, value in self.fields(span):
            if wire != _LEN:
                continue
            if number == 1:
                self.node(value, depth)
            elif number == 5:
                self.tensor(value)
            elif number == 15:
                self.sparse(value)


def scan_model(model) -> ModelScan:
    """Every external-data reference and sparse tensor of a serialized ModelProto (bytes,
    memoryview or mmap), in file order. Raises ``OnnxParseError`` when the bytes are not a
    well-formed protobuf (or an external-data offset/length is not an integer)."""
    scanner = _Scanner(model)
    for number, wire, value in scanner.fields((0, len(model))):
        if wire != _LEN:
            continue
        if number == 7:
            scanner.graph(value, 0)
        elif number == 25:
            for node in scanner.sub(value, (7,)):
                scanner.node(node, 0)
    return scanner.scan


def external_data_locations(model) -> list[str]:
    """Every external-data ``location`` in a serialized ModelProto, in file order. A tensor
    marked EXTERNAL without a location yields ``""`` (the caller refuses it)."""
    return [ref.location for ref in scan_model(model).external]
