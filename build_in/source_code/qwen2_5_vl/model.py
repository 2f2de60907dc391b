"""Deploy-friendly Qwen2.5-VL: static shapes, no data-dependent control flow, host-computed rotary and masks.

- `DeployVision`: patch embed as a matmul, blocks taking per-patch key ranges (window / full attention) and cos/sin,
  the merger; the
  output comes back as chunks along the hidden axis (the target cannot emit one large tensor).
- `DeployLanguageModel`: takes `inputs_embeds`, host cos/sin, an additive mask and the KV cache as inputs and
  returns the new keys/values instead of writing the cache, so a step never copies the cache; attention is
  split into a cache part and a new-token part so no concatenated copy is made either. The LM head runs on the
  last position only. Tensor parallel: each rank holds a column/row slice (see `SHARDING`) and calls
  `all_reduce` after attention and after the MLP.

Weights keep the checkpoint's names (minus the prefix), so `load_*` reads them straight from safetensors; only
the tensors listed in `FUSED` (q/k/v, gate/up) are concatenated into one on loading. The models are built on the
meta device and filled one checkpoint tensor at a time; a `quantize` scheme swaps their linears for
`compile.quantize.QLinear` and stores each weight quantized on the full tensor, before the rank's slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....compile.ops import attention_op, cache_attention_op
from ....compile.quantize import QuantizedWeight, Scheme, quantize, swap_linears


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------------------------- vision tower


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden)  # gate and up in one matmul (see FUSED)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # vlmc::segment_attention (CPU kernel); False: standard ops (GPU targets, ONNX)

    def forward(self, x, ranges, cos, sin):
        n = x.shape[0]
        # [n, heads, head_dim] throughout: the attention kernel reads this layout, so no transposes are needed.
        # split, not unbind/select: a select imports as `take`, whose lowering warns once per use
        q, k, v = self.qkv(x).reshape(n, 3 * self.num_heads, self.head_dim).split(self.num_heads, dim=1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return self.proj(attention_op(self.fused)(q, k, v, ranges).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate: int):
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6)
        self.norm2 = RMSNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, intermediate)

    def forward(self, x, ranges, cos, sin):
        x = x + self.attn(self.norm1(x), ranges, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm, 2x2 merge, Linear-GELU-Linear; `norm` builds the norm (RMSNorm here, LayerNorm in Qwen2-VL)."""

    def __init__(self, out_dim: int, dim: int, merge_size: int, norm: Callable = lambda d: RMSNorm(d, 1e-6)):
        super().__init__()
        self.merged_dim = dim * merge_size * merge_size
        self.ln_q = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, out_dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


