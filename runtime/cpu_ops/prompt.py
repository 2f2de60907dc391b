"""Prompt formatting on the host: one user turn [images..., videos..., text] through the checkpoint's chat template,
with each image (and video) placeholder expanded to the number of visual tokens its grid produces."""

from __future__ import annotations

import numpy as np

IMAGE_PAD = "<|image_pad|>"


def user_turn(num_images: int, text: str, num_videos: int = 0) -> list[dict]:
    """One user turn: the images, then the videos, then the text."""
    content = ([{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
               + [{"type": "text", "text": text}])
    return [{"role": "user", "content": content}]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template applied to `messages`, with the assistant generation prompt added."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def expand_media_tokens(input_ids, placeholders: dict[str, tuple[int, list[int]]]) -> np.ndarray:
    """Replace the i-th placeholder token of each kind ({"image": (token id, tokens per image), "video": ...}) by
    as many copies of it as its item produces."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    repeats = np.ones(len(ids), dtype=np.int64)
    for kind, (token_id, per_item) in placeholders.items():
        positions = np.flatnonzero(ids == token_id)
        if len(positions) != len(per_item):
            raise ValueError(f"the prompt has {len(positions)} {kind} placeholders but {len(per_item)} {kind}s "
                             "were given")
        repeats[positions] = list(per_item)
    return np.repeat(ids, repeats)


def timestamp_videos(prompt: str, tokenizer, video_token_id: int, patch_times: list[list[float]]) -> str:
    """Each video placeholder of a rendered prompt -> one "<t seconds><|vision_start|><|video_pad|><|vision_end|>"
    per temporal patch (t: the patch's mean time, one decimal), as Qwen3-VL's processor writes a video."""
    pad = tokenizer.convert_ids_to_tokens(video_token_id)
    start = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
    end = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
    parts = prompt.split(pad)
    if len(parts) - 1 != len(patch_times):
        raise ValueError(f"the prompt has {len(parts) - 1} video placeholders but {len(patch_times)} videos were given")
    out = [parts[0]]
    for times, rest in zip(patch_times, parts[1:]):
        out.append("".join(f"<{t:.1f} seconds>{start}{pad}{end}" for t in times) + rest)
    return "".join(out)


def tokenize_prompt(tokenizer, text: str, image_grid_thw, image_token_id: int, merge_size: int,
                    messages: list[dict] | None = None, video_grid_thw=None, video_token_id: int | None = None,
                    video_patch_times: list[list[float]] | None = None) -> np.ndarray:
    """Token ids of a prompt whose images (and videos) have the given grids (t, h, w) after patching;
    `video_patch_times` (each video's temporal patch times): a placeholder run per temporal patch after its time."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    videos = np.asarray(video_grid_thw if video_grid_thw is not None else [], dtype=np.int64).reshape(-1, 3)
    messages = messages if messages is not None else user_turn(len(grids), text, len(videos))
    prompt = render_chat(tokenizer, messages)
    unit = merge_size * merge_size
    placeholders = {"image": (image_token_id, [int(t * h * w) // unit for t, h, w in grids])}
    if video_token_id is None and len(videos):
        raise ValueError("this model does not take videos")
    if video_token_id is not None and video_patch_times is not None:
        prompt = timestamp_videos(prompt, tokenizer, video_token_id, video_patch_times)
        placeholders["video"] = (video_token_id, [int(h * w) // unit for t, h, w in videos for _ in range(t)])
    elif video_token_id is not None:
        placeholders["video"] = (video_token_id, [int(t * h * w) // unit for t, h, w in videos])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return expand_media_tokens(ids, placeholders)
