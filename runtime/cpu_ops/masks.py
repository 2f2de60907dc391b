"""What the LLM prompt graphs attend to, built on the host (decode steps build their mask rows in the engine)."""

from __future__ import annotations

import numpy as np


def prompt_key_ranges(num_new: int, seq: int) -> np.ndarray:
    """Key ranges int32 [seq, 2] of a prompt graph: the prompt's num_new tokens are right-aligned in `seq` (left
    padding); real row i attends to [first real row, i + 1), padding rows to nothing (their output is zeros)."""
    first = seq - num_new
    rows = np.arange(seq, dtype=np.int32)
    ranges = np.zeros((seq, 2), dtype=np.int32)
    ranges[first:, 0] = first
    ranges[first:, 1] = rows[first:] + 1
    return ranges
