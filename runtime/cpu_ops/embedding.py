"""Token embedding lookup on the host, from a table exported by the LLM compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EmbeddingTable:
    """A [vocab, hidden] table; rows are gathered by token id. Memory-mapped so ranks share the pages. A bf16 table
    (reduced-precision artifacts) is held as its uint16 bits and the gathered rows are widened to fp32 (exact)."""

    def __init__(self, table: np.ndarray):
        if table.ndim != 2:
            raise ValueError(f"embedding table must be 2-D, got shape {table.shape}")
        if table.dtype not in (np.float32, np.uint16):
            raise ValueError(f"embedding table must be float32 or bf16 bits (uint16), got {table.dtype}")
        self.table = table

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingTable":
        return cls(np.load(path, mmap_mode="r"))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.table.shape[1]

    def lookup(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        rows = self.table[ids]
        if rows.dtype == np.uint16:  # bf16 bits: the upper half of an fp32
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(rows)
