"""What a bundle needs to know about an ONNX file, read without the ``onnx`` package and without the weights.

The runtime's base install has onnxruntime but not ``onnx``, and creating an onnxruntime session
would load (and optimise) every weight. The loader only needs the graph's inputs and outputs (names,
element types, shapes), the external-data files its tensors point to and the model's ``metadata_props``
(export records the head's gene names there), so this module walks the
protobuf wire format of ``ModelProto`` directly over a read-only memory map: tensor payloads
(``raw_data``) are skipped by length, never copied.

Field numbers are those of ``onnx/onnx.proto`` (proto2, stable since IR version 3).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OnnxFormatError", "OnnxGraphInfo", "TensorInfo", "graph_tile_layout", "read_onnx_graph"]

# ModelProto / GraphProto / NodeProto / AttributeProto / TensorProto / ValueInfoProto field numbers.
_MODEL_GRAPH, _MODEL_METADATA = 7, 14  # ModelProto.graph, ModelProto.metadata_props
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE = 1, 5, 11, 12, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed ONNX ``ModelProto`` (the message says where it broke)."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, ONNX element type (1 = float, 2 = uint8, …) and shape.

    ``shape`` holds a static size per dimension, ``None`` for a dynamic (named or unknown) one.
    """

    name: str
    elem_type: int
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class OnnxGraphInfo:
    """The main graph's real inputs (initializers excluded) and outputs, every external-data location, and
    the model's ``metadata_props`` (``{key: value}``; the last entry wins for a repeated key)."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    external_data: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorInfo | None:
        """The input called ``name``, or ``None``."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        """The output called ``name``, or ``None``."""
        return next((t for t in self.outputs if t.name == name), None)


# ------------------------------------------------------------------------------------------ wire format


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError(f"truncated or overlong varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, Any]]:
    """``(field number, value)`` of one message: an int (varint) or ``(start, end)`` (length-delimited)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise OnnxFormatError(f"unsupported wire type {wire} (field {field}) at byte {pos}")
        if pos > end:
            raise OnnxFormatError(f"field {field} runs past the end of its message (byte {end})")
        yield field, value


