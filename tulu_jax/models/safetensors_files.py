"""Safetensors files laid out before any tensor arrives, then filled in any order, from any thread.

The format (as the huggingface/safetensors README describes it): an 8-byte little-endian header
length N, N bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, padded
with spaces to a multiple of 8), then the tensors' raw C-order bytes, back to back, offsets counted from
the end of the header. Knowing every tensor's name, shape and dtype in advance fixes every offset, so each
tensor can go straight from the array that holds it to its place in the file (`os.pwrite`, which releases
the GIL): no `tobytes` copy, no in-memory file, and several writer threads at once.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

# Our export dtypes -> safetensors' dtype tags.
DTYPE_TAGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to store: its name, shape and dtype (a key of DTYPE_TAGS)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data in the file (elements x itemsize of `dtype`; bfloat16 is 2)."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_np_dtype(self.dtype)).itemsize


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def split_files(specs: list[TensorSpec], max_file_bytes: int) -> list[list[TensorSpec]]:
    """`specs` in order, cut into files of at most `max_file_bytes` of tensor data each (a tensor larger
    than that gets a file of its own)."""
    files: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not files or (files[-1] and size + spec.nbytes > max_file_bytes):
            files.append([])
            size = 0
        files[-1].append(spec)
        size += spec.nbytes
    return files


def file_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsWriter:
    """Creates the files of `layout` ([file name, its tensors] pairs) in `folder`, each with its header
    written and its final size set; `write(name, array)` then stores one tensor at its place. Close it (or
    use it as a context manager) when every tensor is written; `missing()` names those never written.

    `write` raises ValueError when the array's shape or dtype differs from the declared one."""

    def __init__(self, folder: str, layout: list[tuple[str, list[TensorSpec]]], metadata: dict[str, str]):
        self._slots: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, absolute offset, spec)
        self._fds: list[int] = []
        self._written: set[str] = set()
        self.weight_map: dict[str, str] = {}
        for fname, specs in layout:
            header, begin = {"__metadata__": dict(metadata)}, 0
            for spec in specs:
                header[spec.name] = {
                    "dtype": DTYPE_TAGS[spec.dtype],
                    "shape": list(spec.shape),
                    "data_offsets": [begin, begin + spec.nbytes],
                }
                begin += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads
            fd = os.open(os.path.join(folder, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + begin)
            start = 8 + len(raw)
            for spec in specs:
                self._slots[spec.name] = (fd, start + header[spec.name]["data_offsets"][0], spec)
                self.weight_map[spec.name] = fname

    def write(self, name: str, array: np.ndarray) -> None:
        """Stores `array` (numpy, any layout; the declared shape and dtype) as tensor `name`. Thread-safe."""
        fd, offset, spec = self._slots[name]
        if tuple(array.shape) != spec.shape or array.dtype != _np_dtype(spec.dtype):
            raise ValueError(
                f"tensor {name}: got {array.dtype}{list(array.shape)}, declared {spec.dtype}{list(spec.shape)}"
            )
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        while data:  # one call moves at most ~2 GiB on Linux
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done
        self._written.add(name)

    def missing(self) -> list[str]:
        """Declared tensors not written yet."""
        return sorted(set(self._slots) - self._written)

    def close(self) -> None:
        """Closes every file (the tensors' bytes are in them as soon as `write` returns)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
