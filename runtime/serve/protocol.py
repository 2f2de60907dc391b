"""OpenAI chat request -> what the workers need; every client mistake becomes an ApiError (-> 4xx JSON body)."""

from __future__ import annotations

import base64
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.code, self.kind = message, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


@dataclass(frozen=True)
class RemoteMedia:
    """http(s) image fetching, enabled by --allow-remote-media: a deadline for the whole download, a size cap."""

    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20


def fetch_url(url: str, remote: RemoteMedia, kind: str = "image") -> bytes:
    too_large = ApiError(f"the {kind} at the URL is larger than {remote.max_bytes // 2**20} MiB "
                         "(--remote-media-max-mb)", code=f"{kind}_too_large")
    deadline = time.monotonic() + remote.timeout_s
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlmc-serve"}),
                                    timeout=remote.timeout_s) as r:
            if int(r.headers.get("Content-Length") or 0) > remote.max_bytes:
                raise too_large
            data = bytearray()
            # The socket timeout bounds each read; the deadline bounds a server that trickles bytes.
            while chunk := r.read(64 * 1024):
                data += chunk
                if len(data) > remote.max_bytes:
                    raise too_large
                if time.monotonic() > deadline:
                    raise TimeoutError
            return bytes(data)
    except ApiError:
        raise
    except urllib.error.HTTPError as exc:
        raise ApiError(f"fetching the {kind} URL failed: HTTP {exc.code}", code=f"{kind}_fetch_failed") from None
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else \
            str(getattr(exc, "reason", exc))
        raise ApiError(f"fetching the {kind} URL failed: {reason} (limit {remote.timeout_s:g} s, "
                       "--remote-media-timeout)", code=f"{kind}_fetch_failed") from None


def read_media_url(url, allowed_dir: str | None, remote: RemoteMedia | None, kind: str) -> bytes:
    """The bytes an image_url / video_url names: data: URIs always, local files only under `allowed_dir`, http(s)
    only when `remote` is given (--allow-remote-media)."""
    if not isinstance(url, str) or not url:
        raise ApiError(f"{kind}_url.url must be a non-empty string", code=f"invalid_{kind}_url")
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except Exception:
            raise ApiError("the data: URI is not valid base64", code=f"invalid_{kind}") from None
    if url.startswith(("http://", "https://")):
        if remote is None:
            raise ApiError(f"http(s) {kind} URLs are not enabled on this server (start it with "
                           "--allow-remote-media); send a data: URI", code=f"{kind}_url_not_allowed")
        return fetch_url(url, remote, kind)
    not_allowed = ApiError(f"local {kind} paths are only allowed under --allowed-local-media-path",
                           code=f"{kind}_url_not_allowed")
    if allowed_dir is None:
        raise not_allowed
    try:
        path = Path(url[len("file://"):] if url.startswith("file://") else url).resolve()
    except (ValueError, OSError):  # e.g. a NUL byte in the path
        raise ApiError(f"{kind}_url.url is not a valid path", code=f"invalid_{kind}_url") from None
    if not path.is_relative_to(Path(allowed_dir).resolve()):
        raise not_allowed
    try:
        return path.read_bytes()
    except OSError:
        raise ApiError(f"cannot read {kind} {path.name}", code=f"invalid_{kind}") from None


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (--max-images-per-request, --max-videos-per-request, --max-image-pixels)."""

    max_images: int = 16
    max_videos: int = 2
    max_image_pixels: int = 50_000_000


def load_image_url(url: str, allowed_dir: str | None, remote: RemoteMedia | None = None,
                   max_pixels: int = RequestLimits.max_image_pixels):
    """An image_url as a decoded RGB PIL image (see read_media_url for what a URL may be). The size in the
    file's header is checked before the pixels are decoded: a small file can declare a huge image."""
    import warnings

    from PIL import Image

    from ..cpu_ops.image import load_image

    data = read_media_url(url, allowed_dir, remote, "image")

    try:
        with warnings.catch_warnings():  # PIL's own bomb check, where still on (serve replaces it by this one)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.width * image.height > max_pixels:
                raise ApiError(f"the image is {image.width}x{image.height} pixels, more than the limit of "
                               f"{max_pixels} pixels (--max-image-pixels)", 413, "image_too_large")
            image.load()
        return load_image(image)  # the same RGB conversion (alpha onto white) as `vlmc generate`
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(f"the image is too large to decode: {exc}", 413, "image_too_large") from None
    except Exception:
        raise ApiError("the image could not be decoded", code="invalid_image") from None


