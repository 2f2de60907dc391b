import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_checkpoints_load_offline_through_transformers(checkpoints):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    for preset, path in checkpoints.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
        assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
        for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                      "<|video_pad|>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            assert tokenizer.decode([token_id]) == token
        assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
        assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == model.config.vision_start_token_id
        assert len(tokenizer) <= model.config.text_config.vocab_size
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")
        ids = tokenizer("Hi <|image_pad|>", add_special_tokens=False)["input_ids"]
        assert ids[-1] == model.config.image_token_id
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        assert out.shape[1] == len(ids) + 3


def test_small_preset_keeps_real_per_head_shapes(checkpoints):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(checkpoints["small"])
    t, v = cfg.text_config, cfg.vision_config
    assert t.hidden_size // t.num_attention_heads == 128
    assert list(t.rope_parameters["mrope_section"]) == [16, 24, 24]
    assert v.hidden_size // v.num_heads == 80
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)
    assert 0 < len(v.fullatt_block_indexes) < v.depth


def test_same_seed_same_bytes_and_cli(tmp_path, checkpoints):
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "vlmc", "checkpoint", "tiny", "--arch", "qwen2_5_vl", str(out),
                           "--preset", "tiny", "--seed", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert _digest(out) == _digest(checkpoints["tiny"])
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "vlmc", "checkpoint", "tiny", str(other), "--seed", "1"], check=True,
                   capture_output=True)
    assert _digest(other)["model.safetensors"] != _digest(out)["model.safetensors"]


@pytest.mark.parametrize("arch,key,want", [("qwen2_5_vl", "fullatt_block_indexes", [0, 8]),
                                           ("qwen2_vl", None, None), ("qwen3_vl", "deepstack_visual_indexes", [3, 8])])
def test_depth_knobs_write_a_deeper_model_that_loads(tmp_path, arch, key, want):
    """--text-layers / --vision-depth: the preset at another depth (full-attention and deepstack blocks keep their
    places relative to the depth), loading in transformers; families without the knobs refuse them."""
    from transformers import AutoModelForImageTextToText

    from compiled import vlmc

    vlmc("checkpoint", "tiny", "--arch", arch, tmp_path / "ck", "--text-layers", 3, "--vision-depth", 9)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3 and config["vision_config"]["depth"] == 9
    if key:
        assert config["vision_config"][key] == want
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck")
    assert len(model.model.language_model.layers) == 3 and len(model.model.visual.blocks) == 9
    if arch == "qwen2_5_vl":
        proc = vlmc("checkpoint", "tiny", "--arch", "smolvlm", tmp_path / "s", "--vision-depth", 3, check=False)
        assert proc.returncode == 2 and "not available for smolvlm" in proc.stderr
