"""Visual runtime: encode one image at a time through a compiled fixed-shape visual graph.

Native-resolution towers: host ops -> window order and padding to the patch budget -> the graph -> chunks joined
-> window order undone. An image whose patch count exceeds the budget is resized (max_pixels lowered) until it fits.
A video runs as whole temporal patches, as many per call as the budget holds; the tower attends within one temporal
patch (windows, and full attention over the frame), so splitting a video between calls changes nothing. Its frames
are made smaller only when one temporal patch alone would exceed the budget.
Tiling towers: the image is cut into at most the compiled number of grid tiles (plus its thumbnail / global tile),
and the tiles run through the graph in as few calls of its fixed tile count as they can.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import aligned_zeros, check_device, load_library, load_params, read_manifest, visual_graph_file
from ..cpu_ops.image import describe, load_image
from ..cpu_ops.pipeline import HostSpec
from ..cpu_ops.tiles import tiles_to_patches
from ..cpu_ops.vision import build_visual_inputs

log = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    embeddings: np.ndarray  # [visual tokens, hidden] float32, in transformers' order
    grid_thw: tuple[int, int, int]  # the layout: (t, h, w) patches, or (tiles, rows, columns)
    resized_to: tuple[int, int]  # (height, width) actually fed to the encoder (the tile grid's, for tiles)
    fitted: bool  # True when the image was shrunk (or cut into fewer tiles) to fit the compiled budget
    seconds: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # the graph's other output groups, by name


def split_output_groups(outputs: list[np.ndarray], groups: list[dict], num_tokens: int,
                        reverse_index: np.ndarray) -> dict[str, np.ndarray]:
    """A visual graph's flat outputs -> {group: array}: each group is `count` tensors of `chunks` along the hidden
    axis, in order; rows past the image's tokens (padding) are dropped and the window order undone."""
    out, i = {}, 0
    for group in groups:
        tensors = []
        for _ in range(group["count"]):
            parts = outputs[i:i + len(group["chunks"])]
            i += len(group["chunks"])
            merged = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
            tensors.append(np.ascontiguousarray(merged[:num_tokens][reverse_index], dtype=np.float32))
        out[group["name"]] = tensors[0] if group["count"] == 1 else np.stack(tensors)
    if i != len(outputs):
        raise ValueError(f"the visual graph returned {len(outputs)} outputs; its manifest describes {i}")
    return out


def tile_calls(num_tiles: int, buckets: list[int]) -> list[int]:
    """Tile counts of the graph calls for an image of `num_tiles` tiles: the largest compiled count while it is
    filled, then the smallest that holds the rest."""
    calls, left = [], num_tiles
    while left > 0:
        size = buckets[-1] if left >= buckets[-1] else next(b for b in buckets if b >= left)
        calls.append(size)
        left -= size
    return calls


