"""The host half of a request: images, videos and a prompt in, everything the graphs need out.

An architecture describes its host steps as a HostSpec (built by its `host_spec`, stored in every artifact's
manifest): the image (and video) processor's settings, the vision tower's layout and the language model's prompt
expansion,
position ids and rotary scheme. The runtimes call the spec's methods and never the steps themselves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .image import ImageConfig, ImageInputError, describe, fit_patches, load_image
from .prompt import render_chat, tokenize_prompt, user_turn
from .rope import get_rope_index, mrope_cos_sin
from .tiles import TileConfig
from .video import PreparedVideo, VideoConfig, VideoInputError, VideoRequest, load_video
from .vision import VisionSpec


ROPE_KINDS = ("mrope", "mrope_interleaved", "rope")


@dataclass(frozen=True)
class TextSpec:
    """What the host needs to know about the language model."""

    hidden_size: int
    head_dim: int  # from the config where it says (Qwen3), else hidden / heads
    rope_theta: float
    mrope_section: tuple[int, ...]
    vocab_size: int
    image_token_id: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # "mrope": (t, h, w) sections in blocks; "mrope_interleaved": h and w every third frequency; "rope": 1-D (the
    # three position rows are equal, the rope delta 0, and mrope_section is (head_dim / 2, 0, 0))
    rope: str = "mrope"
    video_token_id: int | None = None  # None: the model takes no videos
    # Qwen2.5-VL: a video's temporal positions are tokens_per_second * seconds per temporal patch apart (absolute
    # time); None: one position per temporal patch (Qwen2-VL)
    tokens_per_second: float | None = None

    def __post_init__(self):
        if self.rope not in ROPE_KINDS:
            raise ValueError(f"unknown rotary scheme {self.rope!r}; known: {', '.join(ROPE_KINDS)}")

    def cos_sin(self, position_ids) -> tuple[np.ndarray, np.ndarray]:
        return mrope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section,
                             interleaved=self.rope == "mrope_interleaved")


@dataclass(frozen=True)
class HostSpec:
    """`image`: an ImageConfig (native resolution: resized to a patch grid, layout (t, h, w) in patches) or a
    TileConfig (fixed tiles, layout (tiles, rows, columns)); `vision`: how a native grid's patches are laid out for
    the tower (None for tiles, whose graph takes the tiles' patches as they come); `video`: the video processor's
    settings (None: the model takes no videos)."""

    image: ImageConfig | TileConfig
    vision: VisionSpec | None
    text: TextSpec
    video: VideoConfig | None = None

    @property
    def tiled(self) -> bool:
        return isinstance(self.image, TileConfig)

    @property
    def timestamped_videos(self) -> bool:
        """Each temporal patch of a video is its own placeholder run after its time (see VideoConfig)."""
        return self.video is not None and self.video.frame_timestamps

    def to_dict(self) -> dict:
        return {"image": self.image.to_dict(), "vision": asdict(self.vision) if self.vision else None,
                "text": asdict(self.text), "video": self.video.to_dict() if self.video else None}

    @classmethod
    def from_dict(cls, d: dict) -> "HostSpec":
        text = dict(d["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        text["eos_token_ids"] = tuple(text.get("eos_token_ids", ()))
        image = (TileConfig.from_dict(d["image"]) if d["image"].get("kind") == TileConfig.kind
                 else ImageConfig.from_dict(d["image"]))
        return cls(image, VisionSpec(**d["vision"]) if d.get("vision") else None, TextSpec(**text),
                   VideoConfig.from_dict(d["video"]) if d.get("video") else None)

    def prompt_ids(self, tokenizer, text: str, layouts, messages: list[dict] | None = None,
                   video_grids=None, video_patch_times=None) -> np.ndarray:
        """Token ids of one user turn [images..., videos..., text] (or of `messages`), each image placeholder
        expanded to the tokens its layout produces (a native grid (t, h, w), or tiles (tiles, rows, columns)), each
        video placeholder to its grid's (per temporal patch after its time, `video_patch_times`, where the video
        processor writes timestamps)."""
        layouts = np.asarray(layouts, dtype=np.int64).reshape(-1, 3)
        if not self.tiled:
            times = video_patch_times if self.timestamped_videos else None
            if self.timestamped_videos and times is None and video_grids is not None and len(video_grids):
                raise ValueError("this model's prompt gives each video's temporal patch times; none were given")
            return tokenize_prompt(tokenizer, text, layouts, self.text.image_token_id, self.image.merge_size,
                                   messages, video_grids, self.text.video_token_id, times)
        messages = messages if messages is not None else user_turn(len(layouts), text)
        prompt = self.image.expand_prompt(render_chat(tokenizer, messages), layouts)
        return np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def positions(self, input_ids, layouts, video_grids=None, second_per_grid_ts=None) -> tuple[np.ndarray, int]:
        """Position ids [3, seq] of a prompt and its rope delta (decode position = cache length + delta)."""
        if self.text.rope == "rope":  # 1-D: every token one step on, images included
            n = len(np.asarray(input_ids).reshape(-1))
            return np.tile(np.arange(n, dtype=np.int64), (3, 1)), 0
        grids = None if layouts is None else np.asarray(layouts, np.int64).reshape(-1, 3)
        if self.timestamped_videos and video_grids is not None:
            # one placeholder run per temporal patch: each is laid out as a one-frame grid
            video_grids = np.asarray(video_grids, np.int64).reshape(-1, 3)
            video_grids = np.repeat(video_grids, video_grids[:, 0], axis=0)
            video_grids[:, 0] = 1
        return get_rope_index(input_ids, grids, self.text.image_token_id, self.image.merge_size, video_grids,
                              self.text.video_token_id, second_per_grid_ts, self.text.tokens_per_second)

    def prompt(self, tokenizer, text: str, layouts, messages: list[dict] | None = None,
               videos=()) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids, position ids [3, seq] and rope delta of a prompt with images of `layouts` and `videos` (each a
        VideoLayout or a PreparedVideo): prompt_ids and positions with the videos' grids and timing."""
        video_grids = np.asarray([v.grid_thw for v in videos], np.int64).reshape(-1, 3)
        ids = self.prompt_ids(tokenizer, text, layouts, messages, video_grids, [list(v.patch_times) for v in videos])
        positions, delta = self.positions(ids, layouts, video_grids, [v.second_per_grid_t for v in videos])
        return ids, positions, delta

    def prepare_video(self, source, request: VideoRequest | None = None, budget: int | None = None,
                      name: str | None = None) -> PreparedVideo:
        """A video (path, file:// URL, data: URI or bytes) -> its temporal patches, grid and timing; `budget`:
        the patches one graph call takes (frames are made smaller to fit one temporal patch into it)."""
        if self.video is None or self.text.video_token_id is None:
            raise VideoInputError("this model does not take videos")
        return load_video(source, self.image, self.video, request, budget, name)

    def prepare_image(self, image, cfg, budget: int | None = None,
                      name: str = "image") -> tuple[np.ndarray, tuple[int, int, int], bool]:
        """A loaded image -> what the visual graph is fed (patches [n, patch_dim], or tiles [n, 3, S, S]), its
        layout, and whether it was made smaller to fit `budget` (a patch budget, or a cap on the grid tiles);
        None: as the processor's settings say. `name` heads an error about the image."""
        if not self.tiled:
            return fit_patches(image, cfg, budget, name)
        capped = cfg if budget is None else cfg.with_max_tiles(min(cfg.max_tiles, budget))
        try:
            tiles, layout = capped.tiles(image)
        except ImageInputError as exc:
            raise ImageInputError(f"{name}: {exc}") from None
        width, height = image.size
        return tiles, layout, capped.layout(height, width) != cfg.layout(height, width)


