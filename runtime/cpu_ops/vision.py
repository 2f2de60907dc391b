"""Inputs of the fixed-shape visual graph, computed on the host: window order, rotary tables and masks.

The vision tower attends inside windows in most blocks and over the whole image in a few. Its graph is compiled
for a patch budget N; the host reorders an image's patches into window order, pads them to N and describes the
windows and the padding as per-patch key ranges (windows are contiguous in window order), so the graph itself has
no data-dependent control flow and no [N, N] mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .rope import vision_cos_sin, vision_position_ids


@dataclass(frozen=True)
class VisionSpec:
    """What the host needs to know about a vision tower (from the checkpoint's vision_config)."""

    head_dim: int
    patch_size: int
    merge_size: int
    window_size: int
    rope_theta: float = 10000.0

    @property
    def merge_unit(self) -> int:
        return self.merge_size * self.merge_size


def window_index(grid_thw, spec: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Order of merged units when grouped into attention windows, and the window sizes in patches.

    Windows tile the merged grid in squares of window_size // merge_size // patch_size units, row-major over
    windows and row-major inside each window; edge windows are partial.
    """
    units = spec.window_size // spec.merge_size // spec.patch_size
    index, seqlens, offset = [], [], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        gh, gw = int(h) // spec.merge_size, int(w) // spec.merge_size
        ids = np.arange(int(t) * gh * gw).reshape(int(t), gh, gw)
        for frame in ids:
            for r0 in range(0, gh, units):
                for c0 in range(0, gw, units):
                    block = frame[r0:r0 + units, c0:c0 + units].reshape(-1)
                    index.append(block + offset)
                    seqlens.append(block.size * spec.merge_unit)
        offset += int(t) * gh * gw
    return np.concatenate(index).astype(np.int64), np.asarray(seqlens, dtype=np.int64)


@dataclass
class VisualGraphInputs:
    """One image laid out for a graph compiled for `budget` patches."""

    pixel_values: np.ndarray  # [budget, patch_dim], patches in window order, zero padded
    window_ranges: np.ndarray  # int32 [budget, 2]: the keys [lo, hi) each patch attends to in window blocks
    full_ranges: np.ndarray  # int32 [budget, 2]: the same for full-attention blocks (every real patch)
    cos: np.ndarray  # [budget, head_dim]
    sin: np.ndarray
    num_tokens: int  # merged output tokens that belong to the image
    reverse_index: np.ndarray  # output row order that undoes the window order

    def as_args(self) -> list[np.ndarray]:
        return [self.pixel_values, self.window_ranges, self.full_ranges, self.cos, self.sin]


@functools.lru_cache(maxsize=64)
def _grid_rotary(grid: tuple[int, int, int], merge_size: int, head_dim: int, theta: float):
    """Rotary tables of an image grid. They depend on the grid alone and images of one size recur (a camera, a
    benchmark), so they are computed once per grid; read-only so that no caller can change the cached copy."""
    tables = vision_cos_sin(vision_position_ids(np.asarray(grid), merge_size), head_dim, theta)
    for table in tables:
        table.flags.writeable = False
    return tables


def build_visual_inputs(pixel_values: np.ndarray, grid_thw, spec: VisionSpec, budget: int,
                        dtype=np.float32, out: np.ndarray | None = None) -> VisualGraphInputs:
    """Lay out one image's patches [n, patch_dim] for a graph compiled for `budget` patches (n <= budget).

    `out` ([budget, patch_dim]) receives the laid-out patches when given: a buffer kept between images saves
    faulting in fresh pages for every image (megabytes per image, about a millisecond)."""
    n = pixel_values.shape[0]
    if n > budget:
        raise ValueError(f"image has {n} patches, more than the compiled budget of {budget}")
    unit = spec.merge_unit
    order, seqlens = window_index(grid_thw, spec)
    patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)

    padded = np.empty((budget, pixel_values.shape[1]), dtype=dtype) if out is None else out
    np.take(pixel_values, patch_order, axis=0, out=padded[:n])  # no temporary: one pass over the patches
    padded[n:] = 0
    cos = np.zeros((budget, spec.head_dim), dtype=np.float32)
    sin = np.zeros((budget, spec.head_dim), dtype=np.float32)
    grid = tuple(int(g) for g in np.asarray(grid_thw).reshape(-1)[:3])
    c, s = _grid_rotary(grid, spec.merge_size, spec.head_dim, float(spec.rope_theta))
    cos[:n], sin[:n] = c[patch_order], s[patch_order]

    # Windows are contiguous in window order, so each patch's keys are one range. Padding rows get the empty range
    # (zeros out, no work); real patches never see padding.
    ends = np.cumsum(seqlens)
    window_ranges = np.zeros((budget, 2), dtype=np.int32)
    window_ranges[:n, 0] = np.repeat(ends - seqlens, seqlens)
    window_ranges[:n, 1] = np.repeat(ends, seqlens)
    full_ranges = np.zeros((budget, 2), dtype=np.int32)
    full_ranges[:n, 1] = n
    return VisualGraphInputs(
        pixel_values=padded, window_ranges=window_ranges, full_ranges=full_ranges,
        cos=cos.astype(dtype), sin=sin.astype(dtype),
        num_tokens=n // unit,
        reverse_index=np.argsort(order),
    )
