"""The host half of a request: images and a prompt in, everything the graphs need out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .image import ImageConfig, preprocess_images
from .prompt import tokenize_prompt
from .rope import get_rope_index, mrope_cos_sin
from .vision import VisionSpec


@dataclass(frozen=True)
class TextSpec:
    """What the host needs to know about the language model."""

    hidden_size: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    vocab_size: int
    image_token_id: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def cos_sin(self, position_ids) -> tuple[np.ndarray, np.ndarray]:
        return mrope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section)


@dataclass(frozen=True)
class HostSpec:
    image: ImageConfig
    vision: VisionSpec
    text: TextSpec

    def to_dict(self) -> dict:
        return {"image": self.image.to_dict(), "vision": asdict(self.vision), "text": asdict(self.text)}

    @classmethod
    def from_dict(cls, d: dict) -> "HostSpec":
        text = dict(d["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        text["eos_token_ids"] = tuple(text.get("eos_token_ids", ()))
        return cls(ImageConfig.from_dict(d["image"]), VisionSpec(**d["vision"]), TextSpec(**text))


@dataclass
class PreparedPrompt:
    pixel_values: np.ndarray  # [sum of patches, patch_dim]
    image_grid_thw: np.ndarray  # [images, 3]
    input_ids: np.ndarray  # [seq]
    position_ids: np.ndarray  # [3, seq]
    rope_deltas: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def prepare_prompt(tokenizer, spec: HostSpec, images, text: str, messages: list[dict] | None = None,
                   image_config: ImageConfig | None = None) -> PreparedPrompt:
    """Images (paths, URLs, data URIs or PIL images) and a prompt -> patches, token ids and M-RoPE positions."""
    cfg = image_config or spec.image
    pixel_values, grids = preprocess_images(list(images), cfg)
    input_ids = tokenize_prompt(tokenizer, text, grids, spec.text.image_token_id, cfg.merge_size, messages)
    position_ids, delta = get_rope_index(input_ids, grids, spec.text.image_token_id, cfg.merge_size)
    return PreparedPrompt(pixel_values, grids, input_ids, position_ids, delta)
