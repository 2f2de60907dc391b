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


CUSTOM_CONVERTERS = {"segment_attention.default": _segment_attention_converter}
