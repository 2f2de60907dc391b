"""One `vlmc bench` peer side: llama.cpp (llama-cpp-python's bindings) with its mtmd vision encoder, on GGUF files
written by llama.cpp's own converter.

Runs under the peer's own Python and imports nothing from vlmc but side_protocol.py beside it (the JSON-lines
protocol). The settings come as JSON in argv[1].
"""

import ctypes
import json
import sys
import time

from side_protocol import open_answers, serve  # beside this file

answers = open_answers()
settings = json.loads(sys.argv[1])

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402
import llama_cpp.llama_cpp as llama_c  # noqa: E402
import llama_cpp.mtmd_cpp as mtmd  # noqa: E402

# llama-cpp-python 0.3.36's AMX kernels (an "extra buffer type", picked for q8_0 and q4_0 weights on CPUs with AMX)
# crash in their first matmul on a Sapphire Rapids host: there, weights stay in llama.cpp's plain CPU buffers.
with open("/proc/cpuinfo") as cpuinfo:
    amx = " amx_int8" in cpuinfo.read()
if amx:
    default_params = llama_c.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = model_params

threads = settings["threads"]
options = dict(n_ctx=settings["context"], n_batch=settings["context"], n_ubatch=settings["context"],
               n_threads=threads, n_threads_batch=threads, verbose=False)
if settings["exact"]:  # f32 weights: an f32 KV cache and no flash attention, the closest llama.cpp gets to fp32
    options.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
t0 = time.perf_counter()
llm = llama_cpp.Llama(settings["model"], **options)
params = mtmd.mtmd_context_params_default()
params.use_gpu, params.print_timings, params.n_threads = False, False, threads
vision = mtmd.mtmd_init_from_file(settings["mmproj"].encode(), llm._model.model, params)
if not vision:
    raise SystemExit(f"mtmd could not load {settings['mmproj']}")
load_s = time.perf_counter() - t0
ctx = llm._ctx.ctx
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
# The chat template as transformers renders it, the image's placeholder replaced by mtmd's marker
prompt = settings["prompt"].replace(settings["image_placeholder"], mtmd.mtmd_default_marker().decode()).encode()
tokens = []


def tokenize(image_path: str):
    bitmap = mtmd.mtmd_helper_bitmap_init_from_file(vision, image_path.encode(), False)
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text(prompt, len(prompt), False, True)  # the template has its special tokens
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(vision, chunks, ctypes.byref(text), bitmaps, 1):
        raise RuntimeError("mtmd_tokenize failed")
    mtmd.mtmd_bitmap_free(bitmap)
    return chunks


def greedy() -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    return int(logits.argmax())


def generate(image_path: str, new_tokens: int):
    """file -> tokens; the time of each new token"""
    started = time.perf_counter()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    chunks = tokenize(image_path)
    n_past = llama_cpp.llama_pos(0)
    if mtmd.mtmd_helper_eval_chunks(vision, ctx, chunks, 0, 0, settings["context"], True, ctypes.byref(n_past)):
        raise RuntimeError("mtmd_helper_eval_chunks failed")
    mtmd.mtmd_input_chunks_free(chunks)
    ids, times = [greedy()], [time.perf_counter()]
    while len(ids) < new_tokens:  # EOS is not special here: a fixed token count; positions follow the cache
        token = (llama_cpp.llama_token * 1)(ids[-1])
        batch = llama_cpp.llama_batch_get_one(token, 1)
        if llama_cpp.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed")
        ids.append(greedy())
        times.append(time.perf_counter())
    return started, ids, times


def encode_image(image_path: str) -> float:
    """file -> image embeddings (mtmd's encoder: the ViT and the merger)"""
    started = time.perf_counter()
    chunks = tokenize(image_path)
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            if mtmd.mtmd_encode_chunk(vision, chunk):
                raise RuntimeError("mtmd_encode_chunk failed")
    mtmd.mtmd_input_chunks_free(chunks)
    return time.perf_counter() - started


def figure(name: str, image_path: str):
    if name == "vision_encode_s":
        return encode_image(image_path)
    if name == "ttft_s":
        started, _, times = generate(image_path, 1)
        return times[0] - started
    if name == "decode_s":
        _, ids, times = generate(image_path, settings["new_tokens"])
        tokens[:] = ids
        return times[-1] - times[0]
    raise ValueError(f"no figure {name!r}")


notes = ["weight repacking off (AMX host)"] if amx else []
serve(answers, figure, settings, load_s, lambda: {"tokens": tokens, "notes": notes})