class VisualRuntime:
    def __init__(self, artifact: str | Path, device: str = "cpu", verify: bool = False):
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, kind="visual", verify=verify)
        device = check_device(self.manifest, self.path, device)
        self.spec = HostSpec.from_dict(self.manifest["host"])
        self.tiled = self.spec.tiled
        # Native grids: a patch budget and per-budget graphs; tiles: a cap on the grid tiles and per-tile-count graphs
        self.budget = int(self.manifest["max_tiles" if self.tiled else "patch_budget"])
        if self.tiled:  # the processor's own cap when it is lower than the compiled one
            self.budget = min(self.budget, self.spec.image.max_tiles)
        self.buckets = sorted(int(b) for b in self.manifest["tile_buckets" if self.tiled else "patch_buckets"])
        self.hidden_size = int(self.manifest["hidden_size"])
        # What the architecture declared: the graph's inputs by name, its outputs as groups of chunked tensors
        self.input_names = [name for name, _, _ in self.manifest["graph_inputs"]]
        self.input_shapes = {name: shape for name, shape, _ in self.manifest["graph_inputs"]}
        self.output_groups = self.manifest["output_groups"]
        if self.tiled:  # graph rows per tile (patches, and a class token where the tower has one)
            self.tile_rows = self.input_shapes["full_ranges"][0] // self.buckets[-1]
        params = load_params(self.path / "params.safetensors", self.manifest["param_names"], device)
        # One graph per compiled budget, all sharing the parameters; an image runs in the smallest that fits.
        self.graphs = {b: load_library(self.path / visual_graph_file(b, self.buckets[-1]), params, device)
                       for b in self.buckets}
        self._inputs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def image_config(self, min_pixels: int | None = None, max_pixels: int | None = None):
        return self.spec.image.with_pixels(min_pixels, max_pixels)

    def prepare(self, source, cfg):
        """What the graph takes for `source` (patches, or tiles), its layout, and whether it was made smaller to
        fit the compiled budget."""
        return self.spec.prepare_image(load_image(source), cfg, self.budget, f"image {describe(source)!r}")

    def _buffer(self, bucket: int, shape) -> np.ndarray:
        buffer = self._inputs.get(bucket)
        if buffer is None:
            buffer = self._inputs[bucket] = aligned_zeros(tuple(shape), np.float32)
        return buffer

    def encode_outputs(self, pixel_values: np.ndarray, grid) -> dict[str, np.ndarray]:
        """Every output group of the graph by name, in transformers' token order: [tokens, hidden] for a group of one
        tensor, [count, tokens, hidden] for a group of several (e.g. features for several LLM layers)."""
        if self.tiled:
            return self._encode_tiles(pixel_values)
        bucket = next(b for b in self.buckets if b >= pixel_values.shape[0])
        with self._lock:  # the graph's input buffer is reused from image to image
            buffer = self._buffer(bucket, (bucket, pixel_values.shape[1]))
            inputs = build_visual_inputs(pixel_values, grid, self.spec.vision, bucket, out=buffer)
            outputs = self.graphs[bucket](*inputs.as_args(self.input_names))
        return split_output_groups(outputs, self.output_groups, inputs.num_tokens, inputs.reverse_index)

    def prepare_video(self, source, request=None):
        """A video's temporal patches and timing (see HostSpec.prepare_video), frames small enough for one temporal
        patch to fit the compiled budget."""
        return self.spec.prepare_video(source, request, None if self.tiled else self.budget)

    def encode_video(self, video) -> tuple[dict[str, np.ndarray], int]:
        """A PreparedVideo through the graph in chunks of whole temporal patches: its output groups (as
        encode_outputs) and the number of graph calls."""
        t, h, w = video.grid_thw
        per_frame = h * w
        frames_per_call = max(1, self.buckets[-1] // per_frame)
        parts = []
        for start in range(0, t, frames_per_call):
            count = min(frames_per_call, t - start)
            rows = video.pixel_values[start * per_frame:(start + count) * per_frame]
            parts.append(self.encode_outputs(rows, (count, h, w)))
        out = {g["name"]: np.concatenate([p[g["name"]] for p in parts], axis=0 if g["count"] == 1 else 1)
               for g in self.output_groups}
        return out, len(parts)

    def _encode_tiles(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Tiles [n, 3, S, S] through graphs of fixed tile counts. The graph's rows per tile (patches, and any
        class token) come from its declared key ranges [rows, 2]: each tile attends within itself, padding tiles
        to nothing."""
        cfg, per_tile = self.spec.image, self.spec.image.tokens_per_tile
        parts, start = [], 0
        for size in tile_calls(tiles.shape[0], self.buckets):
            chunk = tiles[start:start + size]
            real = chunk.shape[0]
            start += real
            with self._lock:
                buffer = self._buffer(size, (size * cfg.patches_per_tile, cfg.patch_dim))
                tiles_to_patches(chunk, cfg.patch_size, out=buffer[:real * cfg.patches_per_tile])
                buffer[real * cfg.patches_per_tile:] = 0
                arrays = {"pixel_values": buffer, "full_ranges": self._tile_ranges(size, real)}
                outputs = self.graphs[size](*(arrays[name] for name in self.input_names))
            parts.append(split_output_groups(outputs, self.output_groups, real * per_tile, np.arange(real * per_tile)))
        return {g["name"]: np.concatenate([p[g["name"]] for p in parts], axis=0 if g["count"] == 1 else 1)
                for g in self.output_groups}

    def _tile_ranges(self, size: int, real: int) -> np.ndarray:
        rows = self.tile_rows
        ranges = np.zeros((size * rows, 2), dtype=np.int32)
        starts = np.repeat(np.arange(real, dtype=np.int32) * rows, rows)
        ranges[:real * rows, 0], ranges[:real * rows, 1] = starts, starts + rows
        return ranges

    def encode(self, source, min_pixels: int | None = None, max_pixels: int | None = None) -> EncodedImage:
        t0 = time.perf_counter()
        cfg = self.image_config(min_pixels, max_pixels)
        pixel_values, grid, fitted = self.prepare(source, cfg)
        outputs = self.encode_outputs(pixel_values, grid)
        embeddings = outputs.pop("embeddings")
        if self.tiled:
            _, rows, cols = grid
            resized = (rows * cfg.tile_size, cols * cfg.tile_size)
            if fitted:
                log.info("image cut into %dx%d tiles to fit the compiled cap of %d tiles", rows, cols, self.budget)
        else:
            _, gh, gw = grid
            resized = (gh * cfg.patch_size, gw * cfg.patch_size)
            if fitted:
                log.info("image resized to %dx%d to fit the compiled budget of %d patches", resized[1], resized[0],
                         self.budget)
        return EncodedImage(embeddings, tuple(int(g) for g in grid), resized, fitted, time.perf_counter() - t0,
                            outputs)