def visual_example_inputs(names, budget: int, patch_dim: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Example inputs of a visual graph for N = `budget` patches: pixel_values [N, patch_dim]; key ranges int32
    [N, 2] (every patch attends to all); cos, sin [N, head_dim]."""
    ranges = torch.tensor([[0, budget]], dtype=torch.int32).expand(budget, 2).contiguous()
    shapes = {"pixel_values": lambda: torch.zeros(budget, patch_dim), "window_ranges": ranges.clone,
              "full_ranges": ranges.clone, "cos": lambda: torch.zeros(budget, head_dim),
              "sin": lambda: torch.zeros(budget, head_dim)}
    return {name: shapes[name]() for name in names}


class VisionTower(nn.Module):
    """What every deploy vision tower shares: the inputs it declares (`INPUTS`, shaped by `visual_example_inputs`),
    patch_dim and head_dim, and its main output group in `chunks` along the hidden axis."""

    INPUTS: tuple[str, ...] = ()

    def _set_shapes(self, vision_config, width: int, out_hidden: int, chunks) -> None:
        c = vision_config
        self.patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        self.head_dim = width // c.num_heads
        self.chunks = list(chunks) if chunks else [out_hidden]
        if sum(self.chunks) != out_hidden:
            raise ValueError(f"output chunks {self.chunks} do not add up to the hidden size {out_hidden}")

    def example_inputs(self, budget: int) -> dict[str, torch.Tensor]:
        """The graph's inputs for a budget of N patches, in call order (see `visual_example_inputs`)."""
        return visual_example_inputs(self.INPUTS, budget, self.patch_dim, self.head_dim)

    @property
    def output_groups(self) -> list[dict]:
        return [{"name": "embeddings", "count": 1, "chunks": self.chunks}]


class DeployVision(VisionTower):
    """Vision tower for one image padded to a fixed patch budget.

    Inputs: pixel_values [N, patch_dim] in window order; window_ranges and full_ranges int32 [N, 2], the keys each
    patch attends to in window and in full-attention blocks (see `segment_attention`); cos and sin [N, head_dim].
    Output: a tuple of chunks of the merged embeddings [N / merge_unit, out_hidden] (one output group).
    """

    INPUTS = ("pixel_values", "window_ranges", "full_ranges", "cos", "sin")  # computed by name on the host

    def __init__(self, vision_config, chunks: Sequence[int] | None = None):
        super().__init__()
        c = vision_config
        self._set_shapes(c, c.hidden_size, c.out_hidden_size, chunks)
        self.patch_embed = nn.Linear(self.patch_dim, c.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(c.hidden_size, c.num_heads, c.intermediate_size)
                                    for _ in range(c.depth))
        self.fullatt_block_indexes = set(c.fullatt_block_indexes)
        self.merger = PatchMerger(c.out_hidden_size, c.hidden_size, c.spatial_merge_size)

    def forward(self, pixel_values, window_ranges, full_ranges, cos, sin):
        x = self.patch_embed(pixel_values)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for i, block in enumerate(self.blocks):
            x = block(x, full_ranges if i in self.fullatt_block_indexes else window_ranges, cos, sin)
        return tuple(torch.split(self.merger(x), self.chunks, dim=-1))


# ------------------------------------------------------------------------------------------- language model


@dataclass(frozen=True)
class ShardPlan:
    """How one rank's slice of the attention and MLP is laid out (heads may be replicated for KV)."""

    tp: int
    rank: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # first global KV head this rank holds
    q_head_start: int
    intermediate: int  # MLP width on this rank


def shard_plan(text_config, tp: int, rank: int) -> ShardPlan:
    """Query heads and the MLP split evenly over ranks; KV heads split when they divide by tp, else each rank
    keeps the KV heads its query heads use (replication), so no rank ever needs another rank's KV."""
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    if heads % tp or text_config.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide the attention heads ({heads}) and the MLP width "
                         f"({text_config.intermediate_size})")
    local_heads = heads // tp
    q_start = rank * local_heads
    group = heads // kv  # query heads per KV head
    if kv % tp == 0:
        kv_start, local_kv = rank * (kv // tp), kv // tp
    else:
        if group % local_heads and local_heads % group:
            raise ValueError(f"tp={tp} splits query heads ({heads}) across KV groups of {group}")
        kv_start = q_start // group
        local_kv = max(1, local_heads // group)
    return ShardPlan(tp, rank, local_heads, local_kv, kv_start, q_start, text_config.intermediate_size // tp)


@dataclass(frozen=True)
class TextOptions:
    """How a family's decoder differs from Qwen2's (which is every default): qkv bias, RMSNorm of each query and
    key head before the rotary (Qwen3; replicated on every rank), an explicit head_dim, and the number of leading
    layers after which prompt graphs add per-token visual features (Qwen3-VL's deepstack) to the hidden states."""

    qkv_bias: bool = True
    qk_norm: bool = False
    head_dim: int | None = None  # None: hidden / heads
    deepstack_layers: int = 0


def decoder_options(text_config, deepstack_layers: int = 0) -> TextOptions:
    """The shared decoder's switches for a plain text model by its model_type: Qwen2 (qkv bias), Qwen3 (q/k norm,
    the config's head_dim, bias by attention_bias) or Llama (bias by attention_bias, the config's head_dim)."""
    kind = text_config.model_type
    head_dim = getattr(text_config, "head_dim", None)
    if kind in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        return TextOptions(qkv_bias=True, head_dim=head_dim, deepstack_layers=deepstack_layers)
    if kind in ("qwen3", "qwen3_vl_text"):
        return TextOptions(qkv_bias=bool(text_config.attention_bias), qk_norm=True, head_dim=head_dim,
                           deepstack_layers=deepstack_layers)
    if kind == "llama":
        if getattr(text_config, "mlp_bias", False):
            raise ValueError("a Llama text model with mlp_bias is not supported")
        return TextOptions(qkv_bias=bool(text_config.attention_bias), head_dim=head_dim,
                           deepstack_layers=deepstack_layers)
    raise ValueError(f"text model_type {kind!r} is not supported; supported: qwen2, qwen3, llama")


class Attention(nn.Module):
    def __init__(self, hidden: int, head_dim: int, plan: ShardPlan, options: TextOptions = TextOptions(),
                 eps: float = 1e-6):
        super().__init__()
        self.plan, self.head_dim = plan, head_dim
        self.sizes = [plan.num_heads * head_dim, plan.num_kv_heads * head_dim, plan.num_kv_heads * head_dim]
        self.qkv_proj = nn.Linear(hidden, sum(self.sizes), bias=options.qkv_bias)  # q, k, v in one matmul (FUSED)
        self.o_proj = nn.Linear(plan.num_heads * head_dim, hidden, bias=False)
        if options.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.qk_norm = options.qk_norm
        self.fused = True  # prompts through vlmc::segment_attention (CPU kernel); False: standard ops (GPU targets)

    def _norm(self, q, k):
        """Per-head RMSNorm of queries and keys [..., heads, head_dim] (Qwen3), before the rotary."""
        return (self.q_norm(q), self.k_norm(k)) if self.qk_norm else (q, k)

    def forward(self, x, cos, sin, mask, k_cache=None, v_cache=None, last_only=False, scales=(None, None)):
        """x [B, S, hidden]; cos/sin [B, S, head_dim]; mask [B, 1, S, T + S]; caches [B, kv, T, head_dim] (fp32, bf16,
        or int8 with `scales`, fp32 [B, kv, T] each). Without caches (a prompt on an empty cache slot, B = 1) `mask`
        is the prompt's key ranges instead, see `prompt`."""
        if k_cache is None:
            return self.prompt(x, cos, sin, mask, last_only)
        b, s, _ = x.shape
        q, k, v = (y.view(b, s, -1, self.head_dim) for y in self.qkv_proj(x).split(self.sizes, -1))
        q, k = self._norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if k_cache.dtype != torch.float32 or self.fused:
            # CPU targets, and bf16/int8 caches anywhere: a kernel that reads the cached rows in their stored dtype
            # and skips the masked ones (the batched matmuls below read the whole context every step)
            out = cache_attention_op(self.fused)(q, k_cache, v_cache, *scales, k, v, mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v
        # Group query heads by KV head instead of repeating the cache: [B * kv, group * S, head_dim]. Batched matmuls
        # on 3-D views (bmm, not 4-D matmul, which exports as a broadcast copy of the cache) read the cache in place.
        kv, group = self.plan.num_kv_heads, self.plan.num_heads // self.plan.num_kv_heads
        qg = q.reshape(b * kv, group * s, self.head_dim)
        scale = self.head_dim ** -0.5
        k_new, v_new = k.reshape(b * kv, s, self.head_dim), v.reshape(b * kv, s, self.head_dim)
        t = k_cache.shape[2]
        k_cache, v_cache = k_cache.reshape(b * kv, t, self.head_dim), v_cache.reshape(b * kv, t, self.head_dim)
        scores_cache = torch.bmm(qg, k_cache.transpose(1, 2)).view(b, -1, s, t)
        scores_new = torch.bmm(qg, k_new.transpose(1, 2)).view(b, -1, s, s)
        scores = torch.cat([scores_cache, scores_new], dim=-1) * scale + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b * kv, group * s, t + s)
        out = torch.bmm(probs[..., :t], v_cache) + torch.bmm(probs[..., t:], v_new)
        out = out.view(b, -1, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), k, v

    def prompt(self, x, cos, sin, ranges, last_only=False):
        """A prompt on an empty cache slot: x [1, S, hidden]; ranges int32 [S, 2], the keys [lo, hi) each row
        attends to (causal over the real tokens, empty for padding; see `prompt_key_ranges`). Causal attention as
        key ranges lets the CPU kernel skip the masked half instead of computing and masking an [S, S] score matrix.
        Returns the output (of the last position only if `last_only`) and k, v [1, kv, S, head_dim] for the cache."""
        if x.shape[0] != 1:
            raise ValueError(f"a prompt graph takes one sequence, got a batch of {x.shape[0]}")
        s = x.shape[1]
        # reshapes, not x[0] / cos[0]: a select imports as `take`, whose lowering warns once per use
        q, k, v = (y.view(s, -1, self.head_dim) for y in self.qkv_proj(x.reshape(s, -1)).split(self.sizes, -1))
        q, k = self._norm(q, k)
        cos, sin = cos.reshape(s, 1, -1), sin.reshape(s, 1, -1)
        k = k * cos + rotate_half(k) * sin
        first = s - 1 if last_only else 0  # static slices (see DeployLanguageModel.forward)
        q, cos, sin, ranges = q[first:], cos[first:], sin[first:], ranges[first:]
        q = q * cos + rotate_half(q) * sin
        out = attention_op(self.fused)(q, k, v, ranges).reshape(1, s - first, -1)
        return self.o_proj(out), k.transpose(0, 1)[None], v.transpose(0, 1)[None]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)  # gate and up in one matmul
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _identity(x):
    return x


class DecoderLayer(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, all_reduce: Callable, options: TextOptions, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, head_dim, plan, options, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, plan.intermediate)
        self.all_reduce = all_reduce

    def forward(self, x, cos, sin, mask, k_cache=None, v_cache=None, last_only=False, scales=(None, None)):
        """`last_only` (prompts): keys and values for every position, the output for the last one only."""
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, last_only, scales)
        x = x[:, x.shape[1] - attn.shape[1]:] + self.all_reduce(attn)
        x = x + self.all_reduce(self.mlp(self.post_attention_layernorm(x)))
        return x, k, v


class DeployLanguageModel(nn.Module):
    """Decoder for one tensor-parallel rank.

    forward(inputs_embeds [B, S, hidden], cos, sin [B, S, head_dim], mask [B, 1, S, T + S],
            *caches: k_cache of each layer, then v_cache of each layer, [B, kv_heads_local, T, head_dim]; an int8
            cache adds k_scale of each layer, then v_scale of each layer, [B, kv_heads_local, T])
      -> logits [B, vocab] of the last position, new_k, new_v [layers, B, kv_heads_local, S, head_dim]
    Without caches (prefill graphs: a prompt always starts on an empty cache slot, B = 1) the mask is replaced by
    the prompt's key ranges, int32 [S, 2], and attention covers the new tokens only.
    One input per layer's cache, not one [layers, ...] tensor: selecting a layer from a stacked input is a copy in
    the compiled graph, while separate inputs are views of the host's cache, read in place.
    Mask columns 0..T-1 address cache slots and T..T+S-1 the new tokens. The caller writes new_k/new_v into its
    cache at the positions it chose, so the graph neither copies nor owns the cache.
    """

    def __init__(self, text_config, tp: int = 1, rank: int = 0, all_reduce: Callable = _identity,
                 options: TextOptions = TextOptions()):
        super().__init__()
        self.config = text_config
        self.options = options
        self.plan = shard_plan(text_config, tp, rank)
        self.head_dim = options.head_dim or text_config.hidden_size // text_config.num_attention_heads
        self.layers = nn.ModuleList(DecoderLayer(text_config, self.plan, all_reduce, options, self.head_dim)
                                    for _ in range(text_config.num_hidden_layers))
        self.norm = RMSNorm(text_config.hidden_size, text_config.rms_norm_eps)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)

    def prefill_extras(self, seq: int) -> dict[str, torch.Tensor]:
        """Example extra inputs of the prompt graphs, after the key ranges: deepstack [layers, 1, S, hidden], the
        visual features added after each of the first layers (zero off the image positions)."""
        k = self.options.deepstack_layers
        return {"deepstack": torch.zeros(k, 1, seq, self.config.hidden_size)} if k else {}

    def forward(self, inputs_embeds, cos, sin, mask, *rest):
        x = inputs_embeds
        n = len(self.layers)
        extras = 1 if self.options.deepstack_layers else 0
        if len(rest) not in (2 * n, 4 * n, extras):
            raise ValueError(f"expected {2 * n} cache tensors (k then v per layer), {4 * n} (and their scales) or "
                             f"none (and {extras} prompt inputs), got {len(rest)}")
        caches = rest if len(rest) in (2 * n, 4 * n) else ()
        deepstack = None
        if extras and not caches:  # split + reshape, not deepstack[i]: a select imports as `take` (see prompt())
            deepstack = [t.reshape(t.shape[1:]) for t in rest[0].split(1, dim=0)]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            # Only the last position's logits are wanted, so a prompt's last layer, once it has every position's
            # keys and values for the cache, runs its attention output and MLP for the last position alone: exact,
            # and a layer's o_proj and MLP less of the prompt's matmuls (llama.cpp skips the same work).
            last_only = not caches and i == n - 1
            scales = (caches[2 * n + i], caches[3 * n + i]) if len(caches) == 4 * n else (None, None)
            x, k, v = layer(x, cos, sin, mask, *((caches[i], caches[n + i]) if caches else ()), last_only=last_only,
                            scales=scales)
            if deepstack is not None and i < len(deepstack):  # zeros off the image: adding them is exact
                x = x + deepstack[i][:, deepstack[i].shape[1] - x.shape[1]:]
            new_k.append(k)
            new_v.append(v)
        # A static slice, not x[:, -1]: TVM 0.27's importer mistranslates a negative select index.
        logits = self.lm_head(self.norm(x[:, x.shape[1] - 1:])).flatten(1)
        return logits, torch.stack(new_k), torch.stack(new_v)


