"""GGUF reader: header, metadata and tensor index parsed with struct over an mmap; tensor data zero-copy.

gguf.GGUFReader builds a numpy view per array element and takes ~7 s on a 150k-token vocabulary; a struct
parse of the same header takes ~0.2 s, so we parse ourselves and use the `gguf` package for constants and
dequantization only. Every malformed input raises GGUFError naming the problem.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4  # arrays of arrays: real files use none; gguf-py can write a few levels
# Every key/value needs >= 13 bytes (key length, type, a 1-byte value), every tensor info >= 32 (name length, rank,
# one dimension, type, offset): counts are bounded by the file size first, then by these caps (real models have
# ~50 keys and < 10k tensors), so absurd files fail in microseconds instead of parsing for minutes.
MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES = 13, 32
MAX_METADATA_KEYS, MAX_TENSORS = 1 << 16, 1 << 18
_U64 = struct.Struct("<Q")

# GGUF value type id -> struct format (scalars); 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}
# Typed views for unquantized tensors (numpy order); everything else is raw uint8 rows.
_PLAIN_DTYPE = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated or uses something we cannot load."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] = ne0, the contiguous (row) dimension
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rows(self) -> int:
        return self.n_elements // self.shape[0]


class GGUFFile:
    """An open GGUF file: `kv` metadata dict, `tensors` index (GGUF names kept), zero-copy tensor data."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: file too small for a GGUF header ({size} bytes)")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e}") from e
        self.size = size
        self._off = 0
        self.kv: dict[str, Any] = {}  # scalars as Python values, strings as str, numeric arrays as numpy arrays
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # --- primitive readers, all bounds-checked -------------------------------------------------------------
    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._off + n > self.size:
            raise GGUFError(f"{self.path}: truncated while reading {what} at byte {self._off} "
                            f"(need {n} bytes, file has {self.size})")

    def _take(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize("<" + fmt)
        self._need(n, what)
        v = struct.unpack_from("<" + fmt, self._mmap, self._off)
        self._off += n
        return v

    def _string(self, what: str) -> str:
        (n,) = self._take("Q", what + " length")
        if n > self.size - self._off:
            raise GGUFError(f"{self.path}: {what} claims {n} bytes, more than the {self.size - self._off} left")
        raw = self._mmap[self._off:self._off + n]
        self._off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from e

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self._take(_SCALAR[vtype], f"value of {key!r}")[0]
        if vtype == 8:
            return self._string(f"value of {key!r}")
        if vtype == 9:
            return self._array(key)
        raise GGUFError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")

    def _array(self, key: str) -> Any:
        """An array value, read iteratively: arrays of arrays nest at most MAX_ARRAY_DEPTH deep."""
        parents: list[tuple[list, int]] = []  # the enclosing arrays of arrays: (elements so far, element count)
        while True:
            itype, n = self._take("IQ", f"array header of {key!r}")
            left = self.size - self._off
            if itype == 9:
                if len(parents) + 1 >= MAX_ARRAY_DEPTH:
                    raise GGUFError(f"{self.path}: array {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
                if n * 12 > left:  # every element needs at least its own 12-byte array header
                    raise GGUFError(f"{self.path}: array {key!r} claims {n} elements, past the end of the file")
                if n:
                    parents.append(([], n))
                    continue
                value: Any = []
            elif itype in _SCALAR:
                width = struct.calcsize(_SCALAR[itype])
                if n * width > left:
                    raise GGUFError(f"{self.path}: array {key!r} claims {n} elements, past the end of the file")
                # a numpy copy: 4 bytes a float of a 262k-token vocabulary's scores instead of a Python float's 32
                value = np.frombuffer(self._mmap, _NP_SCALAR[itype], n, self._off).copy()
                self._off += n * width
            elif itype == 8:
                if n * 8 > left:  # every element needs at least an 8-byte length
                    raise GGUFError(f"{self.path}: array {key!r} claims {n} elements, past the end of the file")
                value = self._strings(n, key)
            else:
                raise GGUFError(f"{self.path}: array {key!r} has unknown element type {itype}")
            while parents:  # close every array this value completes
                elements, count = parents[-1]
                elements.append(value)
                if len(elements) < count:
                    break
                parents.pop()
                value = elements
            else:
                return value

    def _strings(self, n: int, key: str) -> list[str]:
        """n length-prefixed strings: the vocabulary's loop, kept tight (one bounds check per string)."""
        mm, off, size, out = self._mmap, self._off, self.size, []
        unpack = _U64.unpack_from
        try:
            for _ in range(n):
                if off + 8 > size:
                    raise GGUFError(f"{self.path}: truncated in string {len(out)} of array {key!r}")
                end = off + 8 + unpack(mm, off)[0]
                if end > size:
                    raise GGUFError(f"{self.path}: string {len(out)} of array {key!r} runs past the end of the file")
                out.append(mm[off + 8:end].decode("utf-8"))
                off = end
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: string {len(out)} of array {key!r} is not valid UTF-8") from None
        self._off = off
        return out

    # --- the file ------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        magic = self._mmap[:4]
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self._off = 4
        (version,) = self._take("I", "version")
        if version not in (2, 3):
            hint = " (big-endian file?)" if version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}{hint}; versions 2 and 3 load")
        n_tensors, n_kv = self._take("QQ", "counts")
        if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > self.size - self._off:
            raise GGUFError(f"{self.path}: absurd counts: {n_tensors} tensors and {n_kv} metadata keys, more than "
                            f"a {self.size}-byte file can hold")
        if n_kv > MAX_METADATA_KEYS or n_tensors > MAX_TENSORS:
            raise GGUFError(f"{self.path}: absurd counts: {n_tensors} tensors and {n_kv} metadata keys (at most "
                            f"{MAX_TENSORS} and {MAX_METADATA_KEYS} load)")
        for _ in range(n_kv):
            key = self._string("metadata key")
            (vtype,) = self._take("I", f"type of {key!r}")
            if key in self.kv:
                raise GGUFError(f"{self.path}: duplicate metadata key {key!r}")
            self.kv[key] = self._value(vtype, key)
        infos, seen = [], set()
        for _ in range(n_tensors):
            name = self._string("tensor name")
            (nd,) = self._take("I", f"rank of tensor {name!r}")
            if not 1 <= nd <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {nd} dimensions (1..{MAX_DIMS} allowed)")
            dims = self._take(f"{nd}Q", f"shape of tensor {name!r}")
            type_id, rel = self._take("IQ", f"type of tensor {name!r}")
            try:
                ttype = GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown type id {type_id}") from None
            if ttype not in GGML_QUANT_SIZES:
                raise GGUFError(f"{self.path}: tensor {name!r} has type {ttype.name} with no known block size")
            if name in seen:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            seen.add(name)
            infos.append((name, dims, ttype, rel))
        align = self.kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_offset = -(-self._off // align) * align
        for name, dims, ttype, rel in infos:
            block, type_size = GGML_QUANT_SIZES[ttype]
            if any(d <= 0 for d in dims) or dims[0] % block:
                raise GGUFError(f"{self.path}: tensor {name!r} shape {list(dims)} does not fit {ttype.name} "
                                f"blocks of {block}")
            n = 1
            for d in dims:
                n *= d
            nbytes = n // block * type_size
            start = self.data_offset + rel
            if rel % align or start + nbytes > self.size:
                raise GGUFError(f"{self.path}: tensor {name!r} ({nbytes} bytes at offset {start}) lies outside "
                                f"the file ({self.size} bytes) or is misaligned")
            self.tensors[name] = TensorInfo(name, tuple(int(d) for d in dims), ttype, start, nbytes)

    # --- access ----------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.kv.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view: typed array in numpy order for plain types, uint8 (rows, bytes_per_row) otherwise."""
        t = self.tensor(name)
        np_shape = tuple(reversed(t.shape))
        if t.type in _PLAIN_DTYPE:
            dt = np.dtype(_PLAIN_DTYPE[t.type]).newbyteorder("<")
            return np.frombuffer(self._mmap, dt, t.n_elements, t.offset).reshape(np_shape)
        row_bytes = t.nbytes // t.rows
        return np.frombuffer(self._mmap, np.uint8, t.nbytes, t.offset).reshape(*np_shape[:-1], row_bytes)

    def dequantize(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 values in numpy order (optionally only some rows of a 2-D tensor), via gguf.quants."""
        t = self.tensor(name)
        data = self.raw(name)
        if rows is not None:
            data = data[rows]
        return dequantize(data, t.type, t.name)

    def close(self) -> None:
        self._mmap.close()


def dequantize(data: np.ndarray, ttype: GGMLQuantizationType, name: str = "tensor") -> np.ndarray:
    """float32 values of raw GGUF data (as returned by GGUFFile.raw) through gguf.quants."""
    from gguf import quants

    try:
        out = quants.dequantize(data, ttype)
    except NotImplementedError:
        raise GGUFError(f"{name}: tensor type {ttype.name} cannot be dequantized by gguf.quants") from None
    return np.ascontiguousarray(out, dtype=np.float32)
