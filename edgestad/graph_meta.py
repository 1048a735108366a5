"""Read and rewrite an ONNX model's ``metadata_props`` without onnx or torch.

The runtime (onnxruntime only) must check the thresholds baked into a graph's metadata, and
``edgestad thresholds`` must rewrite them on a device that has no ``onnx`` package. Both only
touch top-level fields of the ``ModelProto`` message: field 14 is ``repeated
StringStringEntryProto metadata_props`` (key = field 1, value = field 2). Every other field
(the graph, opsets, ...) is copied byte for byte, so the network is untouched.
"""
from __future__ import annotations

import json
from typing import Iterator, Mapping

METADATA_FIELD = 14
_KEY_FIELD, _VALUE_FIELD = 1, 2


class GraphMetadataError(ValueError):
    """The bytes are not a parseable ONNX model."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise GraphMetadataError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphMetadataError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of the payload, end of the payload,
    end of the field) for each top-level field."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, end = _varint(data, pos)
            yield number, wire, start, pos, end, end
            pos = end
        elif wire == 1:
            end = pos + 8
            yield number, wire, start, pos, end, end
            pos = end
        elif wire == 2:
            length, payload = _varint(data, pos)
            end = payload + length
            if end > len(data):
                raise GraphMetadataError("truncated field")
            yield number, wire, start, payload, end, end
            pos = end
        elif wire == 5:
            end = pos + 4
            yield number, wire, start, pos, end, end
            pos = end
        else:
            raise GraphMetadataError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise GraphMetadataError("truncated field")


def _entry(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire, _, payload, end, _ in _fields(data):
        if wire != 2:
            continue
        if number == _KEY_FIELD:
            key = data[payload:end].decode("utf-8")
        elif number == _VALUE_FIELD:
            value = data[payload:end].decode("utf-8")
    return key, value


def read_metadata(model: bytes) -> dict[str, str]:
    """``{key: value}`` of a serialized ONNX model's metadata_props."""
    out: dict[str, str] = {}
    try:
        for number, wire, _, payload, end, _ in _fields(model):
            if number == METADATA_FIELD and wire == 2:
                key, value = _entry(model[payload:end])
                out[key] = value
    except UnicodeDecodeError as exc:
        raise GraphMetadataError(f"metadata is not UTF-8: {exc}") from None
    return out


def _encode_entry(key: str, value: str) -> bytes:
    body = b""
    for number, text in ((_KEY_FIELD, key), (_VALUE_FIELD, value)):
        raw = text.encode("utf-8")
        body += _encode_varint(number << 3 | 2) + _encode_varint(len(raw)) + raw
    return _encode_varint(METADATA_FIELD << 3 | 2) + _encode_varint(len(body)) + body


def set_metadata(model: bytes, props: Mapping[str, object]) -> bytes:
    """The model with ``props`` set in metadata_props (other entries and fields kept; non-string
    values stored as JSON, as export/graph.py does)."""
    texts = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in props.items()}
    out = bytearray()
    for number, wire, start, payload, end, stop in _fields(model):
        if number == METADATA_FIELD and wire == 2 and _entry(model[payload:end])[0] in texts:
            continue
        out += model[start:stop]
    for key, value in texts.items():
        out += _encode_entry(key, value)
    return bytes(out)
