"""Loading and running compiled artifacts: manifests, parameters, graphs and the buffers they read in place.

The runtimes load artifacts through this module and the compiler writes them with compile/artifact.py, which
imports the shared format (file names, manifest checks) from here, so no runtime module depends on the compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import VlmcError

# 2: prefill graphs take no cache inputs; fused q/k/v and gate/up parameters; 3: prompt key ranges; 4: visual graphs
# declare their inputs (graph_inputs) and output groups (output_groups)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"


def visual_graph_file(bucket: int, budget: int) -> str:
    """The library of one compiled patch budget: visual.so for the full budget, visual_<n>.so for smaller ones."""
    return "visual.so" if bucket == budget else f"visual_{bucket}.so"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


QUICK_BYTES = 1 << 20


def quick_sha256(path: Path) -> str:
    """sha256 of a file's first and last MiB (the whole file when smaller): what every load checks, so that a
    truncated, re-written or half-copied file is caught without reading gigabytes of parameters."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(QUICK_BYTES))
        if size > QUICK_BYTES:
            f.seek(max(QUICK_BYTES, size - QUICK_BYTES))
            digest.update(f.read(QUICK_BYTES))
    return digest.hexdigest()


def read_manifest(folder: str | Path, kind: str | None = None, verify: bool = False) -> dict:
    """Load and check an artifact's manifest and every listed file's size and quick hash (see quick_sha256);
    `verify` checks each file's full sha256 too (`vlmc verify`, `--verify`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise VlmcError(f"artifact {folder} does not exist")
    if not path.is_file():
        raise VlmcError(f"{folder} is not a vlmc artifact (no {MANIFEST}); was the compile interrupted?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlmcError(f"{path}: corrupted manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise VlmcError(f"{folder}: artifact format {manifest.get('format_version')} is not supported "
                        f"(this vlmc reads {FORMAT_VERSION}); recompile it")
    if kind and manifest.get("kind") != kind:
        raise VlmcError(f"{folder} is a {manifest.get('kind')} artifact, not a {kind} artifact")
    for name, info in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise VlmcError(f"{folder}: file {name} listed in the manifest is missing")
        quick = info.get("quick_sha256")
        if (file.stat().st_size != info["bytes"] or (quick is not None and quick_sha256(file) != quick)
                or ((verify or quick is None) and file_sha256(file) != info["sha256"])):
            raise VlmcError(f"{folder}: file {name} is corrupted (size or checksum differs from the manifest)")
    return manifest


def artifact_device(manifest: dict) -> str:
    """Where an artifact's kernels run, "cpu" or "cuda" (manifests from before the key: read off the target)."""
    if "device" in manifest:
        return manifest["device"]
    return "cuda" if '"kind":"cuda"' in str(manifest.get("target", "")).replace(" ", "") else "cpu"


def check_device(manifest: dict, folder, device: str | None) -> str:
    """Validate a --device value against the artifact it will run; returns it normalized ("cpu", "cuda:0")."""
    kind, _, index = (device or "cpu").strip().lower().partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise VlmcError(f"device {device!r} is not one of: cpu, cuda, cuda:N")
    built = artifact_device(manifest)
    if built != kind:
        hint = '--target \'{"kind": "cuda"}\'' if kind == "cuda" else "--target llvm"
        arch = re.search(r'"arch":\s*"(\w+)"', str(manifest.get("target", "")))
        what = f"{built} ({arch.group(1)})" if arch else built
        raise VlmcError(f"{folder} was compiled for {what} and cannot run on {device}; recompile it with {hint} "
                        f"or pass --device {built}")
    if kind == "cuda":
        import tvm

        if not tvm.cuda(int(index or 0)).exist:
            raise VlmcError(f"no CUDA device {kind}:{index or 0} is visible to TVM")
        return f"cuda:{int(index or 0)}"
    return "cpu"


# ---- graphs and parameters (TVM imported on first use: manifests are read without it)

def _device(device):
    import tvm

    if device is None or device == "cpu":
        return tvm.cpu()
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        return tvm.device(kind, int(index or 0))
    return device


# safetensors dtype codes of the parameter dtypes artifacts hold
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I64": "int64",
                       "I8": "int8", "U8": "uint8"}


def _host_view(tensor) -> np.ndarray:
    """A numpy view of a host tensor's bytes (bf16, which numpy lacks, as int16)."""
    import torch

    if tensor.dtype == "bfloat16":
        return torch.from_dlpack(tensor).view(torch.int16).numpy()
    return np.from_dlpack(tensor)


