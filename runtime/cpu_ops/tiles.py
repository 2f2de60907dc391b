"""Host-side ops of the tiling families: cut an image into fixed square tiles and expand its prompt placeholder.

Two ways of choosing the tiles, both as transformers' PIL image processors do them (bit for bit on the resizes):
- "aspect_ratio" (transformers' `crop_to_patches`): the (columns, rows) grid of min..max tiles whose
  aspect ratio is closest to the image's (ties go to the larger grid while the image covers more than half of
  it), one resize to that grid, row-major crops, plus a thumbnail of the whole image when there is more than one
  tile.
- "longest_edge": resize the longest edge to `longest_edge` (even sides), resize both sides
  up to multiples of the tile, crop row-major, plus the whole image resized to one tile ("global") when there is
  more than one tile.

A tiled image is described to the rest of the host by its layout (tiles, rows, columns): `tiles` includes the
thumbnail / global tile. The prompt placeholder of each image is expanded as a string before tokenising, as the
processors do ("wrapped": start + image token x tokens + end; "tile_grid": per tile a row/column marker and the
image tokens, then the global image).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .image import ImageInputError, MAX_ASPECT_RATIO, normalized_values

TILINGS = ("aspect_ratio", "longest_edge")
PROMPT_FORMATS = ("wrapped", "tile_grid")


@dataclass(frozen=True)
class TileConfig:
    """The tiling processor's settings (read from the checkpoint by the architecture's `host_spec`)."""

    tile_size: int  # pixels per tile side
    patch_size: int  # pixels per patch side in the tower
    tokens_per_tile: int  # visual tokens each tile becomes
    tiling: str  # one of TILINGS
    max_tiles: int  # the most grid tiles (thumbnail / global not counted)
    min_tiles: int = 1
    longest_edge: int | None = None  # "longest_edge": the resize before cutting
    resample: int = int(Image.Resampling.BICUBIC)
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    rescale_factor: float = 1 / 255
    prompt: dict = field(default_factory=dict)  # "format" (PROMPT_FORMATS), "placeholder" and the format's tokens

    kind = "tiles"

    def __post_init__(self):
        if self.tiling not in TILINGS:
            raise ValueError(f"unknown tiling {self.tiling!r}; known: {', '.join(TILINGS)}")
        if self.prompt.get("format") not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.prompt.get('format')!r}; known: {', '.join(PROMPT_FORMATS)}")

    @property
    def patches_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        d = {k: v for k, v in d.items() if k != "kind"}
        for key in ("image_mean", "image_std"):
            d[key] = tuple(d[key])
        return cls(**d)

    def with_pixels(self, min_pixels=None, max_pixels=None) -> "TileConfig":
        if min_pixels is not None or max_pixels is not None:
            raise ImageInputError("min_pixels / max_pixels do not apply to a model that cuts images into tiles; "
                                  "the tile count is set when the visual graph is compiled (--max-tiles)")
        return self

    def with_max_tiles(self, max_tiles: int) -> "TileConfig":
        d = dict(self.__dict__)
        d["max_tiles"] = int(max_tiles)
        return TileConfig(**d)

    # ------------------------------------------------------------------------------------------- tiling

    def grid(self, height: int, width: int) -> tuple[int, int, tuple[int, int]]:
        """(rows, columns, (height, width) the image is resized to before cutting)."""
        if min(height, width) <= 0:
            raise ImageInputError(f"image size {width}x{height} is empty")
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ImageInputError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} "
                                  f"image is over {MAX_ASPECT_RATIO}")
        s = self.tile_size
        if self.tiling == "aspect_ratio":
            cols, rows = optimal_tiled_canvas(height, width, s, self.min_tiles, self.max_tiles)
            return rows, cols, (rows * s, cols * s)
        h, w = whole_tiles_size(*longest_edge_size(height, width, self.edge_for(height, width)), s)
        return h // s, w // s, (h, w)

    def edge_for(self, height: int, width: int) -> int:
        """"longest_edge": the resize target, lowered in whole tiles until the grid has at most max_tiles tiles (as
        a smaller `size.longest_edge` does in transformers)."""
        s, edge = self.tile_size, int(self.longest_edge)
        while edge > s:
            h, w = whole_tiles_size(*longest_edge_size(height, width, edge), s)
            if (h // s) * (w // s) <= self.max_tiles:
                break
            edge = (math.ceil(edge / s) - 1) * s
        return edge

    def layout(self, height: int, width: int) -> tuple[int, int, int]:
        """(tiles, rows, columns) of an image: tiles counts the thumbnail / global tile."""
        rows, cols, _ = self.grid(height, width)
        return rows * cols + (1 if rows * cols > 1 else 0), rows, cols

    def tiles(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """An RGB image -> normalised tiles [tiles, 3, S, S] float32 (grid row-major, then the thumbnail / global
        tile) and its layout (tiles, rows, columns)."""
        width, height = image.size
        rows, cols, (h, w) = self.grid(height, width)
        s = self.tile_size
        if self.tiling == "longest_edge":  # two resizes, as the processor: the longest edge, then whole tiles
            eh, ew = longest_edge_size(height, width, self.edge_for(height, width))
            resized = image.resize((ew, eh), resample=self.resample).resize((w, h), resample=self.resample)
            whole = resized
        else:
            resized, whole = image.resize((w, h), resample=self.resample), image
        canvas = np.asarray(resized, dtype=np.uint8)
        crops = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
        if rows * cols > 1:
            crops.append(np.asarray(whole.resize((s, s), resample=self.resample), dtype=np.uint8))
        values = normalized_values(self.rescale_factor, tuple(self.image_mean), tuple(self.image_std))
        out = np.empty((len(crops), 3, s, s), dtype=np.float32)
        for i, crop in enumerate(crops):
            for ch in range(3):  # rescale and normalise as one exact table lookup per channel (see image.py)
                np.take(values[ch], crop[:, :, ch], out=out[i, ch])
        return out, (len(crops), rows, cols)

    # -------------------------------------------------------------------------------------------- prompt

    def expansion(self, layout) -> str:
        """The text an image's placeholder becomes."""
        tiles, rows, cols = (int(v) for v in layout)
        p = self.prompt
        n = self.tokens_per_tile
        if p["format"] == "wrapped":
            return p["start"] + p["image"] * (n * tiles) + p["end"]
        seq = p["image"] * n
        glob = f"{p['fake']}{p['global']}{seq}{p['fake']}"
        if tiles == 1:
            return glob
        text = ""
        for r in range(rows):
            text += "".join(f"{p['fake']}{p['row_col'].format(row=r + 1, col=c + 1)}{seq}" for c in range(cols))
            text += "\n"
        return f"{text}\n{glob}"

    def expand_prompt(self, text: str, layouts) -> str:
        """`text` with its image placeholders, in order, replaced by each image's expansion."""
        placeholder = self.prompt["placeholder"]
        parts = text.split(placeholder)
        if len(parts) - 1 != len(layouts):
            raise ValueError(f"the prompt has {len(parts) - 1} image placeholders but {len(layouts)} images were given")
        out = [parts[0]]
        for layout, rest in zip(layouts, parts[1:]):
            out += [self.expansion(layout), rest]
        return "".join(out)


