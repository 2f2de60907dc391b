"""Inputs of the fixed-shape visual graph, computed on the host: window order, rotary tables and masks.

A vision tower attends over the whole image in every block, or (window_size set) inside windows in most blocks and
over the whole image in a few. Its graph is compiled for a patch budget N; the host reorders an image's patches into
window order, pads them to N and describes the windows and the padding as per-patch key ranges (windows are
contiguous in window order), so the graph itself has no data-dependent control flow and no [N, N] mask. The graph
takes the arrays it declares, by name (the artifact's manifest lists them), from those computed here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .rope import vision_cos_sin, vision_position_ids


@dataclass(frozen=True)
class VisionSpec:
    """What the host needs to know about a vision tower (from the checkpoint's vision_config)."""

    head_dim: int
    patch_size: int
    merge_size: int
    window_size: int | None = None  # pixels per attention window side; None: full attention in every block
    rope_theta: float = 10000.0
    position_grid: int | None = None  # side of a learned square position table resampled to each grid (bilinear)

    @property
    def merge_unit(self) -> int:
        return self.merge_size * self.merge_size


def window_index(grid_thw, spec: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Order of merged units when grouped into attention windows, and the window sizes in patches.

    Windows tile the merged grid in squares of window_size // merge_size // patch_size units, row-major over
    windows and row-major inside each window; edge windows are partial. Without windows each frame is one window
    and the order is the processor's.
    """
    index, seqlens, offset = [], [], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        gh, gw = int(h) // spec.merge_size, int(w) // spec.merge_size
        units = spec.window_size // spec.merge_size // spec.patch_size if spec.window_size else max(gh, gw)
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
    """One image laid out for a graph compiled for `budget` patches: named arrays, of which a graph takes those it
    declares.

    pixel_values [budget, patch_dim]: patches in window order, zero padded; full_ranges int32 [budget, 2]: the keys
    [lo, hi) each patch attends to in full-attention blocks (every real patch); window_ranges (windowed towers): the
    same in window blocks; cos, sin [budget, head_dim]: the 2-D rotary tables; pos_index, pos_weight (towers with a
    learned position table): its bilinear taps per patch."""

    arrays: dict[str, np.ndarray]
    num_tokens: int  # merged output tokens that belong to the image
    reverse_index: np.ndarray  # output row order that undoes the window order

    def as_args(self, names) -> list[np.ndarray]:
        missing = [n for n in names if n not in self.arrays]
        if missing:
            raise ValueError(f"the visual graph takes {missing}, which the host does not compute for this tower")
        return [self.arrays[n] for n in names]


@functools.lru_cache(maxsize=64)
def _grid_rotary(grid: tuple[int, int, int], merge_size: int, head_dim: int, theta: float):
    """Rotary tables of an image grid. They depend on the grid alone and images of one size recur (a camera, a
    benchmark), so they are computed once per grid; read-only so that no caller can change the cached copy."""
    tables = vision_cos_sin(vision_position_ids(np.asarray(grid), merge_size), head_dim, theta)
    for table in tables:
        table.flags.writeable = False
    return tables


@functools.lru_cache(maxsize=64)
def _grid_position_taps(grid: tuple[int, int, int], side: int, merge_size: int):
    """Bilinear (align_corners) taps of a learned side x side position table for each patch of a grid, in the
    patches' merge-block order: indices int32 [n, 4] into the flattened table and weights [n, 4], the edge clamped.
    The float math is the reference's (transformers' get_vision_interpolation_indices_and_weights), in torch fp32,
    so the weights are bit-identical; cached per grid like the rotary tables."""
    t, h, w = grid
    within = torch.arange(t * h * w) % (h * w)
    in_col, in_row = within % merge_size, (within // merge_size) % merge_size
    block_col = (within // (merge_size * merge_size)) % (w // merge_size)
    block_row = within // (merge_size * merge_size * (w // merge_size))
    taps = []
    for index, size in ((block_row * merge_size + in_row, h), (block_col * merge_size + in_col, w)):
        src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
        floor = torch.floor(src)
        offsets = torch.arange(0, 2)
        taps.append(((floor.long()[:, None] + offsets).clamp(0, side - 1),
                     (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)))
    (h_taps, h_weights), (w_taps, w_weights) = taps
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4).to(torch.int32).numpy()
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4).numpy()
    for table in (indices, weights):
        table.flags.writeable = False
    return indices, weights


def build_visual_inputs(pixel_values: np.ndarray, grid_thw, spec: VisionSpec, budget: int,
                        dtype=np.float32, out: np.ndarray | None = None) -> VisualGraphInputs:
    """Lay out one image's (or video's, grid t > 1) patches [n, patch_dim] for a graph compiled for `budget` patches
    (n <= budget).

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
    # (zeros out, no work); real patches never see padding. Full attention spans one frame (a temporal patch of a
    # video: frames stay contiguous in window order), as the reference's cu_seqlens do.
    ends = np.cumsum(seqlens)
    full_ranges = np.zeros((budget, 2), dtype=np.int32)
    frame = n // max(int(grid[0]), 1)
    full_ranges[:n, 0] = np.arange(n) // frame * frame
    full_ranges[:n, 1] = full_ranges[:n, 0] + frame
    arrays = {"pixel_values": padded, "full_ranges": full_ranges, "cos": cos.astype(dtype), "sin": sin.astype(dtype)}
    if spec.position_grid:  # pos_index int32 [budget, 4], pos_weight [budget, 4]: padding rows weigh nothing
        index, weight = _grid_position_taps(grid, spec.position_grid, spec.merge_size)
        arrays["pos_index"] = np.zeros((budget, 4), dtype=np.int32)
        arrays["pos_weight"] = np.zeros((budget, 4), dtype=dtype)
        arrays["pos_index"][:n], arrays["pos_weight"][:n] = index[patch_order], weight[patch_order]
    if spec.window_size:
        window_ranges = arrays["window_ranges"] = np.zeros((budget, 2), dtype=np.int32)
        window_ranges[:n, 0] = np.repeat(ends - seqlens, seqlens)
        window_ranges[:n, 1] = np.repeat(ends, seqlens)
    return VisualGraphInputs(arrays, num_tokens=n // unit, reverse_index=np.argsort(order))
