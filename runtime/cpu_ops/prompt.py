"""Prompt formatting on the host: one user turn [images..., text] through the checkpoint's chat template, with
each image placeholder expanded to the number of visual tokens its grid produces."""

from __future__ import annotations

import numpy as np

IMAGE_PAD = "<|image_pad|>"


def user_turn(num_images: int, text: str) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template applied to `messages`, with the assistant generation prompt added."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def expand_image_tokens(input_ids, image_token_id: int, tokens_per_image) -> np.ndarray:
    """Replace the i-th image placeholder token by tokens_per_image[i] copies of it."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    positions = np.flatnonzero(ids == image_token_id)
    counts = list(tokens_per_image)
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image placeholders but {len(counts)} images were given")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    return np.repeat(ids, repeats)


def tokenize_prompt(tokenizer, text: str, image_grid_thw, image_token_id: int, merge_size: int,
                    messages: list[dict] | None = None) -> np.ndarray:
    """Token ids of a prompt whose images have the given grids (t, h, w) after patching."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    messages = messages if messages is not None else user_turn(len(grids), text)
    ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
    per_image = [int(t * h * w) // (merge_size * merge_size) for t, h, w in grids]
    return expand_image_tokens(ids, image_token_id, per_image)