# ---------------------------------------------------------------------------------------- weights and sharding

# Which checkpoint tensors are split for tensor parallelism, and along which axis (PyTorch [out, in] layout).
SHARDING = {
    "self_attn.q_proj": ("column", "q"),
    "self_attn.k_proj": ("column", "kv"),
    "self_attn.v_proj": ("column", "kv"),
    "self_attn.o_proj": ("row", "q"),
    "mlp.gate_proj": ("column", "mlp"),
    "mlp.up_proj": ("column", "mlp"),
    "mlp.down_proj": ("row", "mlp"),
}

# Checkpoint tensors that the deploy model holds as one tensor, concatenated along the output axis (after sharding):
# one wide matmul instead of several narrow ones over the same input keeps the cores busier and halves the calls.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

PREFIXES = {  # checkpoint prefix -> deploy prefix, per part (original Qwen layout and transformers 5's layout)
    "vision": (("visual.", ""), ("model.visual.", "")),
    "text": (("model.language_model.", ""), ("model.", ""), ("lm_head.", "lm_head.")),
}


def _weight_files(checkpoint_dir: str | Path) -> list[Path]:
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {checkpoint_dir}")
    return files


def iter_weights(checkpoint_dir: str | Path, part: str, keys: set[str] | None = None, prefixes: dict = PREFIXES):
    """(name, tensor) of the vision tower ("vision") or the language model ("text", with lm_head), renamed by
    `prefixes`, one tensor at a time, read straight from the files (a multi-GB checkpoint is never held twice);
    `keys`: only these names."""
    from ....runtime.safetensors_io import iter_tensors, read_header

    for file in _weight_files(checkpoint_dir):
        names = {key: deploy_name(key, part, prefixes) for key in read_header(file)[0]}
        chosen = [k for k, n in names.items() if n is not None and (keys is None or n in keys)]
        for key, tensor in iter_tensors(file, chosen):
            yield names[key], tensor


