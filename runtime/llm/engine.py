"""LLM runtime core: a KV cache owned by the host and prefill/decode steps through a compiled (or PyTorch) graph.

A step function has the deploy graph's signature
    step(inputs_embeds [B,S,H], cos [B,S,D], sin [B,S,D], mask [B,1,S,T+S], *k_cache[l], *v_cache[l] [B,kv,T,D])
      -> logits [B, vocab], new_k, new_v [L,B,kv,S,D]
(prefill steps: B = 1, no caches, int32 key ranges [S, 2] in place of the mask, then the artifact's declared
per-token extras [count, 1, S, H], e.g. deepstack features)
and never writes the cache: the engine copies the S new rows into place, so a decode step moves O(layers * kv * D)
bytes of cache, not the cache. Prompts are left-padded to the smallest compiled prefill length that fits; a decode
step runs the smallest compiled decode batch that holds its sequences, whose slots must be consecutive (callers
keep them so with `move`), and the rows past them are padding that is computed but never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..artifact import aligned_zeros
from ..cpu_ops.masks import prompt_key_ranges
from ..cpu_ops.pipeline import TextSpec

StepFunction = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


class BudgetError(ValueError):
    """A request that does not fit the compiled prefill length or context."""


@dataclass
class CacheShape:
    layers: int
    kv_heads: int
    context: int  # T: positions the cache holds
    head_dim: int
    dtype: str = "fp32"  # stored format: fp32, bf16 or int8 (one fp32 scale per position and kv head)

    def bytes_per_token(self) -> int:
        per_row = {"fp32": 4 * self.head_dim, "bf16": 2 * self.head_dim, "int8": self.head_dim + 4}[self.dtype]
        return 2 * self.layers * self.kv_heads * per_row


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 cache rows: per row (last axis) s = max|x| / 127, q = clamp(round_half_even(x / s), -127, 127)."""
    scale = np.abs(rows).max(axis=-1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(rows / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even), as uint16 bits."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


class KVCache:
    """Per-slot key/value storage [layers, slots, kv_heads, T, head_dim] in the stored format: fp32; bf16 (held as
    uint16 bits, handed to graphs as bf16 tensors); int8 with scales [layers, slots, kv_heads, T]. New rows are
    rounded on the way in, so a step attends over exactly what the cache holds."""

    def __init__(self, shape: CacheShape, slots: int = 1, dtype=np.float32):
        dims = (shape.layers, slots, shape.kv_heads, shape.context, shape.head_dim)
        self.format = shape.dtype
        storage = {"fp32": dtype, "bf16": np.uint16, "int8": np.int8}[shape.dtype]
        self.k = aligned_zeros(dims, storage)  # aligned so graphs read it in place
        self.v = aligned_zeros(dims, storage)
        self.k_scale = self.v_scale = None
        if shape.dtype == "int8":
            self.k_scale, self.v_scale = aligned_zeros(dims[:-1]), aligned_zeros(dims[:-1])
        self.lengths = np.zeros(slots, dtype=np.int64)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def move(self, source: int, target: int) -> None:
        """Move a sequence's cached rows from slot `source` to the empty slot `target`."""
        if self.lengths[target]:
            raise ValueError(f"slot {target} is not empty")
        n = int(self.lengths[source])
        for array in (self.k, self.v, self.k_scale, self.v_scale):
            if array is not None:
                array[:, target, :, :n] = array[:, source, :, :n]
        self.lengths[target], self.lengths[source] = n, 0

    def views(self, first_slot: int, count: int) -> list:
        """Per-layer cache views [count, kv, T, D] of consecutive slots, keys of every layer then values (then the
        int8 scales likewise): the graphs' cache inputs, contiguous and aligned, so graphs read them in place."""
        part = slice(first_slot, first_slot + count)
        views = [*self.k[:, part], *self.v[:, part]]
        if self.format == "bf16":
            import torch

            return [torch.from_numpy(v).view(torch.bfloat16) for v in views]
        if self.format == "int8":
            views += [*self.k_scale[:, part], *self.v_scale[:, part]]
        return views

    def write(self, slot: int, new_k: np.ndarray, new_v: np.ndarray, count: int, batch_index: int = 0) -> None:
        """Append the last `count` rows of new_k/new_v [L,B,kv,S,D] (batch row `batch_index`) to `slot`."""
        start = int(self.lengths[slot])
        s = new_k.shape[3]
        where = (slice(None), slot, slice(None), slice(start, start + count))
        for cache, scales, new in ((self.k, self.k_scale, new_k), (self.v, self.v_scale, new_v)):
            rows = new[:, batch_index, :, s - count:]
            if self.format == "bf16":
                cache[where] = to_bf16_bits(rows)
            elif self.format == "int8":
                cache[where], scales[where] = quantize_rows(rows)
            else:
                cache[where] = rows
        self.lengths[slot] = start + count


class Sequence:
    """One request's decoding state."""

    def __init__(self, slot: int, rope_delta: int):
        self.slot = slot
        self.rope_delta = rope_delta
        self.generated: list[int] = []


class LLMEngine:
    def __init__(self, prefill: dict[int, StepFunction], decode: dict[int, StepFunction] | StepFunction,
                 spec: TextSpec, embed, cache_shape: CacheShape, slots: int = 1, dtype=np.float32,
                 prefill_extras: list[dict] = ()):
        """`decode`: step functions by batch size, or one that takes any batch (e.g. a TorchStep)."""
        if not prefill:
            raise ValueError("at least one prefill length is needed")
        self.prefill_steps = dict(sorted(prefill.items()))
        self.prefill_extras = list(prefill_extras)  # [{"name", "count"}]: per-token inputs of the prompt graphs
        self.decode_steps = dict(sorted(decode.items())) if isinstance(decode, dict) else \
            {b: decode for b in range(1, slots + 1)}
        self.last_decode_batch = 0  # the compiled batch the last decode step ran (metrics)
        self.spec = spec
        self.embed = embed
        self.cache_shape = cache_shape
        self.cache = KVCache(cache_shape, slots, dtype)
        self.dtype = dtype
        # Decode positions are text positions (t = h = w), so their M-RoPE rows come from one table computed once
        # with the same function (elementwise, hence bit-identical to computing them per step).
        positions = np.tile(np.arange(cache_shape.context, dtype=np.int64), (3, 1))
        self._rope_table = tuple(t.astype(dtype) for t in spec.cos_sin(positions))
        self._decode_inputs: dict[int, tuple[np.ndarray, ...]] = {}

    @property
    def max_prefill(self) -> int:
        return max(self.prefill_steps)

    @property
    def context(self) -> int:
        return self.cache_shape.context

    def check_budget(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens > self.max_prefill:
            raise BudgetError(f"the prompt has {prompt_tokens} tokens (text, images and videos), more than the compiled "
                              f"prefill length of {self.max_prefill}")
        if prompt_tokens + max_new_tokens > self.context:
            raise BudgetError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) is "
                              f"{prompt_tokens + max_new_tokens}, more than the compiled context of {self.context}")

    def _cos_sin(self, position_ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
        cos = np.zeros((1, seq, self.spec.head_dim), self.dtype)
        sin = np.zeros_like(cos)
        n = position_ids.shape[1]
        c, s = self.spec.cos_sin(position_ids)
        cos[0, seq - n:], sin[0, seq - n:] = c, s
        return cos, sin

    def prefill(self, seq: Sequence, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                extras: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run the prompt [n, hidden] through the smallest prefill graph that fits, on the sequence's empty cache
        slot (prefill graphs take no cache); returns last-token logits. `extras`: the per-token inputs the prompt
        graphs declare, [count, n, hidden] each (absent: zeros, e.g. a prompt without images)."""
        n = inputs_embeds.shape[0]
        length = next((p for p in self.prefill_steps if p >= n), None)
        if length is None:
            raise BudgetError(f"the prompt has {n} tokens, more than the compiled prefill length {self.max_prefill}")
        if n > self.context:
            raise BudgetError(f"{n} tokens exceed the compiled context of {self.context}")
        if self.cache.lengths[seq.slot]:
            raise ValueError(f"prefill needs an empty cache slot; slot {seq.slot} holds "
                             f"{int(self.cache.lengths[seq.slot])} positions")
        embeds = np.zeros((1, length, inputs_embeds.shape[1]), self.dtype)
        embeds[0, length - n:] = inputs_embeds
        cos, sin = self._cos_sin(position_ids, length)
        ranges = prompt_key_ranges(n, length)
        padded = []
        for extra in self.prefill_extras:
            array = np.zeros((extra["count"], 1, length, inputs_embeds.shape[1]), self.dtype)
            if extras and extra["name"] in extras:
                array[:, 0, length - n:] = extras[extra["name"]]
            padded.append(array)
        logits, new_k, new_v = self.prefill_steps[length](embeds, cos, sin, ranges, *padded)
        self.cache.write(seq.slot, new_k, new_v, n)
        return logits[0]

    def _decode_buffers(self, b: int) -> tuple[np.ndarray, ...]:
        """Aligned input arrays for a batch-`b` decode step, reused every step so the graph reads them in place."""
        if b not in self._decode_inputs:
            d, hidden, t = self.spec.head_dim, self.embed.hidden_size, self.context
            self._decode_inputs[b] = (aligned_zeros((b, 1, hidden), self.dtype), aligned_zeros((b, 1, d), self.dtype),
                                      aligned_zeros((b, 1, d), self.dtype), aligned_zeros((b, 1, 1, t + 1), self.dtype))
        return self._decode_inputs[b]

    def decode_batch(self, count: int) -> int:
        """The compiled decode batch a step over `count` sequences runs: the smallest that holds them."""
        batch = next((b for b in self.decode_steps if b >= count), None)
        if batch is None:
            raise ValueError(f"{count} sequences exceed the largest compiled decode batch of {max(self.decode_steps)}")
        return batch

    def decode(self, seqs: list[Sequence], tokens: list[int]) -> np.ndarray:
        """One decode step for sequences in consecutive cache slots; returns logits [len(seqs), vocab]."""
        n = len(seqs)
        slots = [s.slot for s in seqs]
        if slots != list(range(slots[0], slots[0] + n)):
            raise ValueError(f"a decode batch must use consecutive cache slots, got {slots}")
        b = self.decode_batch(n)
        if slots[0] + b > self.cache.slots:
            raise ValueError(f"a batch-{b} decode step from slot {slots[0]} runs past the {self.cache.slots} cache "
                             f"slots")
        cached = [int(self.cache.lengths[s]) for s in slots]
        if max(cached) + 1 > self.context:
            raise BudgetError(f"the sequence reached the compiled context of {self.context}")
        embeds, cos, sin, mask = self._decode_buffers(b)
        embeds[:n, 0] = self.embed.lookup(np.asarray(tokens))
        table_cos, table_sin = self._rope_table
        neg = np.finfo(self.dtype).min
        for i, (s, c) in enumerate(zip(seqs, cached)):
            pos = c + s.rope_delta
            if 0 <= pos < len(table_cos):
                cos[i, 0], sin[i, 0] = table_cos[pos], table_sin[pos]
            else:
                cos[i], sin[i] = self.spec.cos_sin(np.full((3, 1), pos, dtype=np.int64))
            # The decode mask row: the cached prefix and the new token itself.
            mask[i, 0, 0, :c] = 0
            mask[i, 0, 0, c:self.context] = neg
            mask[i, 0, 0, self.context] = 0
        # Padding rows attend to themselves only (finite, whatever their slots hold); their outputs are dropped.
        mask[n:, 0, 0, :self.context] = neg
        mask[n:, 0, 0, self.context] = 0
        logits, new_k, new_v = self.decode_steps[b](embeds, cos, sin, mask, *self.cache.views(slots[0], b))
        self.last_decode_batch = b
        for i, s in enumerate(seqs):
            self.cache.write(s.slot, new_k, new_v, 1, batch_index=i)
        return logits[:n]

    def move(self, seq: Sequence, slot: int) -> None:
        """Move `seq` to the empty cache slot `slot` (to keep running sequences in consecutive slots)."""
        self.cache.move(seq.slot, slot)
        seq.slot = slot

    def release(self, seq: Sequence) -> None:
        self.cache.lengths[seq.slot] = 0

    def reserve(self, seq: Sequence, length: int) -> None:
        """Mark `length` positions of seq's slot as cached without writing them: `vlmc bench` times decode steps at
        a set context, whose cost does not depend on the cached values."""
        self.cache.lengths[seq.slot] = length


def splice_image_features(input_ids: np.ndarray, image_token_id: int, features: list[np.ndarray], count: int,
                          hidden: int) -> np.ndarray:
    """Per-token features [count, n, hidden] of a prompt: each image's [count, tokens, hidden] at its run of image
    pad tokens, zeros elsewhere."""
    ids = np.asarray(input_ids)
    positions = np.flatnonzero(ids == image_token_id)
    out = np.zeros((count, len(ids), hidden), np.float32)
    if features:
        stacked = np.concatenate(features, axis=1)
        if stacked.shape[1] != positions.size:
            raise ValueError(f"{positions.size} image tokens in the prompt but {stacked.shape[1]} image features")
        out[:, positions] = stacked
    return out


def splice_image_embeddings(token_embeds: np.ndarray, input_ids: np.ndarray, image_token_id: int,
                            image_embeds: list[np.ndarray]) -> np.ndarray:
    """Put each image's embeddings at its run of image pad tokens, in prompt order."""
    out = np.array(token_embeds, copy=True)
    positions = np.flatnonzero(np.asarray(input_ids) == image_token_id)
    stacked = np.concatenate(image_embeds, axis=0) if image_embeds else np.zeros((0, out.shape[1]), out.dtype)
    if stacked.shape[0] != positions.size:
        raise ValueError(f"{positions.size} image tokens in the prompt but {stacked.shape[0]} image embeddings")
    out[positions] = stacked
    return out