@dataclass
class PreparedPrompt:
    pixel_values: np.ndarray  # [sum of patches, patch_dim] (native grids) or [sum of tiles, 3, S, S] (tiles)
    image_grid_thw: np.ndarray  # [images, 3]: each image's layout
    input_ids: np.ndarray  # [seq]
    position_ids: np.ndarray  # [3, seq]
    rope_deltas: int
    videos: list[PreparedVideo] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def pixel_values_videos(self) -> np.ndarray:
        return np.concatenate([v.pixel_values for v in self.videos], axis=0) if self.videos else \
            np.zeros((0, self.pixel_values.shape[1]), np.float32)

    @property
    def video_grid_thw(self) -> np.ndarray:
        return np.asarray([v.grid_thw for v in self.videos], dtype=np.int64).reshape(-1, 3)

    @property
    def second_per_grid_ts(self) -> np.ndarray:
        return np.asarray([v.second_per_grid_t for v in self.videos], dtype=np.float32)


def prepare_prompt(tokenizer, spec: HostSpec, images, text: str, messages: list[dict] | None = None,
                   image_config=None, budget: int | None = None, videos=(),
                   video_request: VideoRequest | None = None) -> PreparedPrompt:
    """Images (paths, URLs, data URIs or PIL images), videos and a prompt -> patches or tiles, token ids and
    positions; `budget`: a visual artifact's patch budget or grid tile cap (None: the processor's own settings)."""
    cfg = image_config or spec.image
    values, grids = [], []
    for source in images:
        pixels, layout, _ = spec.prepare_image(load_image(source), cfg, budget, f"image {describe(source)!r}")
        values.append(pixels)
        grids.append(layout)
    prepared_videos = [spec.prepare_video(source, video_request) for source in videos]
    empty = (0, 3, cfg.tile_size, cfg.tile_size) if spec.tiled else (0, cfg.patch_dim)
    pixel_values = np.concatenate(values, axis=0) if values else np.zeros(empty, np.float32)
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    input_ids, position_ids, delta = spec.prompt(tokenizer, text, grids, messages, prepared_videos)
    return PreparedPrompt(pixel_values, grids, input_ids, position_ids, delta, prepared_videos)
