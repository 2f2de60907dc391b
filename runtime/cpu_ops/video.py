"""Host-side video ops: decoding (PyAV), frame sampling, per-frame resize and normalisation, temporal patches.

Sampling follows transformers' Qwen2-VL video processor (`sample_frames`): `fps` frames per second of the source,
at least `min_frames` and at most `max_frames`, or a fixed `num_frames`, the count floored (fps) or rounded
(num_frames) to the temporal patch size. Each sampled frame is resized and normalised exactly as the image path
does an image (PIL bicubic, then a lookup table), at one size for the whole video chosen by smart_resize from the
video's pixel bounds and a `total_pixels` budget shared by all frames (qwen-vl-utils' rule, which transformers
applies with `cap_pixels_per_frame=True`). Frames are then grouped into temporal patches in the processor's order;
a count that is not a multiple of the temporal patch size is filled with copies of the last frame.

Frames are resized as they are decoded, so memory holds the sampled frames at their model size (uint8), never the
decoded source.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .image import MAX_ASPECT_RATIO, ImageConfig, ImageInputError, normalized_values, smart_resize


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class VideoInputError(ImageInputError):
    """A video that cannot be used; the message names the input and the reason."""


SAMPLING_RULES = ("step", "linspace")
PIXEL_BOUNDS = ("per_frame", "clip")


@dataclass(frozen=True)
class VideoConfig:
    """The video processor's settings: frame sampling, pixel bounds and the budget over all frames. Patch size,
    temporal patch size, merge size, mean/std and resampling are the image processor's.

    Two processor styles (the architecture picks one):
    - sampling "step" (Qwen2-VL's video processor): n = frames / source fps * fps, at least min_frames, at most
      max_frames, floored to the temporal patch size; indices arange(0, frames, frames / n). "linspace" (Qwen3-VL's):
      n = int(frames / source fps * fps) clamped the same way but not rounded; indices linspace(0, frames - 1, n)
      rounded.
    - pixel bounds "per_frame": smart_resize of a frame between min/max_pixels, each frame's max at most its share
      of 90% of max_video_tokens tokens' worth of pixels over the clip (qwen-vl-utils' VIDEO_TOTAL_PIXELS). "clip":
      the bounds are on t * h * w over the clip, each frame's share capped at max_video_tokens tokens' worth.
    - frame_timestamps: each temporal patch is its own placeholder run after a "<t seconds>" text (the mean time of
      its frames), positions laid out per temporal patch (Qwen3-VL); else one run per video, temporal positions by
      grid (and by absolute time where the text config has tokens_per_second).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    max_video_tokens: int = 128000
    max_seconds: float = 600.0
    sampling: str = "step"
    pixel_bounds: str = "per_frame"
    frame_timestamps: bool = False
    pixel_keys: bool = True  # a config's min_pixels / max_pixels keys set the bounds (besides its `size`)

    def __post_init__(self):
        if self.sampling not in SAMPLING_RULES or self.pixel_bounds not in PIXEL_BOUNDS:
            raise ValueError(f"unknown video processor style {self.sampling!r} / {self.pixel_bounds!r}")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **defaults) -> "VideoConfig":
        """The checkpoint's video processor settings, found where transformers looks: processor_config.json's
        `video_processor`, else video_preprocessor_config.json, else the image processor's preprocessor_config.json;
        over `defaults` (the architecture's processor style and its defaults). The pixel bounds are the `size`
        entry, and with `pixel_keys` (Qwen2VLVideoProcessor's constructor) its min_pixels / max_pixels keys."""
        base = cls(**defaults)
        folder = Path(checkpoint_dir)
        cfg = _read_json(folder / "processor_config.json").get("video_processor")
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if cfg is None and (folder / name).is_file():
                cfg = _read_json(folder / name)
        cfg = cfg or {}
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge") or base.min_pixels
        max_pixels = size.get("longest_edge") or base.max_pixels
        if base.pixel_keys:
            min_pixels, max_pixels = cfg.get("min_pixels") or min_pixels, cfg.get("max_pixels") or max_pixels
        return cls(fps=float(cfg.get("fps") or base.fps), min_frames=int(cfg.get("min_frames") or base.min_frames),
                   max_frames=int(cfg.get("max_frames") or base.max_frames), min_pixels=int(min_pixels),
                   max_pixels=int(max_pixels), max_video_tokens=int(cfg.get("max_video_tokens") or base.max_video_tokens),
                   sampling=base.sampling, pixel_bounds=base.pixel_bounds, frame_timestamps=base.frame_timestamps,
                   pixel_keys=base.pixel_keys)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VideoRequest:
    """How one video is sampled: `fps` (default the processor's) or `num_frames`, at most `max_frames`, and
    bounds on the frame size (None: the processor's)."""

    fps: float | None = None
    num_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        if self.fps is not None and self.num_frames is not None:
            raise VideoInputError("give fps or a number of frames, not both")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise VideoInputError(f"fps must be a positive number, got {self.fps}")
        for name in ("num_frames", "max_frames", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise VideoInputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise VideoInputError(f"the video length limit must be positive, got {self.max_seconds}")


@dataclass(frozen=True)
class VideoLayout:
    """What a prompt needs of a video (HostSpec.prompt): its grid, seconds per temporal patch (Qwen2.5-VL's
    positions) and each temporal patch's time (Qwen3-VL's timestamps)."""

    grid_thw: tuple[int, int, int]
    second_per_grid_t: float
    patch_times: tuple[float, ...] = ()


@dataclass
class PreparedVideo:
    pixel_values: np.ndarray  # [t * h * w, patch_dim]: temporal patches in the processor's order
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float  # temporal_patch_size / sampled fps: seconds of video per temporal patch
    frame_indices: list[int]
    timestamps: list[float]  # seconds of each sampled frame (index / source fps)
    source: dict  # the stream as decoded: frames, fps, width, height, duration
    fitted: bool = False  # True when the frames were made smaller to fit a compiled patch budget

    # seconds of each temporal patch: the mean of its first and last frame's (the last frame repeated to fill the
    # last patch), as Qwen3-VL's processor writes them before each patch
    patch_times: list[float] = field(default_factory=list)

    @property
    def layout(self) -> VideoLayout:
        return VideoLayout(tuple(int(g) for g in self.grid_thw), self.second_per_grid_t, tuple(self.patch_times))

    def describe(self) -> dict:
        return {"grid_thw": [int(g) for g in self.grid_thw], "frames": len(self.frame_indices),
                "frame_indices": [int(i) for i in self.frame_indices],
                "timestamps": [round(float(t), 6) for t in self.timestamps],
                "second_per_grid_t": self.second_per_grid_t, "source": self.source,
                "fitted_to_budget": self.fitted}


def describe_video(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    text = str(source)
    return text if len(text) <= 80 else text[:60] + "...(" + str(len(text)) + " chars)"


def _open(source, name: str):
    """A PyAV container for a path, file:// URL, data: URI or bytes."""
    import av

    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, (bytes, bytearray)):
        target = io.BytesIO(bytes(source))
    elif isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise VideoInputError(f"video {name!r}: a data URI must look like data:video/mp4;base64,...")
        try:
            target = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise VideoInputError(f"video {name!r}: the data URI is not valid base64 ({exc})") from None
    elif isinstance(source, str):
        if source.startswith("file://"):
            source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
        if not Path(source).is_file():
            raise VideoInputError(f"video {name!r}: no such file")
        target = source
    else:
        raise VideoInputError(f"video {name!r}: expected a path, file:// URL, data: URI or bytes")
    try:
        container = av.open(target)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoInputError(f"video {name!r}: not a readable video file ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"video {name!r}: the file has no video stream")
    return container


def _reason(exc) -> str:
    return str(getattr(exc, "strerror", None) or exc).strip() or type(exc).__name__


def sample_frame_indices(total_frames: int, source_fps: float | None, temporal_patch_size: int,
                         fps: float | None = None, num_frames: int | None = None, min_frames: int = 4,
                         max_frames: int = 768, rule: str = "step") -> np.ndarray:
    """The indices the video processor samples (see VideoConfig for the two rules), computed the same way ("step":
    torch.arange's float32 values truncated; "linspace": numpy's linspace rounded). Where the rule gives no frame
    at all (transformers divides by zero there), one temporal patch's worth is sampled, or every frame of a clip
    shorter than that; the patching repeats the last frame to fill the patch."""
    if num_frames is not None:
        count = round(num_frames / temporal_patch_size) * temporal_patch_size if rule == "step" else num_frames
        if count > total_frames:
            raise VideoInputError(f"{num_frames} frames asked for, but the video has {total_frames}")
    elif not source_fps:
        raise VideoInputError("the video's frame rate is unknown; ask for a number of frames instead of an fps")
    elif rule == "linspace":
        count = min(max(int(total_frames / source_fps * fps), min_frames), max_frames, total_frames)
    else:
        cap = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        count = min(max(total_frames / source_fps * fps, min_frames), cap, total_frames)
        count = math.floor(count / temporal_patch_size) * temporal_patch_size
    if count <= 0:  # e.g. num_frames 1, rounded to 0: one temporal patch, or every frame of a shorter clip
        if total_frames < temporal_patch_size:
            return np.arange(total_frames, dtype=np.int64)
        count = temporal_patch_size
    if rule == "linspace":
        return np.linspace(0, total_frames - 1, count).round().astype(np.int64)
    step = total_frames / count
    length = math.ceil(total_frames / step)  # torch.arange's length rule (in double)
    return (np.arange(length, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def clip_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
                      max_pixels: int) -> tuple[int, int]:
    """smart_resize with the bounds on t * h * w over the clip (Qwen3-VL's video processor): a side under `factor`
    is first scaled up."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoInputError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {width}x{height} "
                              f"frames is over {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size(height: int, width: int, num_frames: int, image: ImageConfig, video: VideoConfig,
               request: VideoRequest, budget: int | None = None) -> tuple[tuple[int, int], bool]:
    """(height, width) every sampled frame is resized to, and whether it had to shrink to fit `budget` patches per
    temporal patch (a compiled visual graph's). Per-frame caps are transformers' `cap_pixels_per_frame` rules:
    "per_frame" bounds, max(min(max_pixels, total_pixels * temporal_patch_size // frames), 1.05 * min_pixels);
    "clip" bounds, frames * max(min(max_video_tokens * factor^2, max_pixels // frames), 1.05 * min_pixels).
    A request's pixel bounds are per frame in both styles (a "clip" style multiplies them by the frame count)."""
    factor, tps = image.factor, image.temporal_patch_size
    clip = video.pixel_bounds == "clip"
    scale = num_frames if clip else 1  # request bounds are per frame; a clip style's own bounds are per clip
    max_pixels = request.max_pixels * scale if request.max_pixels else video.max_pixels
    # A lower bound given alone raises the default upper one no further than itself, and the other way round
    min_pixels = request.min_pixels * scale if request.min_pixels else \
        (min(video.min_pixels, max_pixels) if request.max_pixels else video.min_pixels)
    if request.min_pixels and not request.max_pixels:
        max_pixels = max(max_pixels, min_pixels)
    if min_pixels > max_pixels:
        raise VideoInputError(f"min_pixels {min_pixels // scale} is larger than max_pixels {max_pixels // scale}")
    if clip:
        per_frame = max(min(video.max_video_tokens * factor * factor, max_pixels // num_frames),
                        int(min_pixels * 1.05))

        def resize(limit):
            return clip_smart_resize(num_frames, height, width, tps, factor, min_pixels if limit is None else
                                     min(min_pixels, limit * num_frames), (limit or per_frame) * num_frames)
    else:
        total_pixels = int(video.max_video_tokens * factor * factor * 0.9)
        per_frame = max(min(max_pixels, total_pixels * tps // num_frames), int(min_pixels * 1.05))

        def resize(limit):
            if limit is None:
                return smart_resize(height, width, factor, min_pixels, per_frame)
            return smart_resize(height, width, factor, min(min_pixels, limit), limit)
    size = resize(None)
    if budget is None or (size[0] // image.patch_size) * (size[1] // image.patch_size) <= budget:
        return size, False
    limit = budget * image.patch_size * image.patch_size
    while True:  # smart_resize's rounding can overshoot a bound, as for images
        size = resize(limit)
        if (size[0] // image.patch_size) * (size[1] // image.patch_size) <= budget:
            return size, True
        limit = limit * 9 // 10
        if limit < factor * factor:
            raise VideoInputError(f"the video's frames cannot be resized into {budget} patches")


def _resize(frame: np.ndarray, size: tuple[int, int], cfg: ImageConfig) -> np.ndarray:
    """One decoded RGB uint8 frame at `size` (height, width), by the image path's PIL resize."""
    height, width = size
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=cfg.resample), dtype=np.uint8)


def temporal_patches(frames: list[np.ndarray], cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resized RGB uint8 frames [H, W, 3] -> normalised patches [t * h * w, 3 * T * P * P] in the video processor's
    order (t, h/m, w/m, m, m, C, T, P, P), the last frame repeated to fill the last temporal patch. Normalisation is
    the image path's lookup table, one temporal patch at a time (no float copy of the whole video)."""
    p, m, tps = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % tps)
    height, width, _ = frames[0].shape
    grid_t, grid_h, grid_w = len(frames) // tps, height // p, width // p
    values = normalized_values(cfg.rescale_factor, cfg.image_mean, cfg.image_std)
    out = np.empty((grid_t, grid_h * grid_w, 3 * tps * p * p), dtype=np.float32)
    group = np.empty((tps, 3, height, width), dtype=np.float32)
    for t in range(grid_t):
        for k in range(tps):
            for c in range(3):
                np.take(values[c], frames[t * tps + k][:, :, c], out=group[k, c])
        patches = group.reshape(tps, 3, grid_h // m, m, p, grid_w // m, m, p).transpose(2, 5, 3, 6, 1, 0, 4, 7)
        out[t] = patches.reshape(grid_h * grid_w, -1)
    return out.reshape(grid_t * grid_h * grid_w, -1), (grid_t, grid_h, grid_w)


def load_video(source, image: ImageConfig, video: VideoConfig, request: VideoRequest | None = None,
               budget: int | None = None, name: str | None = None) -> PreparedVideo:
    """Decode, sample, resize and patch one video (a path, file:// URL, data: URI or bytes). `budget`: the patches
    one temporal patch may have (a compiled visual graph's largest call); frames are made smaller to fit it."""
    import av

    request = request or VideoRequest()
    name = name or describe_video(source)
    container = _open(source, name)
    try:
        stream = container.streams.video[0]
        width, height = stream.width, stream.height
        rate = stream.average_rate or stream.guessed_rate
        source_fps = float(rate) if rate else None
        max_seconds = request.max_seconds or video.max_seconds
        if container.duration and container.duration / 1e6 > max_seconds:  # before counting frames by decoding
            raise VideoInputError(f"video {name!r} is {container.duration / 1e6:.1f} s long, over the limit of "
                                  f"{max_seconds:g} s")
        total = int(stream.frames or 0)
        if total <= 0:  # the container does not say (webm, mkv): count by decoding
            total = sum(1 for _ in container.decode(video=0))
            if total <= 0:
                raise VideoInputError(f"video {name!r}: the video stream has no frames")
            container.seek(0)
        duration = total / source_fps if source_fps else None
        if duration is not None and duration > max_seconds:
            raise VideoInputError(f"video {name!r} is {duration:.1f} s long, over the limit of {max_seconds:g} s")
        try:
            indices = sample_frame_indices(total, source_fps, image.temporal_patch_size,
                                           fps=None if request.num_frames else (request.fps or video.fps),
                                           num_frames=request.num_frames, min_frames=video.min_frames,
                                           max_frames=min(request.max_frames or video.max_frames, video.max_frames),
                                           rule=video.sampling)
            if request.num_frames and request.max_frames and len(indices) > request.max_frames:
                raise VideoInputError(f"{request.num_frames} frames asked for, over the limit of "
                                      f"{request.max_frames}")
            size, fitted = frame_size(height, width, len(indices), image, video, request, budget)
        except VideoInputError as exc:
            raise VideoInputError(f"video {name!r}: {exc}") from None
        wanted = {int(i): n for n, i in enumerate(indices)}
        frames: list[np.ndarray | None] = [None] * len(indices)
        decoded = 0
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i in wanted:
                frames[wanted[i]] = _resize(frame.to_ndarray(format="rgb24"), size, image)
            if i >= indices[-1]:
                break
    except VideoInputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoInputError(f"video {name!r}: decoding failed ({_reason(exc)})") from None
    finally:
        container.close()
    if any(f is None for f in frames):  # the container promised more frames than the stream has
        if decoded == 0:
            raise VideoInputError(f"video {name!r}: the video stream has no frames")
        raise VideoInputError(f"video {name!r}: the stream ends after {decoded} frames, but its header says "
                              f"{total}")
    pixel_values, grid = temporal_patches(frames, image)
    sampled_fps = len(indices) / total * source_fps if source_fps else 24.0  # transformers' VideoMetadata rule
    times = [float(i) / (source_fps or 24.0) for i in indices]
    tps = image.temporal_patch_size
    padded = times + [times[-1]] * (-len(times) % tps)
    return PreparedVideo(
        pixel_values, grid, tps / sampled_fps, [int(i) for i in indices], times if source_fps else [],
        {"frames": total, "fps": source_fps, "width": width, "height": height,
         "duration_s": round(duration, 6) if duration is not None else None}, fitted,
        patch_times=[(padded[i] + padded[i + tps - 1]) / 2 for i in range(0, len(padded), tps)])
