"""Attention masks for the LLM graph, built on the host."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def decoder_mask(num_cached: Sequence[int], num_new: Sequence[int], cache_len: int, seq: int,
                 dtype=np.float32) -> np.ndarray:
    """Additive mask [B, 1, seq, cache_len + seq]; new tokens are right-aligned in `seq` (left padding).

    Columns 0..cache_len-1 are cache slots, the rest the new tokens. Row i of sequence b (real when
    i >= seq - num_new[b]) sees cache slots < num_cached[b] and new tokens from the first real one up to i.
    Padding rows see only themselves, so every row has a finite softmax.
    """
    neg = np.finfo(dtype).min
    rows = np.arange(seq)
    mask = np.full((len(num_cached), 1, seq, cache_len + seq), neg, dtype=dtype)
    for b, (cached, new) in enumerate(zip(num_cached, num_new)):
        first = seq - new
        mask[b, 0, first:, :cached] = 0
        visible = (rows[None, :] <= rows[:, None]) & (rows[None, :] >= first)
        visible[rows[:first], rows[:first]] = True
        mask[b, 0, :, cache_len:][visible] = 0
    return mask