def deploy_name(key: str, part: str, prefixes: dict = PREFIXES) -> str | None:
    """A checkpoint tensor's name in `part`'s deploy model, or None when it is not part of it: the longest prefix
    of any part decides (so model.visual.* is the tower's, not the text model's under model.*)."""
    best = max(((len(p), owner, p, new) for owner, pairs in prefixes.items() for p, new in pairs if key.startswith(p)),
               default=None)
    if best is None or best[1] != part:
        return None
    return best[3] + key[len(best[2]):]


def checkpoint_names(checkpoint_dir: str | Path, part: str, prefixes: dict = PREFIXES) -> set[str]:
    from ....runtime.safetensors_io import read_header

    names = (deploy_name(k, part, prefixes) for file in _weight_files(checkpoint_dir) for k in read_header(file)[0])
    return {n for n in names if n is not None}


def fused_parts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each fused layer of a deploy model -> the checkpoint layers concatenated into it (see FUSED)."""
    out = {}
    for name, _ in model.named_modules():
        for fused, parts in FUSED.items():
            if name == fused or name.endswith("." + fused):
                prefix = name[:len(name) - len(fused)]
                out[name] = tuple(prefix + p for p in parts)
    return out


def load_streaming(model: nn.Module, weights, scheme: Scheme, shard=None) -> nn.Module:
    """Fill a deploy model built on the meta device from (checkpoint name, tensor) pairs: each tensor is quantized
    (when its layer is, on the full weight), sliced for this rank, fused with its FUSED siblings and assigned, so
    memory holds the stored model plus one checkpoint tensor at a time."""
    parts = fused_parts(model)
    quantized = set(swap_linears(model, scheme, parts))
    part_of = {p: (fused, i) for fused, names in parts.items() for i, p in enumerate(names)}
    state, pending = {}, {}

    def put(layer, kind, value):
        if isinstance(value, QuantizedWeight):
            weight, scale = value.stored()
            state[f"{layer}.weight"] = weight
            if scale is not None:
                state[f"{layer}.scale"] = scale
        else:
            state[f"{layer}.{kind}" if layer else kind] = value.float().contiguous()

    for key, tensor in weights:
        layer, _, kind = key.rpartition(".")
        target, index = part_of.get(layer, (layer, None))
        if kind == "weight" and target in quantized:
            tensor = quantize(tensor.reshape(tensor.shape[0], -1), scheme.weights, scheme.group, name=layer)
        elif not isinstance(tensor, QuantizedWeight):
            tensor = tensor.float()
        if shard is not None:
            tensor = shard(key, tensor)
        if index is None:
            put(target, kind, tensor)
            continue
        group = pending.setdefault((target, kind), {})
        group[index] = tensor
        if len(group) == len(parts[target]):
            values = [group[i] for i in range(len(group))]
            del pending[(target, kind)]
            put(target, kind, QuantizedWeight.cat(values) if isinstance(values[0], QuantizedWeight)
                else torch.cat(values))
    if pending:
        raise ValueError(f"the checkpoint lacks parts of {sorted(t for t, _ in pending)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_vision(checkpoint_dir: str | Path, config, chunks=None, scheme: Scheme | None = None) -> DeployVision:
    with torch.device("meta"):
        model = DeployVision(config.vision_config, chunks)
    # Conv3d with stride == kernel is a matmul: its weight flattened to [out, in * t * p * p]
    weights = ((("patch_embed.weight", t.reshape(t.shape[0], -1)) if k == "patch_embed.proj.weight" else (k, t))
               for k, t in iter_weights(checkpoint_dir, "vision"))
    return load_streaming(model, weights, scheme or Scheme())


def _shard(name: str, tensor, plan: ShardPlan, head_dim: int):
    """This rank's slice of a checkpoint tensor (or of a quantized weight) by SHARDING."""
    for suffix, (kind, axis_of) in SHARDING.items():
        if f".{suffix}." not in f".{name}":
            continue
        if axis_of == "q":
            start, size = plan.q_head_start * head_dim, plan.num_heads * head_dim
        elif axis_of == "kv":
            start, size = plan.kv_head_start * head_dim, plan.num_kv_heads * head_dim
        else:
            start, size = plan.rank * plan.intermediate, plan.intermediate
        dim = 0 if kind == "column" or tensor.ndim == 1 else 1  # column split: output rows (and their bias)
        if isinstance(tensor, QuantizedWeight):
            return tensor.slice(dim, start, size, name=f"{name.rpartition('.')[0]} at tp={plan.tp}")
        return tensor.narrow(dim, start, size).contiguous()
    return tensor


