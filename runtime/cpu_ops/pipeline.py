"""The host half of a request: images and a prompt in, everything the graphs need out.

An architecture describes its host steps as a HostSpec (built by its `host_spec`, stored in every artifact's
manifest): the image processor's settings, the vision tower's layout and the language model's prompt expansion,
position ids and rotary scheme. The runtimes call the spec's methods and never the steps themselves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .image import ImageConfig, preprocess_images
from .prompt import tokenize_prompt
from .rope import get_rope_index, mrope_cos_sin
from .vision import VisionSpec


ROPE_KINDS = ("mrope", "mrope_interleaved")


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
    rope: str = "mrope"  # "mrope": (t, h, w) sections in blocks; "mrope_interleaved": h and w every third frequency

    def __post_init__(self):
        if self.rope not in ROPE_KINDS:
            raise ValueError(f"unknown rotary scheme {self.rope!r}; known: {', '.join(ROPE_KINDS)}")

    def cos_sin(self, position_ids) -> tuple[np.ndarray, np.ndarray]:
        return mrope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section,
                             interleaved=self.rope == "mrope_interleaved")


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

    def prompt_ids(self, tokenizer, text: str, image_grid_thw, messages: list[dict] | None = None) -> np.ndarray:
        """Token ids of one user turn [images..., text] (or of `messages`), each image placeholder expanded to the
        tokens its grid produces."""
        return tokenize_prompt(tokenizer, text, image_grid_thw, self.text.image_token_id, self.image.merge_size,
                               messages)

    def positions(self, input_ids, image_grid_thw) -> tuple[np.ndarray, int]:
        """Position ids [3, seq] of a prompt and its rope delta (decode position = cache length + delta)."""
        grids = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        return get_rope_index(input_ids, grids, self.text.image_token_id, self.image.merge_size)


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
    pixel_values, grids = preprocess_images(list(images), image_config or spec.image)
    input_ids = spec.prompt_ids(tokenizer, text, grids, messages)
    position_ids, delta = spec.positions(input_ids, grids)
    return PreparedPrompt(pixel_values, grids, input_ids, position_ids, delta)
