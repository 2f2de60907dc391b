"""Reduced-precision weights: the scheme, the numerics every tool can rebuild, and the linear op graphs call.

Numerics (docs/compile_config.md, "Reduced precision"), applied to the full (unsharded) weight W [N, K] of a linear
layer, before any tensor-parallel slice, so the effective model is the same at every tp:
- bf16 / fp16: round to nearest even; effective weight = the rounded value, computed in fp32.
- int8: per output row (group "channel") or per group of `group_size` inputs, s = max|w| / 127 (fp32),
  q = clamp(round_half_even(w / s), -127, 127); effective weight q * s.
- int4: the same with s = max|w| / 7 and q = clamp(round_half_even(w / s), -8, 7).
Norm weights and biases stay fp32; activations are fp32 everywhere.

Stored form (what artifacts hold and kernels read): bf16/fp16 [N, K]; int8 [N, K] plus fp32 scales [N, K / group];
int4 as uint8 [N, K / 2] plus scales, each block of 32 inputs k0..k0+31 of a row in 16 bytes: byte j holds q[k0+j] + 8
in its low nibble and q[k0+16+j] + 8 in its high nibble (so a kernel unpacks 16 values with one mask and one shift).

In PyTorch a quantized layer is `QLinear`, whose forward calls the custom op `vlmc::qmatmul(x, weight, scale)`; its
eager body (dequantize, fp32 matmul) is the fake-quant reference. On CPU targets it imports as
`R.call_dps_packed("vlmc_qmatmul")` (compile/kernels/kernels.c); elsewhere the model runs the same math in standard ops.

GEMM input precision (`backend.compute`), orthogonal to storage: with `bf16`, a layer's x and effective weight are
both rounded to bf16 (nearest even) before the product, accumulated in fp32 (`vlmc::qmatmul_bf16`, kernel
`vlmc_qmatmul_bf16`); its output, the residual stream, norms, attention and logits stay fp32. Applied to the prompt and
vision graphs (compute-bound); decode GEMVs (memory-bound) keep fp32 inputs.

With `backend.compute: int8`, int8 layers with one scale per row also take int8 inputs in the prompt and vision graphs:
each row (token) of x is quantized as a whole, d = max|x row| / 127, xq = clamp(round_half_even(x / d), -127, 127),
effective input xq * d (`int8_rows`), so the kernel's sums of xq * q over all of K are exact integer dot products
(`vlmc::qmatmul_i8`, kernel `vlmc_qmatmul_i8`: AMX int8 tiles on hosts that have them); every other layer takes bf16
inputs as with `bf16`. A row-parallel layer's rank sees part of each row, so this mode is for tp 1.

Decode GEMV input precision (`backend.decode_compute`, LLM graphs, int8/int4 weights): with `int8`, each int8/int4
layer of the decode graphs quantizes its input x first, per row in blocks of 32 inputs (the last one shorter):
d = max|x| / 127 (fp32), xq = clamp(round_half_even(x / d), -127, 127), effective input xq * d (`int8_inputs`), so
the kernel's sums of xq * q are exact integer dot products (`vlmc::qmatmul_a8`, kernel `vlmc_qmatmul_a8`). Prompt
graphs, fp32/bf16/fp16 layers, norms, attention and logits are unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
KV_CACHE_FORMATS = ("fp32", "bf16", "int8")
GROUP_SIZES = ("channel", 32, 64, 128)
DEFAULT_GROUP = {"int8": "channel", "int4": 64}
QMAX = {"int8": 127, "int4": 7}
QMIN = {"int8": -127, "int4": -8}
INT4_BLOCK = 32  # inputs per packed block (see the stored form above)
QMATMUL_EXTERN = "vlmc_qmatmul"
QMATMUL_BF16_EXTERN = "vlmc_qmatmul_bf16"
COMPUTE_FORMATS = ("fp32", "bf16", "int8")  # GEMM input precision (backend.compute)
# what set_compute calls each backend.compute value (int8 there is decode_compute's per-block inputs)
GRAPH_COMPUTE = {"fp32": "fp32", "bf16": "bf16", "int8": "int8_rows"}
DECODE_COMPUTE_FORMATS = ("fp32", "int8")  # decode GEMV input precision (backend.decode_compute)
INT8_INPUT_BLOCK = 32  # inputs per activation scale (decode_compute: int8)
QMATMUL_A8_EXTERN = "vlmc_qmatmul_a8"
QMATMUL_I8_EXTERN = "vlmc_qmatmul_i8"
# Weight formats each target kind has a kernel for (CPU: kernels.c; CUDA: dequantize + matmul scheduled by dlight).
TARGET_WEIGHT_FORMATS = {"llvm": WEIGHT_FORMATS, "cuda": ("fp32", "bf16", "fp16", "int8")}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizationError(ValueError):
    """A layer that cannot be stored in the requested scheme (names the layer and what would work)."""


@dataclass(frozen=True)
class Scheme:
    """How a graph's weights (and, for LLM graphs, its KV cache) are stored."""

    weights: str = "fp32"
    group_size: int | str | None = None  # None: the format's default
    kv_cache: str = "fp32"
    skip: tuple[str, ...] = field(default_factory=tuple)
    compute: str = "fp32"  # GEMM input precision of the prompt / vision graphs (backend.compute; not in to_dict)
    decode_compute: str = "fp32"  # GEMV input precision of the decode graphs (backend.decode_compute; ditto)

    @property
    def group(self) -> int | None:
        """Inputs per scale; None: one scale per output row (or no scales: fp32/bf16/fp16)."""
        g = self.group_size if self.group_size is not None else DEFAULT_GROUP.get(self.weights, "channel")
        return None if g == "channel" or self.weights not in QMAX else int(g)

    @property
    def quantizes_weights(self) -> bool:
        return self.weights != "fp32"

    @property
    def changes_numerics(self) -> bool:
        """Whether the graph computes other than the fp32 checkpoint would (weights, KV cache or GEMM inputs)."""
        return (self.quantizes_weights or self.kv_cache != "fp32" or self.compute != "fp32"
                or self.decode_compute != "fp32")

    def skips(self, name: str, parts: Iterable[str] = ()) -> bool:
        """Whether the layer `name` (a deploy-model module path; `parts`: the checkpoint layers fused into it) stays
        fp32: a `skip` glob matches its name or any part's."""
        return any(fnmatch.fnmatchcase(n, glob) for glob in self.skip for n in (name, *parts))

    def to_dict(self, kv_cache: bool = True) -> dict:
        """The scheme as recorded in manifests; group_size resolved ("channel" or an int; None for float formats)."""
        group = (self.group or "channel") if self.weights in QMAX else None
        out = {"weights": self.weights, "group_size": group, "skip": list(self.skip)}
        return {**out, "kv_cache": self.kv_cache} if kv_cache else out

    @classmethod
    def from_dict(cls, data: dict | None, compute: str = "fp32", decode_compute: str = "fp32") -> "Scheme":
        data = dict(data or {})
        data["skip"] = tuple(data.get("skip") or ())
        return cls(**data, compute=compute, decode_compute=decode_compute)