def load_params(path: str | os.PathLike, names: Sequence[str], device=None) -> list:
    """The parameters `names` of a safetensors file as device tensors, each read from the file straight into its
    (host) tensor (see safetensors_io.py: no memory map, no second copy)."""
    import tvm

    from .safetensors_io import read_header, read_into

    dev = _device(device)
    on_host = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    index, start = read_header(path)
    params = []
    with open(path, "rb", buffering=0) as f:
        for name in names:
            info = index[name]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = tvm.runtime.empty(info["shape"], dtype, dev)
            host = _host_view(tensor) if on_host else np.empty(info["shape"], "uint16" if dtype == "bfloat16" else dtype)
            read_into(f, path, name, info, start, memoryview(host.reshape(-1)).cast("B"))
            if not on_host:
                tensor.copyfrom(host)
            params.append(tensor)
    return params


ALIGNMENT = 64  # bytes; TVM's allocation alignment, assumed by vectorized kernels


def aligned_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zeroed array whose data starts on an ALIGNMENT boundary, so graphs can use it without a copy."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.zeros(count * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)


def _torch_device(dev) -> str:
    import tvm

    return "cuda:%d" % dev.index if dev.dlpack_device_type() != tvm.cpu().dlpack_device_type() else "cpu"


def tvm_runtime_only(*artifacts) -> None:
    """Have this process (and the rank and worker processes it starts) load TVM's runtime library alone, not its
    260 MB compiler: about 1 s of every cold start of a command that only runs compiled graphs. CPU artifacts only
    (CUDA graphs compile their kernels at load time); no effect once TVM is imported (e.g. by a compile earlier in the
    same process) or when an artifact cannot be read (its own error comes later)."""
    import sys

    if "tvm" in sys.modules:
        return
    try:
        if any(artifact_device(json.loads((Path(a) / "manifest.json").read_text())) != "cpu" for a in artifacts if a):
            return
    except (OSError, ValueError):
        return
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


def load_library(path: str | os.PathLike, params: list, device=None) -> Callable:
    """A compiled graph as f(*inputs) -> list[np.ndarray], with `params` bound after the inputs."""
    import torch
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

    dev = _device(device)
    on_host = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    try:
        vm = VirtualMachine(tvm.runtime.load_module(str(path)), dev)
    except RuntimeError as exc:
        if on_host:
            raise
        # GPU kernels are compiled here, at load time, by NVRTC (cuda-bindings) or nvcc (TVM_CUDA_COMPILE_MODE=nvcc).
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ValueError(f"loading {path} on {device} failed: {first} (GPU kernels are compiled at load time and "
                         f"need the CUDA runtime and NVRTC or nvcc)") from exc
    main = vm["main"]

    def as_tvm(x):
        # Compiled kernels assume 64-byte aligned, compact buffers: share those zero-copy, copy the rest.
        # A GPU graph gets host arrays copied to the device (tensors already there pass through).
        if torch.is_tensor(x):  # e.g. a bf16 cache view, which numpy cannot hold
            if x.device.type != "cpu" or not on_host:
                return tvm_ffi.from_dlpack(x.detach().contiguous().to(_torch_device(dev)))
            x = x.detach().contiguous()
            return tvm_ffi.from_dlpack(x if x.data_ptr() % ALIGNMENT == 0 else x.clone())
        if isinstance(x, np.ndarray):
            if on_host and x.flags.c_contiguous and x.ctypes.data % ALIGNMENT == 0:
                return tvm_ffi.from_dlpack(x)
            return tvm.runtime.tensor(np.ascontiguousarray(x), dev)
        return x

    def run(*inputs) -> list[np.ndarray]:
        out = main(*[as_tvm(x) for x in inputs], *params)
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        return [np.from_dlpack(o) if on_host else o.numpy() for o in outs]

    run.vm = vm  # the VM owns the loaded code; the function alone does not keep it alive
    return run


def bf16_gemm_path(library: str | os.PathLike) -> str:
    """How a CPU graph library's bf16-input GEMMs (backend.compute: bf16) run in this process: "mkl" (MKL's AMX /
    AVX512-BF16 kernels) or "fp32" (the rounded inputs widened and multiplied in fp32); compile/kernels/kernels.c."""
    import tvm

    path = tvm.runtime.load_module(str(library)).get_function("vlmc_bf16_gemm_path", query_imports=True)()
    return {1: "mkl", 2: "fp32"}[int(path)]


def int8_gemm_path(library: str | os.PathLike) -> str:
    """How a CPU graph library's int8 x int8 GEMMs (backend.compute: int8) run in this process: "amx" (AMX int8
    tiles) or "fp32" (the quantized inputs multiplied in fp32); compile/kernels/kernels.c."""
    import tvm

    path = tvm.runtime.load_module(str(library)).get_function("vlmc_int8_gemm_path", query_imports=True)()
    return {1: "amx", 2: "fp32"}[int(path)]
