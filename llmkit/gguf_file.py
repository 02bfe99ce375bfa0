"""A GGUF file's header in one pass: its metadata as Python values, its tensor table, the tensors memory-mapped.

Why llmkit reads the header itself: `gguf.GGUFReader` builds numpy views for every element of every metadata array,
so opening Gemma 3 270M (a 262,144-token vocabulary with scores and types) takes ~25 s, and a model load opens the
file twice (weights, tokenizer). Here a string array is one loop over the mapped bytes and a numeric array one
`np.frombuffer`: 0.25 s. The gguf package stays the reference (tests compare every field and tensor with its reader)
and supplies the type enums and block sizes.

The format (GGUF v2 and v3, little-endian):

    b"GGUF" | uint32 version | uint64 tensor count | uint64 metadata count
    metadata entry: string key | uint32 value type | value
        string = uint64 length + UTF-8 bytes; array = uint32 item type | uint64 count | items (arrays may nest)
    tensor entry:   string name | uint32 n_dims | uint64 dims[n_dims] (innermost first) | uint32 ggml type |
                    uint64 offset into the data section
    data section:   starts at the first multiple of general.alignment (default 32) after the tensor entries

A tensor's `data` is laid out as gguf's reader lays it out: F32/F16/F64 and the integer types as their numpy dtype
in numpy order (outermost first); every block type (and BF16) as uint8 rows of bytes, (..., bytes per row).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# scalar value types: struct format and numpy dtype (little-endian)
SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
           GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
           GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
# tensor types held as their values rather than as rows of bytes
VALUE_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: innermost first
    n_elements: int
    n_bytes: int
    data: np.ndarray  # a view of the memory map (module docstring)


class _Cursor:
    """Reads little-endian values from the mapped bytes, front to back; running past the end is a ValueError."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.at = buffer, 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.at + size > len(self.buffer):
            raise ValueError(f"the header runs past the end of the file (byte {self.at} + {size})")
        piece = self.buffer[self.at:self.at + size]
        self.at += size
        return piece

    def scalar(self, code: str) -> Any:
        size = struct.calcsize(code)
        return struct.unpack_from("<" + code, self.take(size))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8")

    def value(self, kind: int) -> Any:
        kind = GGUFValueType(kind)
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array()
        return self.scalar(SCALARS[kind])

    def array(self) -> list:
        kind, count = GGUFValueType(self.scalar("I")), self.scalar("Q")
        if kind in SCALARS:  # one read for the whole array
            dtype = np.dtype("<" + SCALARS[kind])
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        if kind == GGUFValueType.STRING:  # a vocabulary: the loop of `string`, inlined
            buffer, at, strings = self.buffer, self.at, []
            for _ in range(count):
                if at + 8 > len(buffer):
                    raise ValueError("a string array runs past the end of the file")
                (size,) = struct.unpack_from("<Q", buffer, at)
                if at + 8 + size > len(buffer):
                    raise ValueError("a string array runs past the end of the file")
                strings.append(str(buffer[at + 8:at + 8 + size], "utf-8"))
                at += 8 + size
            self.at = at
            return strings
        return [self.value(kind) for _ in range(count)]


class GgufFile:
    """An open GGUF file: `fields` (key -> value: int, float, bool, str or list), `tensors` (file order), `path`.
    Raises ValueError on a file that is not GGUF, truncated or inconsistent (callers name the file and the fix)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self.map))
        if bytes(cursor.take(4)) != MAGIC:
            raise ValueError("it does not start with the GGUF magic bytes")
        version = cursor.scalar("I")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} is not one of {VERSIONS}")
        n_tensors, n_fields = cursor.scalar("Q"), cursor.scalar("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cursor.string()
            self.fields[key] = cursor.value(cursor.scalar("I"))
        entries = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
            entries.append((name, dims, GGMLQuantizationType(cursor.scalar("I")), cursor.scalar("Q")))
        alignment = self.fields.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise ValueError(f"{ALIGNMENT_KEY} is {alignment!r}, not a positive integer")
        start = -(-cursor.at // alignment) * alignment
        self.tensors = [self._tensor(start, *entry) for entry in entries]
        if len({tensor.name for tensor in self.tensors}) != len(self.tensors):
            raise ValueError("two tensors share a name")

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType,
                offset: int) -> GgufTensor:
        n_elements = int(np.prod(dims, dtype=np.int64))
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}'s rows of {dims[0]} values are not whole {kind.name} blocks of {block}")
        n_bytes = n_elements // block * block_bytes
        begin = start + offset
        if begin + n_bytes > len(self.map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        shape = tuple(reversed(dims))  # numpy order
        raw = self.map[begin:begin + n_bytes]
        if kind in VALUE_DTYPES:
            data = raw.view(VALUE_DTYPES[kind]).reshape(shape)
        else:  # rows of bytes: the innermost dimension in blocks
            data = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes) if shape else raw
        return GgufTensor(name, kind, dims, n_elements, n_bytes, data)
