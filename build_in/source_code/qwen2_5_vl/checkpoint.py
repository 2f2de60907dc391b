"""Built-in random-weight Qwen2.5-VL checkpoints (and the writer the other Qwen VL families share) that load offline through transformers' own classes.

Everything a real checkpoint has is written: config, safetensors weights, generation config, a byte-level BPE
tokenizer with Qwen's special tokens, the Qwen2.5-VL chat template and a preprocessor config. The vocabulary is
learned here from a built-in corpus, so nothing is downloaded. Same preset and seed give the same bytes.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch

# Qwen2's special tokens, in Qwen's own order (their ids follow the learned vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template Qwen2.5-VL ships (images and videos become vision_start/pad/end placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizer's merges are learned from: chat-style English so prompts tokenize into real subwords.
_CORPUS = """
You are a helpful assistant. Describe the image in detail. What is shown in this picture?
The picture shows a red square on a blue background with a green circle in the corner.
How many objects are there in the image? There are three objects: a cat, a dog and a bird.
Read the text in the image. The sign says open from nine to five every day of the week.
Which option is correct? Answer with the letter of the correct option. The answer is A.
Compare the two images and tell me what is different between the first and the second one.
A photo of a city street at night with cars, people walking and bright lights in the windows.
Question: what color is the sky? Answer: the sky is blue and there are white clouds in it.
The quick brown fox jumps over the lazy dog while the small bird sings in the tall green tree.
Please answer the question about the chart: which year had the highest value in the table?
""" * 4

PRESETS = {
    # Runs the whole pipeline in seconds.
    "tiny": dict(
        num_merges=400,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
    ),
    # The real model's per-head shapes (text head_dim 128, mrope [16,24,24]; vision head_dim 80, window
    # attention with full-attention blocks), at few layers and small widths.
    "small": dict(
        num_merges=800,
        text=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=4, hidden_size=160, intermediate_size=320, num_heads=2, fullatt_block_indexes=[1, 3]),
    ),
    # Qwen2.5-VL-3B's real widths and vocabulary size (tied embeddings, as in the 3B model) at reduced depth: for
    # benchmarks whose bytes and FLOPs per layer are the real model's. About 2.3 GB of fp32 weights.
    "3b-width": dict(
        num_merges=800, vocab_size=151936, tie_word_embeddings=True,
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[3]),
    ),
    # Qwen2.5-VL-7B's real shapes: widths, depth 28, vocabulary, the 32-block vision tower. Written in bf16 (as the
    # real checkpoint), one tensor at a time (16.6 GB: more than an fp32 model of it would fit in memory).
    "7b": dict(
        num_merges=800, vocab_size=152064, tie_word_embeddings=False, streamed_bf16=True,
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by Qwen's byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges deterministically (ties broken by the pair's text)."""
    byte_map = _bytes_to_unicode()
    # Pre-split like Qwen's pre-tokenizer does for plain text: words keep their leading space.
    words = collections.Counter()
    for line in corpus.splitlines():
        for i, word in enumerate(line.split(" ")):
            if word:
                words[tuple(byte_map[b] for b in ((" " if i else "") + word).encode())] += 1
    vocab = {ch: i for i, ch in enumerate(byte_map.values())}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return vocab, merges


def build_tokenizer(num_merges: int):
    from transformers import Qwen2Tokenizer

    vocab, merges = learn_bpe(_CORPUS, num_merges)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


DEFAULT_INIT_STD = 0.1  # larger than Qwen's 0.02 so random logits are well separated and greedy is not a coin toss