def _sub(buf: Any, start: int, end: int, field: int) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` spans of every length-delimited ``field`` of a message."""
    for f, v in _fields(buf, start, end):
        if f == field and isinstance(v, tuple):
            yield v


def _text(buf: Any, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ messages


def _value_info(buf: Any, start: int, end: int) -> TensorInfo:
    """ValueInfoProto → name, TypeProto.tensor_type.elem_type and shape."""
    name, elem, dims = "", 0, []
    for f, v in _fields(buf, start, end):
        if f == 1 and isinstance(v, tuple):
            name = _text(buf, v)
        elif f == 2 and isinstance(v, tuple):
            for tensor_type in _sub(buf, *v, 1):  # TypeProto.tensor_type
                for tf, tv in _fields(buf, *tensor_type):
                    if tf == 1 and isinstance(tv, int):
                        elem = tv
                    elif tf == 2 and isinstance(tv, tuple):  # TensorShapeProto
                        dims = [_dim(buf, *d) for d in _sub(buf, *tv, 1)]
    return TensorInfo(name=name, elem_type=elem, shape=tuple(dims))


def _dim(buf: Any, start: int, end: int) -> int | None:
    for f, v in _fields(buf, start, end):
        if f == 1 and isinstance(v, int):
            return v
    return None


def _tensor(buf: Any, start: int, end: int) -> tuple[str, str | None]:
    """TensorProto → (name, external-data location or ``None``)."""
    name, location, external = "", None, False
    for f, v in _fields(buf, start, end):
        if f == _TENSOR_NAME and isinstance(v, tuple):
            name = _text(buf, v)
        elif f == _TENSOR_LOCATION and isinstance(v, int):
            external = v == _EXTERNAL
        elif f == _TENSOR_EXTERNAL and isinstance(v, tuple):  # StringStringEntryProto {1: key, 2: value}
            kv = {k: span for k, span in _fields(buf, *v) if isinstance(span, tuple)}
            if 1 in kv and 2 in kv and _text(buf, kv[1]) == "location":
                location = _text(buf, kv[2])
    return name, (location if external else None)


def _graph_tensors(buf: Any, start: int, end: int) -> Iterator[tuple[str, str | None]]:
    """Every tensor of a graph: initializers, sparse initializers and node-attribute tensors, subgraphs included."""
    for f, v in _fields(buf, start, end):
        if not isinstance(v, tuple):
            continue
        if f == _GRAPH_INITIALIZER:
            yield _tensor(buf, *v)
        elif f == _GRAPH_SPARSE:
            yield from _sparse(buf, *v)
        elif f == _GRAPH_NODE:
            for attr in _sub(buf, *v, _NODE_ATTRIBUTE):
                yield from _attribute_tensors(buf, *attr)


def _sparse(buf: Any, start: int, end: int) -> Iterator[tuple[str, str | None]]:
    for f, v in _fields(buf, start, end):
        if f in (_SPARSE_VALUES, _SPARSE_INDICES) and isinstance(v, tuple):
            yield _tensor(buf, *v)


def _attribute_tensors(buf: Any, start: int, end: int) -> Iterator[tuple[str, str | None]]:
    for f, v in _fields(buf, start, end):
        if not isinstance(v, tuple):
            continue
        if f in (_ATTR_T, _ATTR_TENSORS):
            yield _tensor(buf, *v)
        elif f in (_ATTR_G, _ATTR_GRAPHS):
            yield from _graph_tensors(buf, *v)
        elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse(buf, *v)


def _graph_info(buf: Any, start: int, end: int) -> OnnxGraphInfo:
    inputs, outputs, initialised, external = [], [], set(), {}
    for name, location in _graph_tensors(buf, start, end):
        initialised.add(name)
        if location is not None:
            external[location] = None
    for f, v in _fields(buf, start, end):
        if f == _GRAPH_INPUT and isinstance(v, tuple):
            inputs.append(_value_info(buf, *v))
        elif f == _GRAPH_OUTPUT and isinstance(v, tuple):
            outputs.append(_value_info(buf, *v))
    real = tuple(t for t in inputs if t.name not in initialised)  # IR < 4 lists initializers as inputs
    return OnnxGraphInfo(inputs=real, outputs=tuple(outputs), external_data=tuple(external))


def _metadata(buf: Any, span: tuple[int, int]) -> tuple[str, str]:
    """StringStringEntryProto {1: key, 2: value} → ``(key, value)``."""
    kv = {f: v for f, v in _fields(buf, *span) if isinstance(v, tuple)}
    return (_text(buf, kv[1]) if 1 in kv else ""), (_text(buf, kv[2]) if 2 in kv else "")


def read_onnx_graph(path: str | Path) -> OnnxGraphInfo:
    """Inputs, outputs, external-data locations and ``metadata_props`` of the ONNX model at ``path``.

    Raises :class:`OnnxFormatError` when the file is empty, truncated or not an ONNX model, and
    ``OSError`` when it cannot be read. Memory use is independent of the weights' size.
    """
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise OnnxFormatError("the file is empty") from e
    with buf:
        graphs, metadata = [], {}
        for f, v in _fields(buf, 0, len(buf)):
            if f == _MODEL_GRAPH and isinstance(v, tuple):
                graphs.append(v)
            elif f == _MODEL_METADATA and isinstance(v, tuple):
                key, value = _metadata(buf, v)
                metadata[key] = value
        if not graphs:
            raise OnnxFormatError("no graph in the file (not an ONNX model)")
        info = _graph_info(buf, *graphs[-1])
        return OnnxGraphInfo(inputs=info.inputs, outputs=info.outputs, external_data=info.external_data,
                             metadata=metadata)


def graph_tile_layout(path: str | Path) -> str:
    """The tile layout (``NHWC`` / ``NCHW``) of the encoder graph at ``path``, from its ``tiles`` input's shape
    (:func:`~hishrst_runtime.core.patches.shape_tile_layout`); :class:`OnnxFormatError` when it has no ``tiles``."""
    from hishrst_runtime.core.patches import shape_tile_layout

    tiles = read_onnx_graph(path).input("tiles")
    if tiles is None:
        raise OnnxFormatError(f"{path}: no 'tiles' input (not an encoder graph)")
    return shape_tile_layout(tiles.shape)
