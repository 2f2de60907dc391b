"""transformers as the reference for Qwen3-VL: Qwen2.5-VL's reference (processor, placeholder expansion,
get_rope_index, generate, fake quantization), with the vision tower's deepstack features as a second output group."""

from __future__ import annotations

import numpy as np
import torch

from ..qwen2_5_vl.reference import (as_numpy, fake_quantize, generate_reference, load_model,
                                    reference_inputs)


@torch.no_grad()
def vision_outputs(model, pixel_values, image_grid_thw) -> dict:
    out = model.model.visual(pixel_values.to(model.device), grid_thw=image_grid_thw.to(model.device))
    return {"embeddings": as_numpy(out.pooler_output),
            "deepstack": np.stack([as_numpy(f) for f in out.deepstack_features])}


__all__ = ["as_numpy", "fake_quantize", "generate_reference", "load_model", "reference_inputs", "vision_outputs"]
