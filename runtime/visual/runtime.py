"""Visual runtime: encode one image at a time through a compiled fixed-shape visual graph.

Host ops -> window order and padding to the patch budget -> the graph -> chunks joined -> window order undone.
An image whose patch count exceeds the budget is resized (max_pixels lowered) until it fits.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import aligned_zeros, check_device, load_library, load_params, read_manifest, visual_graph_file
from ..cpu_ops.image import ImageConfig, image_to_patches, load_image
from ..cpu_ops.pipeline import HostSpec
from ..cpu_ops.vision import build_visual_inputs

log = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    embeddings: np.ndarray  # [visual tokens, hidden] float32, in transformers' order
    grid_thw: tuple[int, int, int]
    resized_to: tuple[int, int]  # (height, width) actually fed to the encoder
    fitted: bool  # True when the image was shrunk to fit the compiled patch budget
    seconds: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # the graph's other output groups, by name


def fit_to_budget(cfg: ImageConfig, budget: int) -> ImageConfig:
    """Lower max_pixels so that no image can produce more than `budget` patches."""
    max_pixels = budget * cfg.patch_size * cfg.patch_size
    if cfg.max_pixels <= max_pixels:
        return cfg
    return cfg.with_pixels(min(cfg.min_pixels, max_pixels), max_pixels)


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


class VisualRuntime:
    def __init__(self, artifact: str | Path, device: str = "cpu", verify: bool = True):
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, kind="visual", verify=verify)
        device = check_device(self.manifest, self.path, device)
        self.spec = HostSpec.from_dict(self.manifest["host"])
        self.budget = int(self.manifest["patch_budget"])
        self.hidden_size = int(self.manifest["hidden_size"])
        # What the architecture declared: the graph's inputs by name, its outputs as groups of chunked tensors
        self.input_names = [name for name, _, _ in self.manifest["graph_inputs"]]
        self.output_groups = self.manifest["output_groups"]
        params = load_params(self.path / "params.safetensors", self.manifest["param_names"], device)
        # One graph per compiled patch budget, all sharing the parameters; an image runs in the smallest that fits.
        self.buckets = sorted(int(b) for b in self.manifest["patch_buckets"])
        self.graphs = {b: load_library(self.path / visual_graph_file(b, self.budget), params, device)
                       for b in self.buckets}
        self._inputs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def image_config(self, min_pixels: int | None = None, max_pixels: int | None = None) -> ImageConfig:
        return self.spec.image.with_pixels(min_pixels, max_pixels)

    def patches(self, source, cfg: ImageConfig):
        """Patches and grid for `source`, shrinking the image until it fits the compiled budget."""
        image = load_image(source)
        pixel_values, grid = image_to_patches(image, cfg)
        fitted = False
        budget = self.budget
        while pixel_values.shape[0] > self.budget:  # smart_resize's rounding can overshoot at extreme ratios
            fitted = True
            pixel_values, grid = image_to_patches(image, fit_to_budget(cfg, budget))
            budget = budget * 9 // 10
            if budget < cfg.merge_size ** 2:
                raise ValueError(f"the image cannot be resized into {self.budget} patches")
        return pixel_values, grid, fitted

    def encode_outputs(self, pixel_values: np.ndarray, grid) -> dict[str, np.ndarray]:
        """Every output group of the graph by name, in transformers' token order: [tokens, hidden] for a group of one
        tensor, [count, tokens, hidden] for a group of several (e.g. features for several LLM layers)."""
        bucket = next(b for b in self.buckets if b >= pixel_values.shape[0])
        with self._lock:  # the graph's input buffer is reused from image to image
            buffer = self._inputs.get(bucket)
            if buffer is None:
                buffer = self._inputs[bucket] = aligned_zeros((bucket, pixel_values.shape[1]), np.float32)
            inputs = build_visual_inputs(pixel_values, grid, self.spec.vision, bucket, out=buffer)
            outputs = self.graphs[bucket](*inputs.as_args(self.input_names))
        return split_output_groups(outputs, self.output_groups, inputs.num_tokens, inputs.reverse_index)

    def encode(self, source, min_pixels: int | None = None, max_pixels: int | None = None) -> EncodedImage:
        t0 = time.perf_counter()
        cfg = self.image_config(min_pixels, max_pixels)
        pixel_values, grid, fitted = self.patches(source, cfg)
        outputs = self.encode_outputs(pixel_values, grid)
        embeddings = outputs.pop("embeddings")
        _, gh, gw = grid
        if fitted:
            log.info("image resized to %dx%d to fit the compiled budget of %d patches",
                     gw * cfg.patch_size, gh * cfg.patch_size, self.budget)
        return EncodedImage(embeddings, tuple(int(g) for g in grid), (gh * cfg.patch_size, gw * cfg.patch_size),
                            fitted, time.perf_counter() - t0, outputs)