def load_language_model(checkpoint_dir: str | Path, text_config, tp: int = 1, rank: int = 0,
                        all_reduce: Callable | None = None, scheme: Scheme | None = None,
                        options: TextOptions = TextOptions(), prefixes: dict = PREFIXES) -> DeployLanguageModel:
    with torch.device("meta"):
        model = DeployLanguageModel(text_config, tp, rank, all_reduce or _identity, options)
    names = checkpoint_names(checkpoint_dir, "text", prefixes) - {"embed_tokens.weight"}  # looked up on the host
    weights = iter_weights(checkpoint_dir, "text", names, prefixes)
    if "lm_head.weight" not in names:  # tied embeddings (e.g. the 3B model)
        tied = (("lm_head.weight", t)
                for _, t in iter_weights(checkpoint_dir, "text", {"embed_tokens.weight"}, prefixes))
        weights = itertools.chain(weights, tied)
    return load_streaming(model, weights, scheme or Scheme(),
                           shard=lambda name, t: _shard(name, t, model.plan, model.head_dim))


def embedding_table(checkpoint_dir: str | Path, prefixes: dict = PREFIXES) -> torch.Tensor:
    return next(iter_weights(checkpoint_dir, "text", {"embed_tokens.weight"}, prefixes))[1]


def text_loaders(prefixes: dict) -> tuple[Callable, Callable]:
    """`load_language_model` and `embedding_table` for a family whose language model is a plain decoder (switches
    from its `model_type`) stored under its own checkpoint prefixes."""
    def load(checkpoint_dir, text_config, tp: int = 1, rank: int = 0, all_reduce: Callable | None = None,
             scheme: Scheme | None = None) -> DeployLanguageModel:
        return load_language_model(checkpoint_dir, text_config, tp, rank, all_reduce, scheme,
                                   decoder_options(text_config), prefixes)

    def table(checkpoint_dir) -> torch.Tensor:
        return embedding_table(checkpoint_dir, prefixes)
    return load, table
