"""transformers as the reference for Qwen3-VL: Qwen2.5-VL's reference (processor, placeholder expansion,
get_rope_index, generate, fake quantization), with the vision tower's deepstack features as a second output group."""

from __future__ import annotations

import numpy as np
import torch

from ..qwen2_5_vl import reference as qwen2_5_vl_reference
from ..qwen2_5_vl.reference import as_numpy, fake_quantize, generate_reference, load_model


def reference_inputs(checkpoint_dir, images, text, min_pixels=None, max_pixels=None, model=None, messages=None,
                     videos=None):
    """Qwen2.5-VL's reference_inputs, each video's placeholder written by Qwen3VLProcessor.replace_video_token
    (a "<t seconds>" text and a vision start/end pair around every temporal patch); `videos` also carries each
    video's "metadata" (transformers VideoMetadata: fps and frames_indices)."""
    if videos is not None:
        from types import SimpleNamespace

        from transformers import AutoConfig
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        v = AutoConfig.from_pretrained(str(checkpoint_dir)).vision_config
        processor = SimpleNamespace(video_processor=SimpleNamespace(merge_size=v.spatial_merge_size,
                                                                    temporal_patch_size=v.temporal_patch_size),
                                    vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                                    video_token="<|video_pad|>")
        processor._calculate_timestamps = lambda *args: Qwen3VLProcessor._calculate_timestamps(processor, *args)
        inputs = {"video_grid_thw": torch.as_tensor(np.asarray(videos["video_grid_thw"])).reshape(-1, 3),
                  "video_metadata": videos["metadata"]}
        videos = dict(videos, placeholders=[Qwen3VLProcessor.replace_video_token(processor, inputs, i)
                                            for i in range(len(videos["metadata"]))])
    return qwen2_5_vl_reference.reference_inputs(checkpoint_dir, images, text, min_pixels, max_pixels, model,
                                                 messages, videos)


@torch.no_grad()
def vision_outputs(model, pixel_values, image_grid_thw) -> dict:
    out = model.model.visual(pixel_values.to(model.device), grid_thw=image_grid_thw.to(model.device))
    return {"embeddings": as_numpy(out.pooler_output),
            "deepstack": np.stack([as_numpy(f) for f in out.deepstack_features])}


__all__ = ["as_numpy", "fake_quantize", "generate_reference", "load_model", "reference_inputs", "vision_outputs"]
