"""Reading (and writing) Caffe ``.caffemodel`` files without Caffe.

A ``.caffemodel`` is a protobuf ``NetParameter``. Only the few fields that carry weights are
decoded, straight from the wire format (varints and length-delimited fields), so no generated
code or ``.proto`` file is needed:

- ``NetParameter``: name 1, ``layers`` 2 (old ``V1LayerParameter``), ``layer`` 100
  (``LayerParameter``)
- ``LayerParameter``: name 1, type 2 (string), bottom 3, top 4, blobs 7
- ``V1LayerParameter``: bottom 2, top 3, name 4, type 5 (enum), blobs 6
- ``BlobProto``: num/channels/height/width 1-4 (legacy 4-D shape), data 5 (packed float),
  shape 7 (``BlobShape``: dim 1, packed int64), double_data 8

Blob data is taken with ``numpy.frombuffer`` in one step per blob (no per-value Python loop).
The writer exists so tests can build Caffe files with known weights for OpenCV to read.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from advpurify.weights.registry import WeightsError

# V1LayerParameter.LayerType (caffe.proto) -> the string type of the new format.
V1_TYPES = {
    0: "None", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data",
    6: "Dropout", 7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output",
    11: "Im2col", 12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN",
    16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid", 20: "Softmax",
    21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise",
    26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData",
    30: "ArgMax", 31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal",
    36: "Silence", 37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution",
}  # fmt: skip
V1_CODES = {name: code for code, name in V1_TYPES.items()}


class CaffeFormatError(WeightsError):
    """A file that is not a well-formed ``.caffemodel`` / prototxt."""


@dataclasses.dataclass
class CaffeBlob:
    data: np.ndarray  # float32, in the blob's shape
    legacy: bool  # shape came from num/channels/height/width (4-D, padded with ones)


@dataclasses.dataclass
class CaffeLayer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    blobs: list[CaffeBlob]


@dataclasses.dataclass
class CaffeModel:
    name: str
    layers: list[CaffeLayer]
    v1: bool  # written in the old V1LayerParameter format

    def layer(self, name: str) -> CaffeLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def blobs(self) -> dict[str, list[CaffeBlob]]:
        """Layer name -> its blobs, for the layers that have any."""
        return {layer.name: layer.blobs for layer in self.layers if layer.blobs}


# --------------------------------------------------------------------------- wire format


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CaffeFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CaffeFormatError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value): ints for varint/fixed, views for bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1:
            if pos + 8 > end:
                raise CaffeFormatError("truncated fixed64")
            yield number, wire, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise CaffeFormatError(f"field {number}: length {length} past the end")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise CaffeFormatError("truncated fixed32")
            yield number, wire, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise CaffeFormatError(f"field {number}: unsupported wire type {wire}")


def _packed_varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _decode_blob(buf: memoryview) -> CaffeBlob:
    legacy_dims = [0, 0, 0, 0]
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    loose: list[float] = []  # non-packed values (rare)
    for number, wire, value in _fields(buf):
        if 1 <= number <= 4 and wire == 0:
            legacy_dims[number - 1] = int(value)
        elif number == 5 and wire == 2:
            chunks.append(np.frombuffer(value, dtype="<f4"))
        elif number == 5 and wire == 5:
            loose.append(struct.unpack("<f", int(value).to_bytes(4, "little"))[0])
        elif number == 8 and wire == 2:
            chunks.append(np.frombuffer(value, dtype="<f8").astype(np.float32))
        elif number == 8 and wire == 1:
            loose.append(struct.unpack("<d", int(value).to_bytes(8, "little"))[0])
        elif number == 7 and wire == 2:
            shape = []
            for sub_number, sub_wire, sub_value in _fields(value):
                if sub_number == 1 and sub_wire == 2:
                    shape.extend(_packed_varints(sub_value))
                elif sub_number == 1 and sub_wire == 0:
                    shape.append(int(sub_value))
    if loose:
        chunks.append(np.array(loose, dtype=np.float32))
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    legacy = shape is None
    dims = legacy_dims if legacy else shape
    if int(np.prod(dims, dtype=np.int64)) != data.size:
        raise CaffeFormatError(f"blob of shape {tuple(dims)} holds {data.size} values")
    return CaffeBlob(data=data.astype(np.float32, copy=False).reshape(dims), legacy=legacy)


def _decode_layer(buf: memoryview, v1: bool) -> CaffeLayer:
    names = {"name": 4, "type": 5, "bottom": 2, "top": 3, "blobs": 6} if v1 else {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7}  # fmt: skip
    name, type_, bottoms, tops, blobs = "", "", [], [], []
    for number, wire, value in _fields(buf):
        if number == names["name"] and wire == 2:
            name = bytes(value).decode("utf-8")
        elif number == names["type"]:
            if v1 and wire == 0:
                type_ = V1_TYPES.get(int(value), f"V1Type{value}")
            elif wire == 2:
                type_ = bytes(value).decode("utf-8")
        elif number == names["bottom"] and wire == 2:
            bottoms.append(bytes(value).decode("utf-8"))
        elif number == names["top"] and wire == 2:
            tops.append(bytes(value).decode("utf-8"))
        elif number == names["blobs"] and wire == 2:
            try:
                blobs.append(_decode_blob(value))
            except CaffeFormatError as error:
                raise CaffeFormatError(f"layer {name or '?'}: {error}") from None
    return CaffeLayer(name=name, type=type_, bottoms=bottoms, tops=tops, blobs=blobs)


def parse_caffemodel(data: bytes | memoryview) -> CaffeModel:
    buf = memoryview(data)
    name, layers, v1_layers = "", [], []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif number == 100 and wire == 2:
            layers.append(_decode_layer(value, v1=False))
        elif number == 2 and wire == 2:
            v1_layers.append(_decode_layer(value, v1=True))
    if layers and v1_layers:
        raise CaffeFormatError("mixes new (layer) and V1 (layers) layer formats")
    if not layers and not v1_layers:
        raise CaffeFormatError("no layers found (not a NetParameter?)")
    return CaffeModel(name=name, layers=layers or v1_layers, v1=not layers)


def read_caffemodel(path: Path | str) -> CaffeModel:
    """Decode a ``.caffemodel``; a malformed file raises :class:`CaffeFormatError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightsError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return parse_caffemodel(data)
    except CaffeFormatError as error:
        raise CaffeFormatError(f"{path}: not a valid .caffemodel ({error})") from None


def read_blobproto(path: Path | str) -> np.ndarray:
    """A lone ``BlobProto`` file (``imagenet_mean.binaryproto``) as a float32 array."""
    path = Path(path)
    try:
        blob = _decode_blob(memoryview(path.read_bytes()))
    except CaffeFormatError as error:
        raise CaffeFormatError(f"{path}: not a valid .binaryproto ({error})") from None
    return blob.data


def blobs_state_dict(model: CaffeModel) -> dict[str, torch.Tensor]:
    """Every blob keyed ``<layer name>.<blob index>`` (0 = weights, 1 = bias), Caffe shapes."""
    state = {}
    for layer in model.layers:
        for index, blob in enumerate(layer.blobs):
            state[f"{layer.name}.{index}"] = torch.from_numpy(blob.data.copy())
    return state


def convert_caffemodel(path: Path) -> dict[str, torch.Tensor]:
    """Converter for any Caffe model: its blobs as ``<layer>.<index>`` (``weights convert``)."""
    state = blobs_state_dict(read_caffemodel(path))
    if not state:
        raise CaffeFormatError(f"{path}: no layer has weights")
    return state


def fit_blob(key: str, tensor: torch.Tensor, shape: Sequence[int], legacy: bool) -> torch.Tensor:
    """Return ``tensor`` in ``shape``; old-format blobs (padded 4-D) may be reshaped."""
    shape = tuple(shape)
    if tuple(tensor.shape) == shape:
        return tensor
    if legacy and tensor.numel() == int(np.prod(shape)):
        squeezed = [d for d in tensor.shape if d != 1]
        if squeezed == [d for d in shape if d != 1]:
            return tensor.reshape(shape)
    raise WeightsError(f"{key}: shape {tuple(tensor.shape)}, expected {shape}")


# --------------------------------------------------------------------------- writer


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _field_varint(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value)


def encode_blob(array: np.ndarray, legacy: bool = False) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    if legacy:
        dims = (1,) * (4 - array.ndim) + tuple(array.shape)
        head = b"".join(_field_varint(i + 1, d) for i, d in enumerate(dims))
    else:
        packed = b"".join(_encode_varint(d) for d in array.shape)
        head = _field_bytes(7, _field_bytes(1, packed))
    return head + _field_bytes(5, array.tobytes())


def encode_caffemodel(
    layers: Sequence[tuple[str, str, Sequence[np.ndarray]]], name: str = "", v1: bool = False
) -> bytes:
    """A ``NetParameter`` with ``(layer name, type, blobs)``; V1 uses the old field numbers."""
    out = [_field_bytes(1, name.encode())] if name else []
    for layer_name, type_, blobs in layers:
        if v1:
            body = _field_bytes(4, layer_name.encode()) + _field_varint(5, V1_CODES[type_])
            body += b"".join(_field_bytes(6, encode_blob(b, legacy=True)) for b in blobs)
            out.append(_field_bytes(2, body))
        else:
            body = _field_bytes(1, layer_name.encode()) + _field_bytes(2, type_.encode())
            body += b"".join(_field_bytes(7, encode_blob(b)) for b in blobs)
            out.append(_field_bytes(100, body))
    return b"".join(out)


def write_caffemodel(
    path: Path | str, layers: Sequence[tuple[str, str, Sequence[np.ndarray]]], **kwargs
) -> Path:
    path = Path(path)
    path.write_bytes(encode_caffemodel(layers, **kwargs))
    return path