MAX_IMAGE_SIZE = 4096  # the processor's absolute cap on a resized side


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The "longest_edge" processor's first resize: the longest edge to `longest_edge` and the other in ratio,
    made even, then both scaled below MAX_IMAGE_SIZE."""
    ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = longest_edge
        width = int(height * ratio)
        if width % 2 != 0:
            width += 1
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ratio)
    return max(height, 1), max(width, 1)


def whole_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """The "longest_edge" processor's resize_for_vision_encoder: the longer side up to whole tiles, the other from
    the ratio, then up to whole tiles."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = max(math.ceil(int(width / ratio) / tile) * tile, tile)  # (transformers fails below one tile)
    else:
        height = math.ceil(height / tile) * tile
        width = max(math.ceil(int(height * ratio) / tile) * tile, tile)
    return height, width


@functools.lru_cache(maxsize=64)
def _arrangements(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def optimal_tiled_canvas(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to the image's; on a tie the later (larger) grid wins while the
    image's area is over half the grid's (transformers' get_optimal_tiled_canvas)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in _arrangements(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def tiles_to_patches(tiles: np.ndarray, patch_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Tiles [n, 3, S, S] -> patches [n * (S/P)^2, 3 * P * P], row-major in each tile, each patch flattened as
    (channel, row, column): a stride-P convolution becomes one matmul with the kernel flattened the same way."""
    n, c, s, _ = tiles.shape
    g = s // patch_size
    patches = tiles.reshape(n, c, g, patch_size, g, patch_size).transpose(0, 2, 4, 1, 3, 5)
    if out is None:
        return np.ascontiguousarray(patches.reshape(n * g * g, c * patch_size * patch_size))
    out.reshape(n, g, g, c, patch_size, patch_size)[...] = patches
    return out