# ----------------------------------------------------------------------------------------------------- numerics


@dataclass
class QuantizedWeight:
    """A weight in its stored precision, before int4 packing: values [N, K] (bf16/fp16, or int8 holding int8/int4
    values) and fp32 scales [N, K / group] (int formats). Slices and concatenations keep scales with their values."""

    fmt: str
    values: torch.Tensor
    scale: torch.Tensor | None
    group: int  # inputs per scale (K for per-row scales)

    @property
    def ndim(self) -> int:
        return 2

    def slice(self, dim: int, start: int, size: int, name: str = "") -> "QuantizedWeight":
        values = self.values.narrow(dim, start, size).contiguous()
        if self.scale is None:
            return QuantizedWeight(self.fmt, values, None, self.group)
        if dim == 0:
            return QuantizedWeight(self.fmt, values, self.scale.narrow(0, start, size).contiguous(), self.group)
        k = self.values.shape[1]
        if self.group == k:  # one scale per row: every slice of the row keeps it
            return QuantizedWeight(self.fmt, values, self.scale.clone(), size)
        if start % self.group or size % self.group:
            raise QuantizationError(f"{name}: the slice [{start}, {start + size}) of its {k} inputs straddles groups "
                                    f"of {self.group}; choose a group size that divides {size}")
        return QuantizedWeight(self.fmt, values, self.scale.narrow(1, start // self.group, size // self.group)
                               .contiguous(), self.group)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        first = parts[0]
        scale = None if first.scale is None else torch.cat([p.scale for p in parts])
        return QuantizedWeight(first.fmt, torch.cat([p.values for p in parts]), scale, first.group)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, scale) as the artifact stores them (int4 packed)."""
        return (pack_int4(self.values) if self.fmt == "int4" else self.values), self.scale


def quantize(w: torch.Tensor, fmt: str, group: int | None, name: str = "") -> QuantizedWeight:
    """Quantize a full weight [N, K] (fp32) by the rules in the module docstring."""
    w = w.float()
    n, k = w.shape
    if fmt in _TORCH_DTYPES:
        return QuantizedWeight(fmt, w.to(_TORCH_DTYPES[fmt]), None, k)
    if fmt not in QMAX:
        raise QuantizationError(f"unknown weight format {fmt!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    g = k if group is None else group
    if k % g:
        raise QuantizationError(f"{name}: group size {g} does not divide its input width {k}; choose a group size "
                                f"that divides {k}, or 'channel', or skip the layer (quantize.skip)")
    if fmt == "int4" and k % INT4_BLOCK:
        raise QuantizationError(f"{name}: int4 needs an input width that is a multiple of {INT4_BLOCK}, it has {k}; "
                                f"use int8 or skip the layer (quantize.skip)")
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // g)
    rows = max(1, (1 << 22) // k)  # a few MB of fp32 temporaries at a time, whatever the weight's size
    for r in range(0, n, rows):
        grouped = w[r:r + rows].reshape(-1, k // g, g)
        s = grouped.abs().amax(-1) / QMAX[fmt]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q[r:r + rows] = torch.clamp(torch.round(grouped / safe[..., None]), QMIN[fmt], QMAX[fmt]).reshape(-1, k)
        scale[r:r + rows] = s
    return QuantizedWeight(fmt, q, scale, g)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [N, K] (K a multiple of 32) -> uint8 [N, K / 2] in the stored block layout."""
    n, k = values.shape
    if k % INT4_BLOCK:
        raise QuantizationError(f"int4 packing needs a width that is a multiple of {INT4_BLOCK}, got {k}")
    u = (values.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [N, K / 2] -> int8 [N, K]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    values = torch.cat([blocks & 15, blocks >> 4], dim=2).to(torch.int8) - 8
    return values.reshape(n, half * 2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The effective fp32 weight [N, K] of a stored weight (and its scales)."""
    if scale is None:
        return weight.float()
    values = unpack_int4(weight) if weight.dtype == torch.uint8 else weight
    n, k = values.shape
    groups = scale.shape[1]
    return (values.float().reshape(n, groups, k // groups) * scale[..., None]).reshape(n, k)


def effective_weight(w: torch.Tensor, scheme: Scheme, name: str = "") -> torch.Tensor:
    """What a layer computes with under `scheme` (the fake-quant weight), shaped like `w` ([N, ...] -> [N, K])."""
    q = quantize(w.reshape(w.shape[0], -1), scheme.weights, scheme.group, name)
    return dequantize(*q.stored()).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ the linear op


@torch.library.custom_op("vlmc::qmatmul", mutates_args=())
def qmatmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ dequantize(weight, scale)^T -> [..., N], fp32."""
    return F.linear(x, dequantize(weight, scale))


@qmatmul.register_fake
def _qmatmul_shape(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def qmatmul_decomposed(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The same math in standard ops (targets without vlmc's kernels: TVM fuses the dequantize into the matmul)."""
    return F.linear(x, dequantize(weight, scale))


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 (nearest even), in its own dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


@torch.library.custom_op("vlmc::qmatmul_bf16", mutates_args=())
def qmatmul_bf16(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """bf16(x) [..., K] @ bf16(dequantize(weight, scale))^T -> [..., N], fp32 accumulation (weight: any stored
    format, or fp32)."""
    return qmatmul_bf16_decomposed(x, weight, scale)


@qmatmul_bf16.register_fake
def _qmatmul_bf16_shape(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def qmatmul_bf16_decomposed(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return F.linear(bf16_round(x), bf16_round(dequantize(weight, scale)))


def int8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as decode_compute: int8 layers see it: xq * d per block of INT8_INPUT_BLOCK inputs (module docstring)."""
    k = x.shape[-1]
    blocks = F.pad(x, (0, -k % INT8_INPUT_BLOCK)).reshape(*x.shape[:-1], -1, INT8_INPUT_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.clamp(torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))), -127, 127)
    return (q * d).reshape(*x.shape[:-1], -1)[..., :k]


@torch.library.custom_op("vlmc::qmatmul_a8", mutates_args=())
def qmatmul_a8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_inputs(x) [..., K] @ dequantize(weight, scale)^T -> [..., N], fp32 (int8 / int4 weights)."""
    return qmatmul_a8_decomposed(x, weight, scale)


@qmatmul_a8.register_fake
def _qmatmul_a8_shape(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def qmatmul_a8_decomposed(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(int8_inputs(x), dequantize(weight, scale))


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as backend.compute: int8 layers see it: xq * d per row (module docstring)."""
    d = x.abs().amax(-1, keepdim=True) / 127
    return torch.clamp(torch.round(x / torch.where(d > 0, d, torch.ones_like(d))), -127, 127) * d


@torch.library.custom_op("vlmc::qmatmul_i8", mutates_args=())
def qmatmul_i8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_rows(x) [..., K] @ dequantize(weight, scale)^T -> [..., N], fp32 (int8 weights, one scale per row)."""
    return qmatmul_i8_decomposed(x, weight, scale)


@qmatmul_i8.register_fake
def _qmatmul_i8_shape(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def qmatmul_i8_decomposed(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(int8_rows(x), dequantize(weight, scale))


def _converter(extern: str):
    def convert(node, importer):
        from tvm import relax

        x, weight = importer.env[node.args[0]], importer.env[node.args[1]]
        scale = node.args[2] if len(node.args) > 2 else None
        args = [x, weight] + ([importer.env[scale]] if scale is not None else [])
        dims = list(x.ty.shape)
        shape = [*dims[:-1], weight.ty.shape[0]]
        return importer.block_builder.emit(relax.call_dps_packed(extern, args, relax.TensorType(shape, "float32")))

    return convert


CUSTOM_CONVERTERS = {"qmatmul.default": _converter(QMATMUL_EXTERN),
                     "qmatmul_bf16.default": _converter(QMATMUL_BF16_EXTERN),
                     "qmatmul_a8.default": _converter(QMATMUL_A8_EXTERN),
                     "qmatmul_i8.default": _converter(QMATMUL_I8_EXTERN)}


class QLinear(nn.Module):
    """A linear layer with a stored low-precision weight (and scales): y = x @ dequantize(weight, scale)^T + bias.
    Parameters are created on the current device (meta while a model is being assembled) and loaded by assignment.
    `compute` is the input precision (see the module docstring: fp32, bf16, int8 (per block, int8/int4 weights) or
    int8_rows (per row, int8 weights with one scale per row)); fmt "fp32" holds an unquantized weight for a
    bf16-input layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, group: int | None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        if fmt == "fp32" or fmt in _TORCH_DTYPES:
            weight = torch.empty(out_features, in_features, dtype=_TORCH_DTYPES.get(fmt, torch.float32))
            scale = None
        else:
            # A group as wide as the whole (unsliced) row acts as a per-row scale on every rank's slice of it.
            groups = in_features // group if group and group <= in_features else 1
            packed = in_features // 2 if fmt == "int4" else in_features
            weight = torch.empty(out_features, packed, dtype=torch.uint8 if fmt == "int4" else torch.int8)
            scale = torch.empty(out_features, groups)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.fused = True  # vlmc::qmatmul (CPU kernel); False: standard ops (GPU targets)
        self.compute = "fp32"

    def forward(self, x):
        if self.compute == "bf16":
            y = (qmatmul_bf16 if self.fused else qmatmul_bf16_decomposed)(x, self.weight, self.scale)
        elif self.compute == "int8":
            y = (qmatmul_a8 if self.fused else qmatmul_a8_decomposed)(x, self.weight, self.scale)
        elif self.compute == "int8_rows":
            y = (qmatmul_i8 if self.fused else qmatmul_i8_decomposed)(x, self.weight, self.scale)
        elif self.fmt == "fp32":
            return F.linear(x, self.weight, self.bias)
        else:
            y = (qmatmul if self.fused else qmatmul_decomposed)(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, fmt={self.fmt}, bias={self.bias is not None}"
                + (f", compute={self.compute}" if self.compute != "fp32" else ""))

    @property
    def int8_per_row(self) -> bool:
        """int8 weights with one scale per row: the layers that take int8_rows inputs."""
        return self.fmt == "int8" and self.scale is not None and self.scale.shape[1] == 1


def set_compute(model: nn.Module, compute: str, keep: Iterable[str] = ()) -> None:
    """The input precision of every linear layer of `model` but those whose names match a `keep` glob (e.g. the
    lm_head: logits stay fp32): fp32, bf16 (GEMM inputs), int8 (decode GEMV inputs; int8/int4 layers only, the
    others keep fp32) or int8_rows (backend.compute: int8; int8 layers with one scale per row, the others bf16).
    Unquantized nn.Linear layers become fp32 QLinear layers holding the same parameters (same state_dict names), so
    they can take bf16 inputs; set again per graph before it is exported."""
    allowed = ("fp32", "bf16", "int8", "int8_rows")
    if compute not in allowed:
        raise ValueError(f"unknown compute precision {compute!r}; allowed: {', '.join(allowed)}")
    keep = tuple(keep)
    for name, module in list(model.named_modules()):
        if any(fnmatch.fnmatchcase(name, glob) for glob in keep):
            continue
        if isinstance(module, QLinear) and compute == "int8":
            module.compute = "int8" if module.fmt in QMAX else "fp32"
            continue
        if isinstance(module, nn.Linear) and compute != "int8":
            if compute == "fp32":
                continue
            layer = QLinear(module.in_features, module.out_features, module.bias is not None, "fp32", None)
            layer.weight, layer.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            module = layer
        if isinstance(module, QLinear):
            module.compute = ("int8_rows" if module.int8_per_row else "bf16") if compute == "int8_rows" else compute


def swap_linears(model: nn.Module, scheme: Scheme, parts: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Replace every nn.Linear of `model` that `scheme` quantizes (all but the skipped ones) with a QLinear of the
    same shape; `parts` maps a fused layer's name to its checkpoint layers' names (for `skip`). Returns the names
    of the quantized layers."""
    if not scheme.quantizes_weights:
        return []
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or scheme.skips(name, (parts or {}).get(name, ())):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(module.weight.device):
            setattr(parent, child, QLinear(module.in_features, module.out_features, module.bias is not None,
                                           scheme.weights, scheme.group))
        swapped.append(name)
    return swapped


def use_kernels(model: nn.Module, fused: bool) -> None:
    """QLinear layers call vlmc's kernel (CPU targets) or the decomposed op."""
    for module in model.modules():
        if isinstance(module, QLinear):
            module.fused = fused


def weight_layout(model: nn.Module) -> dict[str, dict]:
    """Per quantized layer: format, group and stored bytes (for the manifest)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear) and module.fmt != "fp32":
            k = module.in_features
            groups = module.scale.shape[1] if module.scale is not None else None
            group = None if groups is None else "channel" if groups == 1 else k // groups
            out[name] = {"format": module.fmt, "group": group, "shape": [module.out_features, k]}
    return out


def check_int8_input_blocks(rank_model: nn.Module, tp: int) -> None:
    """decode_compute: int8 at tp > 1: a rank's slice of a row-parallel layer's inputs must hold whole blocks of
    INT8_INPUT_BLOCK, so each rank quantizes the same blocks as the unsharded model (the same effective model at
    every tp). Checked on every int8/int4 layer's per-rank input width."""
    from ..errors import VlmcError

    for name, module in rank_model.named_modules():
        if isinstance(module, QLinear) and module.fmt in QMAX and module.in_features % INT8_INPUT_BLOCK:
            raise VlmcError(f"backend.decode_compute: int8 at tp={tp}: {name} takes {module.in_features} inputs per "
                            f"rank, not a multiple of {INT8_INPUT_BLOCK}, so its blocks would straddle ranks; use "
                            f"another tp, decode_compute: fp32, or skip the layer (quantize.skip)")


def check_target(scheme: Scheme, target_kind: str, compute: str = "fp32", decode_compute: str = "fp32") -> None:
    """Refuse a weight format or input precision the target has no kernel for (before anything is loaded)."""
    from ..errors import VlmcError

    allowed = TARGET_WEIGHT_FORMATS.get(target_kind, ("fp32",))
    if scheme.weights not in allowed:
        raise VlmcError(f"quantize.weights: {scheme.weights} has no kernel for {target_kind} targets; allowed there: "
                        f"{', '.join(allowed)}")
    if compute != "fp32" and target_kind != "llvm":
        raise VlmcError(f"backend.compute: {compute} has a kernel for CPU (llvm) targets only; use fp32 for "
                        f"{target_kind}")
    if decode_compute != "fp32" and target_kind != "llvm":
        raise VlmcError(f"backend.decode_compute: {decode_compute} has a kernel for CPU (llvm) targets only; use fp32 "
                        f"for {target_kind}")