def text_config(spec: dict, tokenizer, init_std: float) -> tuple[dict, dict]:
    """A preset's Qwen2 text config and the tokenizer's special-token ids (shared by the Qwen VL families)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    # Padded like Qwen's 151936 over its 151665 tokens; a preset may fix the real size (rows past the tokenizer unused).
    vocab_size = spec.get("vocab_size", (len(tokenizer) + 63) // 64 * 64)
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    config = dict(
        text, vocab_size=vocab_size, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section}, rope_theta=1000000.0,
        use_sliding_window=False, sliding_window=32768, max_window_layers=text["num_hidden_layers"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=spec.get("tie_word_embeddings", False), initializer_range=init_std,
    )
    return config, ids


def vision_token_ids(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_config(spec: dict, tokenizer, init_std: float = DEFAULT_INIT_STD):
    from transformers import Qwen2_5_VLConfig

    text, ids = text_config(spec, tokenizer, init_std)
    vision_config = dict(
        spec["vision"], hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        tokens_per_second=2, window_size=112, out_hidden_size=text["hidden_size"], initializer_range=init_std,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision_config, **vision_token_ids(ids),
                            tie_word_embeddings=text["tie_word_embeddings"], initializer_range=init_std)


def _write_streamed_bf16(config, model_class, out: Path, seed: int) -> None:
    """Weights of a model too large to build in memory, in bf16, one tensor at a time: linear and embedding weights
    normal(0, initializer_range), norm weights 1, biases 0 (transformers' own init rule for these modules)."""
    from ....runtime.safetensors_io import write_streaming

    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {n: list(t.shape) for n, t in model_class(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range

    def produce(name):
        shape = shapes[name]
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if len(shape) == 1:  # norm weights
            return torch.ones(shape)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=generator)

    write_streaming(out / "model.safetensors", [(n, torch.bfloat16, s) for n, s in shapes.items()], produce)
    config.save_pretrained(out)


def with_depth(spec: dict, text_layers: int | None, vision_depth: int | None) -> dict:
    """A preset at another depth: `text_layers` decoder layers, `vision_depth` vision blocks with full attention
    in every 8th block counted from the last (Qwen2.5-VL-3B/7B: 32 blocks, full attention in 7, 15, 23, 31)."""
    spec = {**spec, "text": dict(spec["text"]), "vision": dict(spec["vision"])}
    if text_layers is not None:
        spec["text"]["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        spec["vision"]["depth"] = vision_depth
        if "fullatt_block_indexes" in spec["vision"]:
            spec["vision"]["fullatt_block_indexes"] = list(range((vision_depth - 1) % 8, vision_depth, 8))
    return spec


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text_layers: int | None = None, vision_depth: int | None = None) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint to `out_dir` and return its path; `init_std`: the weights'
    standard deviation (initializer_range); `text_layers`, `vision_depth`: the preset at another depth."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return write_qwen_checkpoint(out_dir, PRESETS, preset, build_config, Qwen2_5_VLForConditionalGeneration,
                                 "Qwen2_5_VLProcessor", seed, init_std,
                                 spec=with_depth(PRESETS[preset], text_layers, vision_depth) if preset in PRESETS
                                 else None)


def write_qwen_checkpoint(out_dir, presets: dict, preset: str, make_config, model_class, processor_class: str,
                          seed: int = 0, init_std: float | None = None, image_processor: dict | None = None,
                          spec: dict | None = None) -> Path:
    """A random-weight checkpoint of a Qwen VL family: `make_config(spec, tokenizer, init_std)` gives its config
    (`spec`: the preset's, or one derived from it, e.g. at another depth),
    `model_class` builds and saves the weights; the tokenizer, chat template, generation config and the Qwen2-VL
    image processor config (with `image_processor`'s overrides) are shared by the family."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a few-MB write needs no progress bar

    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec or presets[preset]
    tokenizer = build_tokenizer(spec["num_merges"])
    config = make_config(spec, tokenizer, DEFAULT_INIT_STD if init_std is None else init_std)

    torch.manual_seed(seed)
    if spec.get("streamed_bf16"):
        _write_streamed_bf16(config, model_class, out, seed)
    else:
        model = model_class(config).eval()
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(bos_token_id=eos[1], eos_token_id=eos, pad_token_id=eos[1]).save_pretrained(out)
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        **(image_processor or {}),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out
