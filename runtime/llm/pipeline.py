"""A whole image/video + text request: host ops -> visual runtime -> embeddings spliced at the image and video
pads -> M-RoPE -> prefill -> decode until EOS or the token limit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..cpu_ops.sampling import Sampler, SamplingParams
from .engine import Sequence, splice_image_embeddings, splice_image_features
from .cluster import Cluster
from .runtime import DistributedEngine, LLMArtifact


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"
    timings: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)  # per video: grid, sampled frames and timestamps, graph calls
    precision: dict = field(default_factory=dict)  # weight format, KV cache format and its bytes per token

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.token_ids), "finish_reason": self.finish_reason,
                "timings": self.timings, "images": self.images, "videos": self.videos,
                "precision": self.precision}


def prompt_extras(declared: list[dict], input_ids, image_token_id: int, image_extras: list[dict],
                  hidden: int, video_token_id: int | None = None, video_extras: list[dict] = ()) -> dict:
    """Each declared prompt-graph input [count, n, hidden]: its visual output group of every image (and video),
    spliced at the image's (video's) pad tokens, zeros elsewhere."""
    out = {}
    for extra in declared:
        name = extra["name"]
        for items in (image_extras, video_extras):
            if any(item[name].shape[0] != extra["count"] for item in items):
                raise ValueError(f"the visual artifact's {name!r} group does not have the {extra['count']} "
                                 "features the LLM artifact takes")
        out[name] = splice_image_features(input_ids, image_token_id, [i[name] for i in image_extras],
                                          extra["count"], hidden)
        if video_extras:
            out[name] += splice_image_features(input_ids, video_token_id, [v[name] for v in video_extras],
                                               extra["count"], hidden)
    return out


class Pipeline:
    def __init__(self, model: str, vit_model: str | None = None, device: str = "cpu", verify: bool = False,
                 same_checkpoint: bool = True, cluster=None):
        from ..visual.runtime import VisualRuntime

        self.llm = LLMArtifact(model, verify=verify)
        self.visual = None
        if vit_model is not None:
            self.visual = VisualRuntime(vit_model, device, verify=verify)
            self.llm.check_visual(self.visual.manifest, vit_model, same_checkpoint)
        self.tokenizer = self.llm.tokenizer()
        self.last_image_extras: list[dict] = []  # set by encode_images
        self.spec = self.llm.spec
        self.engine = DistributedEngine(self.llm, device, cluster=cluster or Cluster())

    def close(self) -> None:
        self.engine.close()

    def decode_step(self, seq: Sequence, token: int) -> np.ndarray:
        """One decode step for `seq` alone (the smallest compiled decode batch)."""
        return self.engine.decode([seq], [token])[0]

    def encode_images(self, images, min_pixels=None, max_pixels=None):
        if images and self.visual is None:
            from ...errors import VlmcError

            raise VlmcError("the request has images but no visual artifact was given (--vit_model)")
        embeds, grids, info = [], [], []
        self.last_image_extras = []  # the other visual output groups of each image (see prompt_extras)
        for source in images:
            cfg = self.visual.image_config(min_pixels, max_pixels)
            pixels, grid, fitted = self.visual.prepare(source, cfg)
            outputs = self.visual.encode_outputs(pixels, grid)
            embeds.append(outputs.pop("embeddings"))
            self.last_image_extras.append(outputs)
            grids.append(grid)
            layout = ({"tiles": int(grid[0]), "tile_grid": [int(grid[1]), int(grid[2])]} if self.visual.tiled
                      else {"grid_thw": [int(g) for g in grid]})
            info.append({**layout, "fitted_to_budget": fitted})
        return embeds, np.asarray(grids, dtype=np.int64).reshape(-1, 3), info

    def encode_videos(self, videos, request=None) -> tuple[list[dict], list, list[dict]]:
        """Each video's visual output groups (see VisualRuntime.encode_video), its PreparedVideo (grid, timing) and
        what the response reports about it."""
        if videos and self.visual is None:
            from ...errors import VlmcError

            raise VlmcError("the request has videos but no visual artifact was given (--vit_model)")
        groups, prepared, info = [], [], []
        for source in videos:
            video = self.visual.prepare_video(source, request)
            outputs, calls = self.visual.encode_video(video)
            groups.append(outputs)
            prepared.append(video)
            info.append({**video.describe(), "graph_calls": calls})
        return groups, prepared, info

    def prompt_extras(self, input_ids, image_extras: list[dict], video_extras: list[dict] = ()) -> dict:
        """The prompt graphs' per-token inputs, from the images' (and videos') visual output groups of the same
        names."""
        return prompt_extras(self.engine.prefill_extras, input_ids, self.spec.text.image_token_id, image_extras,
                             self.spec.text.hidden_size, self.spec.text.video_token_id, video_extras)

    def generate(self, images, prompt: str, max_new_tokens: int, sampling: SamplingParams | None = None,
                 messages: list[dict] | None = None, min_pixels=None, max_pixels=None, videos=(),
                 video_request=None) -> GenerationResult:
        """`videos` come after the images in the user turn (or where `messages` puts their {"type": "video"}
        parts); `video_request`: a VideoRequest (fps or frame count, pixel bounds) for all of them."""
        sampling = sampling or SamplingParams()
        if not sampling.eos_token_ids:
            sampling.eos_token_ids = self.spec.text.eos_token_ids
        t0 = time.perf_counter()
        image_embeds, grids, info = self.encode_images(list(images), min_pixels, max_pixels)
        video_outputs, prepared, video_info = self.encode_videos(list(videos), video_request)
        t_visual = time.perf_counter() - t0
        input_ids, position_ids, delta = self.spec.prompt(self.tokenizer, prompt, grids, messages, prepared)
        self.engine.check_budget(len(input_ids), max_new_tokens)
        embeds = splice_image_embeddings(self.engine.embed.lookup(input_ids), input_ids,
                                         self.spec.text.image_token_id, image_embeds)
        if prepared:
            embeds = splice_image_embeddings(embeds, input_ids, self.spec.text.video_token_id,
                                             [o["embeddings"] for o in video_outputs])
        extras = self.prompt_extras(input_ids, self.last_image_extras,
                                    [{k: v for k, v in o.items() if k != "embeddings"} for o in video_outputs])
        seq = Sequence(0, delta)
        sampler = Sampler(sampling)
        t1 = time.perf_counter()
        try:
            logits = self.engine.prefill(seq, embeds, position_ids, extras)
            t_prefill = time.perf_counter() - t1
            tokens, finish, step_times, t_first = [], "length", [], None
            while len(tokens) < max_new_tokens:
                token = sampler(logits, len(tokens))
                if sampler.is_eos(token):
                    finish = "stop"
                    break
                tokens.append(token)
                t_first = t_first or time.perf_counter()
                if len(tokens) == max_new_tokens:
                    break
                ts = time.perf_counter()
                logits = self.decode_step(seq, token)
                step_times.append(time.perf_counter() - ts)
        finally:
            self.engine.release(seq)
        t_end = time.perf_counter()
        timings = {"visual_s": round(t_visual, 6), "prefill_s": round(t_prefill, 6),
                   "decode_per_token_s": round(float(np.median(step_times)), 6) if step_times else None,
                   "decode_s": round(t_end - t_first, 6) if t_first else 0.0,  # first new token -> last
                   "total_s": round(t_end - t0, 6)}
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(text, tokens, int(len(input_ids)), finish, timings, info, video_info,
                                self.precision())

    def precision(self) -> dict:
        quant = self.llm.manifest.get("quantize", {})
        return {"weights": quant.get("weights", "fp32"), "kv_cache": quant.get("kv_cache", "fp32"),
                "kv_cache_bytes_per_token": self.llm.manifest.get("kv_cache_bytes_per_token"),
                "visual_weights": (self.visual.manifest.get("quantize", {}).get("weights", "fp32")
                                   if self.visual else None),
                # GEMM input precision of the prompt graphs and of the visual graphs (backend.compute)
                "compute": self.llm.manifest.get("compute", "fp32"),
                # GEMV input precision of the decode graphs (backend.decode_compute)
                "decode_compute": self.llm.manifest.get("decode_compute", "fp32"),
                "visual_compute": self.visual.manifest.get("compute", "fp32") if self.visual else None}
