"""One `vlmc bench` peer side: OpenVINO GenAI's VLMPipeline on an IR exported by optimum-cli.

Runs under the peer's own Python (optimum-intel pins another transformers than vlmc's), so it imports nothing from
vlmc but side_protocol.py beside it (the JSON-lines protocol). The settings come as JSON in argv[1].
"""

import json
import sys
import time

from side_protocol import open_answers, serve  # beside this file

answers = open_answers()
settings = json.loads(sys.argv[1])

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import openvino_genai as genai  # noqa: E402
from PIL import Image  # noqa: E402

properties = {"INFERENCE_NUM_THREADS": settings["threads"], "PERFORMANCE_HINT": "LATENCY"}
if settings["exact"]:  # the CPU plugin computes in bf16 on CPUs that have it unless told otherwise
    properties.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
t0 = time.perf_counter()
# No prefix cache: a timed request must not reuse the warm-up's KV cache (genai keeps one by default).
scheduler = genai.SchedulerConfig()
scheduler.enable_prefix_caching, scheduler.cache_size = False, 1
pipe = genai.VLMPipeline(settings["model_dir"], "CPU", scheduler_config=scheduler, **properties)
load_s = time.perf_counter() - t0
tokens = []


class TokenTimes(genai.StreamerBase):
    def __init__(self):
        super().__init__()
        self.ids, self.times = [], []

    def write(self, token):
        now = time.perf_counter()
        for t in token if isinstance(token, list) else [token]:
            self.ids.append(int(t))
            self.times.append(now)
        return genai.StreamingStatus.RUNNING

    def end(self):
        pass


def run(image_path: str, new_tokens: int):
    started = time.perf_counter()
    image = ov.Tensor(np.array(Image.open(image_path).convert("RGB"))[None])
    loaded = time.perf_counter() - started
    config = genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.ignore_eos = True
    streamer = TokenTimes()
    result = pipe.generate(settings["prompt"], images=[image], generation_config=config, streamer=streamer)
    return started, loaded, result, streamer


def figure(name: str, image_path: str):
    if name == "vision_encode_s":  # file -> image embeddings: genai's vision encoding covers the patch embedding
        _, loaded, result, _ = run(image_path, 1)  # alone; its "prepare embeddings" holds the ViT and the merger
        return loaded + result.perf_metrics.get_prepare_embeddings_duration().mean / 1e3
    if name == "ttft_s":
        started, _, _, streamer = run(image_path, 1)
        return streamer.times[0] - started
    if name == "decode_s":  # first new token -> last
        _, _, result, streamer = run(image_path, settings["new_tokens"])
        tokens[:] = streamer.ids
        return streamer.times[-1] - streamer.times[0]
    raise ValueError(f"no figure {name!r}")


serve(answers, figure, settings, load_s, lambda: {"tokens": tokens})
