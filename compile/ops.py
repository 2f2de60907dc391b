"""Graph ops that vlmc lowers to its own kernels instead of TVM's generic ones.

`segment_attention(q, k, v, ranges)`: each query row i attends to the keys in [ranges[i, 0], ranges[i, 1]) with
softmax(q k^T / sqrt(D)); q [N, H, D], k, v [M, Hk, D] (Hk divides H: grouped-query attention), ranges int32
[N, 2]; a row with an empty range gets zeros. Key ranges say what a dense [N, N] mask says for window, full, causal
and padded attention, in O(N) input, and let the CPU kernel skip everything outside them: window blocks cost their
windows, not N^2, and a prompt's causal attention half of the square.

In PyTorch it is the custom op `vlmc::segment_attention` (torch.export keeps it as one node). On CPU targets it
imports as `R.call_dps_packed("vlmc_segment_attention")` (compile/kernels/kernels.c); elsewhere (GPU targets, ONNX)
the model calls `segment_attention_decomposed`, the same math in standard ops with a mask built from the ranges.
"""

from __future__ import annotations

import torch

ATTENTION_EXTERN = "vlmc_segment_attention"
CACHE_ATTENTION_EXTERN = "vlmc_cache_attention"


def segment_attention_decomposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 ranges: torch.Tensor) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves H / Hk query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    keys = torch.arange(k.shape[0], device=k.device, dtype=ranges.dtype)
    # A 0/1 float mask, not a bool tensor: TVM 0.27's CUDA codegen loads bool pairs as ushort2 (2 bytes each), which
    # mixed neighbouring mask entries in the GPU graph. The arithmetic below is exact: s*1 + 0*min = s, s*0 + min = min.
    allowed = ((keys[None] >= ranges[:, :1]) & (keys[None] < ranges[:, 1:])).to(q.dtype)  # [N, M]
    scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * q.shape[-1] ** -0.5  # [H, N, M]
    scores = scores * allowed[None] + (1 - allowed[None]) * torch.finfo(scores.dtype).min
    probs = torch.softmax(scores, dim=-1) * allowed.sum(-1, keepdim=True).clamp(max=1)[None]  # 1: any key
    return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [N, H, D]


def uses_attention_kernel(target) -> bool:
    """Whether graphs for `target` call the attention kernel (a host kernel: CPU targets) or the decomposed op."""
    return target.kind.name == "llvm"


def attention_op(fused: bool):
    """The op a model calls: the kernel's custom op (fused) or the same math in standard ops."""
    return segment_attention if fused else segment_attention_decomposed


@torch.library.custom_op("vlmc::segment_attention", mutates_args=())
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    return segment_attention_decomposed(q, k, v, ranges).contiguous()


@segment_attention.register_fake
def _segment_attention_shape(q, k, v, ranges):
    return torch.empty_like(q)


def _segment_attention_converter(node, importer):
    from tvm import relax

    q, k, v, ranges = (importer.env[a] for a in node.args[:4])
    return importer.block_builder.emit(relax.call_dps_packed(ATTENTION_EXTERN, [q, k, v, ranges], q.ty))


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A KV cache [B, kv, T, D] in fp32: bf16 widened, int8 rows times their scale [B, kv, T]."""
    return cache.float() if scale is None else cache.float() * scale[..., None]


def cache_attention_decomposed(q, k_cache, v_cache, k_scale, v_scale, k_new, v_new, mask):
    """Decode attention over a cache in its stored dtype plus the step's new keys/values, in standard ops:
    q [B, H, S, D]; caches [B, Hk, T, D] (fp32, bf16, or int8 with scales [B, Hk, T]); k_new, v_new [B, Hk, S, D];
    mask [B, 1, S, T + S] additive (columns: cache slots, then the new tokens) -> [B, H, S, D]."""
    k_cache, v_cache = dequantize_cache(k_cache, k_scale), dequantize_cache(v_cache, v_scale)
    b, h, s, d = q.shape
    kv, t = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b * kv, h // kv * s, d)  # query heads grouped by their KV head: the cache is not repeated
    k_cache, v_cache = k_cache.reshape(b * kv, t, d), v_cache.reshape(b * kv, t, d)
    k_new, v_new = k_new.reshape(b * kv, s, d), v_new.reshape(b * kv, s, d)
    scores = torch.cat([torch.bmm(qg, k_cache.transpose(1, 2)).view(b, -1, s, t),
                        torch.bmm(qg, k_new.transpose(1, 2)).view(b, -1, s, s)], dim=-1) * d ** -0.5 + mask
    probs = torch.softmax(scores, dim=-1).view(b * kv, h // kv * s, t + s)
    out = torch.bmm(probs[..., :t], v_cache) + torch.bmm(probs[..., t:], v_new)
    return out.view(b, h, s, d)


@torch.library.custom_op("vlmc::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None, k_new: torch.Tensor, v_new: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    return cache_attention_decomposed(q, k_cache, v_cache, k_scale, v_scale, k_new, v_new, mask).contiguous()


@cache_attention.register_fake
def _cache_attention_shape(q, k_cache, v_cache, k_scale, v_scale, k_new, v_new, mask):
    return torch.empty_like(q)


def cache_attention_op(fused: bool):
    """Decode attention over a bf16/int8 cache: the kernel's custom op (fused) or the same math in standard ops."""
    return cache_attention if fused else cache_attention_decomposed


def _cache_attention_converter(node, importer):
    from tvm import relax

    args = [importer.env[a] for a in node.args[:8] if a is not None]
    return importer.block_builder.emit(relax.call_dps_packed(CACHE_ATTENTION_EXTERN, args, args[0].ty))


def use_host_kernels(model: torch.nn.Module, fused: bool) -> None:
    """Point every layer of a deploy model that has a vlmc kernel (attention, quantized linears: modules with a
    `fused` switch) at the kernel (CPU targets) or at the same math in standard ops (other targets, ONNX)."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused


def _converters():
    from .quantize import CUSTOM_CONVERTERS as QUANT

    return {"segment_attention.default": _segment_attention_converter,
            "cache_attention.default": _cache_attention_converter, **QUANT}


CUSTOM_CONVERTERS = _converters()
