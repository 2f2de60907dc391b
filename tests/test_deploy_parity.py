"""The deploy modules, fed by vlmc's host ops, against transformers in PyTorch fp32."""

import numpy as np
import pytest
import torch
from conftest import random_image
from vlmc.build_in.source_code.qwen2_5_vl.reference import as_numpy, generate_reference, reference_inputs


def _encode_images(arch, checkpoint, spec, prepared, extra_padding=0):
    from vlmc.runtime.cpu_ops.vision import build_visual_inputs
    from vlmc.runtime.llm.torch_step import TorchStep

    module = arch.load_vision(checkpoint, arch.load_config(checkpoint))
    vision = TorchStep(module)
    out, offset = [], 0
    for grid in prepared.image_grid_thw:
        n = int(np.prod(grid))
        inputs = build_visual_inputs(prepared.pixel_values[offset:offset + n], grid, spec.vision,
                                     budget=(n + 15) // 16 * 16 + extra_padding)
        offset += n
        merged = np.concatenate(vision(*inputs.as_args(module.INPUTS)), axis=-1)
        out.append(merged[:inputs.num_tokens][inputs.reverse_index])
    return out


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_deploy_modules_reproduce_transformers(checkpoints, preset, num_images):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from vlmc.build_in.source_code import qwen2_5_vl as arch
    from vlmc.runtime.cpu_ops.embedding import EmbeddingTable
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt
    from vlmc.runtime.cpu_ops.sampling import Sampler, SamplingParams
    from vlmc.runtime.llm.engine import CacheShape, LLMEngine, Sequence, splice_image_embeddings
    from vlmc.runtime.llm.torch_step import TorchStep

    checkpoint = checkpoints[preset]
    images = [random_image(200, 300, 1), random_image(57, 900, 2)][:num_images]
    text = "Describe the image."
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    spec = arch.host_spec(checkpoint)
    prepared = prepare_prompt(AutoTokenizer.from_pretrained(checkpoint), spec, images, text)
    ref = reference_inputs(checkpoint, images, text, model=model)

    image_embeds = _encode_images(arch, checkpoint, spec, prepared, extra_padding=48)
    if images:
        with torch.no_grad():
            hf = as_numpy(model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output)
        ours = np.concatenate(image_embeds)
        assert np.abs(ours - hf).max() / np.abs(hf).max() <= 1e-5

    table = EmbeddingTable(arch.embedding_table(checkpoint).numpy())
    embeds = splice_image_embeddings(table.lookup(prepared.input_ids), prepared.input_ids,
                                     spec.text.image_token_id, image_embeds)
    cfg = arch.load_config(checkpoint).text_config
    step = TorchStep(arch.load_language_model(checkpoint, cfg))
    engine = LLMEngine({64: step, 512: step}, step, spec.text, table,
                       CacheShape(cfg.num_hidden_layers, cfg.num_key_value_heads, 640, spec.text.head_dim))
    seq = Sequence(0, prepared.rope_deltas)
    logits = engine.prefill(seq, embeds, prepared.position_ids)

    ref_tokens, ref_logits = generate_reference(model, ref, 16, with_logits=True)
    # Prefill logits, then every decode step's logits while both follow the same greedy tokens.
    assert np.abs(logits - ref_logits[0]).max() <= 1e-4
    # The reference runs with min_new_tokens=16 so EOS is suppressed; the sampler's min_tokens does the same.
    greedy = Sampler(SamplingParams(min_tokens=16, eos_token_ids=spec.text.eos_token_ids))
    tokens = [greedy(logits, 0)]
    while len(tokens) < 16:
        step_logits = engine.decode([seq], [tokens[-1]])[0]
        assert np.abs(step_logits - ref_logits[len(tokens)]).max() <= 1e-4
        tokens.append(greedy(step_logits, len(tokens)))
    assert tokens == ref_tokens