@dataclass(frozen=True)
class VideoLimits:
    """The server's video settings (--max-video-seconds, --max-video-frames: a request may ask for less;
    --video-min-pixels, --video-max-pixels: each frame's bounds, None for the checkpoint's)."""

    max_seconds: float = 600.0
    max_frames: int = 768
    min_pixels: int | None = None
    max_pixels: int | None = None


def video_part(ref, allowed_dir: str | None, remote: RemoteMedia | None, limits: VideoLimits) -> dict:
    """A video_url part -> {"data": bytes, "request": VideoRequest}: the bytes are decoded by the visual worker;
    `fps`, `num_frames` and `max_frames` may sit next to the URL (vLLM's form), within the server's limits."""
    from ..cpu_ops.video import VideoInputError, VideoRequest

    ref = ref if isinstance(ref, dict) else {"url": ref}
    options = {}
    for name in ("fps", "num_frames", "max_frames"):
        value = ref.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (name != "fps" and value != int(value)):
            raise ApiError(f"video_url.{name} must be a number", code="invalid_parameter")
        options[name] = float(value) if name == "fps" else int(value)
    if options.get("max_frames", 0) > limits.max_frames or options.get("num_frames", 0) > limits.max_frames:
        raise ApiError(f"at most {limits.max_frames} frames per video (--max-video-frames)", code="video_too_long")
    options.setdefault("max_frames", limits.max_frames)
    try:
        request = VideoRequest(**options, max_seconds=limits.max_seconds, min_pixels=limits.min_pixels,
                               max_pixels=limits.max_pixels)
    except VideoInputError as exc:
        raise ApiError(f"video_url: {exc}", code="invalid_parameter") from None
    return {"data": read_media_url(ref.get("url"), allowed_dir, remote, "video"), "request": request}


def count_parts(messages: list, kind: str) -> int:
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == kind)


def convert_messages(messages, allowed_dir: str | None, remote: RemoteMedia | None = None,
                     video_limits: VideoLimits = VideoLimits(), limits: RequestLimits = RequestLimits()):
    """OpenAI messages -> (chat-template messages with {"type": "image"} / {"type": "video"} parts, images in
    prompt order, videos in prompt order as video_part's)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("`messages` must be a non-empty list", code="missing_messages")
    # Counted before anything is fetched or decoded.
    for kind, limit, flag in (("image_url", limits.max_images, "--max-images-per-request"),
                              ("video_url", limits.max_videos, "--max-videos-per-request")):
        if (count := count_parts(messages, kind)) > limit:
            raise ApiError(f"the request has {count} {kind.split('_')[0]}s, more than the limit of {limit} per "
                           f"request ({flag})", code=f"too_many_{kind.split('_')[0]}s")
    converted, images, videos = [], [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ApiError(f"messages[{i}] needs a role of system, user or assistant", code="invalid_message")
        content = msg.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    images.append(load_image_url(ref.get("url") if isinstance(ref, dict) else ref, allowed_dir,
                                                 remote, limits.max_image_pixels))
                    parts.append({"type": "image"})
                elif kind == "video_url":
                    videos.append(video_part(part.get("video_url"), allowed_dir, remote, video_limits))
                    parts.append({"type": "video"})
                else:
                    raise ApiError(f"messages[{i}] has an unsupported content part type {kind!r}",
                                   code="invalid_content_type")
        else:
            raise ApiError(f"messages[{i}].content must be a string or a list of parts", code="invalid_message")
        converted.append({"role": msg["role"], "content": parts})
    return converted, images, videos


def sampling_params(body: dict) -> dict:
    def number(name, kind, default, low=None):
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and value != int(value)):
            raise ApiError(f"`{name}` must be a number", code="invalid_parameter")
        if low is not None and value < low:
            raise ApiError(f"`{name}` must be at least {low}", code="invalid_parameter")
        return kind(value)

    top_k = number("top_k", int, 0)
    return {"temperature": number("temperature", float, 0.0, 0), "top_p": number("top_p", float, 1.0, 0),
            "top_k": top_k if top_k > 0 else 0, "seed": body.get("seed") if isinstance(body.get("seed"), int) else None,
            "min_tokens": number("min_tokens", int, 0, 0), "ignore_eos": bool(body.get("ignore_eos", False))}


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("`stop` must be a string or a list of non-empty strings", code="invalid_parameter")
    return stop
