"""LLM graph: tensor-parallel compile through TVM and offline generation, token for token against transformers."""

import numpy as np
import pytest
import torch
from compiled import compile_artifact, generate_json, vlmc
from conftest import random_image
from vlmc.build_in.source_code.qwen2_5_vl.reference import generate_reference, reference_inputs

PROMPT = "Describe the image."


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w) in enumerate([(200, 300), (90, 400)]):
        paths.append(folder / f"img{i}.png")
        random_image(h, w, seed=10 + i).save(paths[-1])
    return paths


CASES = [("tiny", 1, 0), ("tiny", 1, 1), ("tiny", 1, 2), ("tiny", 2, 1), ("tiny", 2, 2), ("tiny", 4, 1),
         ("small", 1, 0), ("small", 1, 1), ("small", 1, 2), ("small", 2, 2)]


@pytest.mark.parametrize("preset,tp,num_images", CASES)
def test_greedy_tokens_equal_transformers(checkpoints, qwen_artifacts, images, preset, tp, num_images):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    args = ["--model", qwen_artifacts[preset, tp], "--vit_model", qwen_artifacts[preset, "visual"], "--prompt", PROMPT,
            "--max-new-tokens", 32]
    for path in images[:num_images]:
        args += ["--image", path]
    got = generate_json(*args)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints[preset]).eval()
    ref = reference_inputs(checkpoints[preset], [Image.open(p) for p in images[:num_images]], PROMPT, model=model)
    with torch.no_grad():
        kwargs = dict(input_ids=ref["input_ids"], attention_mask=torch.ones_like(ref["input_ids"]),
                      mm_token_type_ids=ref["mm_token_type_ids"])
        if num_images:
            kwargs.update(pixel_values=ref["pixel_values"], image_grid_thw=ref["image_grid_thw"])
        out = model.generate(**kwargs, do_sample=False, max_new_tokens=32)
    expected = out[0, ref["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id)
    expected = expected[:-1] if expected and expected[-1] in eos else expected  # vlmc does not return EOS
    assert got["prompt_tokens"] == ref["input_ids"].shape[1]
    assert got["token_ids"] == expected
    assert set(got["timings"]) >= {"load_s", "visual_s", "prefill_s", "decode_per_token_s", "decode_s"}
    assert got["timings"]["load_s"] > 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_prefill_logits_match_transformers(checkpoints, qwen_artifacts, images, preset):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from vlmc.runtime.llm.engine import Sequence, splice_image_embeddings
    from vlmc.runtime.llm.pipeline import Pipeline

    pipeline = Pipeline(str(qwen_artifacts[preset, 1]), str(qwen_artifacts[preset, "visual"]))
    try:
        image_embeds, grids, _ = pipeline.encode_images([str(images[0])])
        spec = pipeline.spec
        ids = spec.prompt_ids(pipeline.tokenizer, PROMPT, grids)
        positions, delta = spec.positions(ids, grids)
        embeds = splice_image_embeddings(pipeline.engine.embed.lookup(ids), ids, spec.text.image_token_id,
                                         image_embeds)
        seq = Sequence(0, delta)
        logits = pipeline.engine.prefill(seq, embeds, positions)
        pipeline.engine.release(seq)
    finally:
        pipeline.close()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints[preset]).eval()
    ref = reference_inputs(checkpoints[preset], [Image.open(images[0])], PROMPT, model=model)
    _, ref_logits = generate_reference(model, ref, 1, with_logits=True)
    assert np.abs(logits - ref_logits[0]).max() <= 1e-3


def test_ignore_eos_generates_exactly_the_limit(checkpoints, qwen_artifacts, images):
    """--ignore-eos: EOS is never sampled, so exactly --max-new-tokens come out. Sampled at a high temperature with
    seed 0 the tiny model ends after a few tokens without the flag; greedy with the flag equals transformers'
    generate with min_new_tokens at the same count (which masks EOS the same way)."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    llm, visual = qwen_artifacts["tiny", 1], qwen_artifacts["tiny", "visual"]
    sampled = ["--model", llm, "--prompt", PROMPT, "--max-new-tokens", 256, "--temperature", 5, "--seed", 0]
    assert generate_json(*sampled)["finish_reason"] == "stop"
    out = generate_json(*sampled, "--ignore-eos")
    assert (out["completion_tokens"], out["finish_reason"]) == (256, "length")
    got = generate_json("--model", llm, "--vit_model", visual, "--image", images[0], "--prompt", PROMPT,
                        "--max-new-tokens", 48, "--ignore-eos")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints["tiny"]).eval()
    ref = reference_inputs(checkpoints["tiny"], [Image.open(images[0])], PROMPT, model=model)
    assert got["token_ids"] == generate_reference(model, ref, 48)


def test_budget_errors_and_mismatched_artifacts(qwen_artifacts, images):
    long_prompt = "word " * 400
    proc = vlmc("generate", "--model", qwen_artifacts["tiny", 1], "--prompt", long_prompt, "--max-new-tokens", 4,
                check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "prefill length of 256" in proc.stderr and "tokens" in proc.stderr
    proc = vlmc("generate", "--model", qwen_artifacts["tiny", 1], "--prompt", "Hi", "--max-new-tokens", 300, check=False)
    assert proc.returncode != 0 and "context of 320" in proc.stderr
    proc = vlmc("generate", "--model", qwen_artifacts["tiny", 1], "--vit_model", qwen_artifacts["small", "visual"],
                "--image", images[0], "--prompt", "Hi", "--max-new-tokens", 4, check=False)
    assert proc.returncode != 0 and "does not belong" in proc.stderr and "hidden size" in proc.stderr
