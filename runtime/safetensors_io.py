"""safetensors files read and written without a second copy of the data.

safetensors' own loaders copy tensors out of a memory map of the file, whose pages count in resident memory while
it is open, and its writers build each tensor's bytes in memory before writing: a multi-GB checkpoint or artifact
costs its size twice. The format is simple (an 8-byte little-endian header length, a JSON header with each tensor's
dtype, shape and data offsets, then the data), so tensors are read straight into their own storage and written
straight from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                "F64": torch.float64}
CODES = {v: k for k, v in TORCH_DTYPES.items()}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_into(f, path, name: str, info: dict, data_start: int, buffer: memoryview) -> None:
    """Read tensor `name`'s bytes into `buffer` (exactly its size) from the open file `f`."""
    begin, end = info["data_offsets"]
    if end - begin != buffer.nbytes:
        raise OSError(f"{path}: tensor {name} has {end - begin} bytes, its shape and dtype need {buffer.nbytes}")
    f.seek(data_start + begin)
    done = 0
    while done < end - begin:  # one read() returns at most about 2 GB
        got = f.readinto(buffer[done:])
        if not got:
            raise OSError(f"{path}: file ends inside tensor {name}")
        done += got


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.bool):
        flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


def iter_tensors(path: str | os.PathLike, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file (all, or `names`), each read from the file into fresh storage."""
    header, start = read_header(path)
    wanted = list(header) if names is None else [n for n in header if n in set(names)]
    with open(path, "rb", buffering=0) as f:
        for name in wanted:
            info = header[name]
            if info["dtype"] not in TORCH_DTYPES:
                raise OSError(f"{path}: tensor {name} has dtype {info['dtype']}, which vlmc does not read")
            tensor = torch.empty(info["shape"], dtype=TORCH_DTYPES[info["dtype"]])
            read_into(f, path, name, info, start, _bytes_view(tensor))
            yield name, tensor


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor | np.ndarray]) -> None:
    """Write tensors (torch or numpy, any dtype torch has) as a safetensors file, straight from their storage."""
    # reshape: ascontiguousarray makes a 0-d array 1-d
    items = {n: (t if torch.is_tensor(t) else torch.from_numpy(np.ascontiguousarray(t).reshape(np.shape(t))))
             .detach().cpu().contiguous() for n, t in tensors.items()}
    header, offset = {}, 0
    for name, t in items.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in items.values():
            if t.numel():
                f.write(_bytes_view(t))


def write_streaming(path: str | os.PathLike, specs: list[tuple[str, torch.dtype, list[int]]], produce) -> None:
    """Write a safetensors file whose tensors are made one at a time: `specs` (name, dtype, shape) in file order,
    `produce(name)` returns each tensor; only one is in memory at once (for checkpoints larger than memory)."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape in specs:
            t = produce(name).to(dtype).contiguous()
            if list(t.shape) != list(shape):
                raise ValueError(f"{name}: produced shape {list(t.shape)}, expected {list(shape)}")
            if t.numel():
                f.write(_bytes_view(t))
