"""Reduced-precision artifacts end to end: tier-A parity (`vlmc eval parity`: the compiled artifact against its
own effective model, fp32 thresholds, identical greedy tokens) for every weight format and KV cache type at tp 1 and
2, tier-B numbers reported, the stored dtypes and sizes in the artifact."""

import json
import re
from collections import Counter

import pytest
from compiled import compile_artifact, generate_json, vlmc

# (weights, kv_cache, tp): every weight format at tp 1 and 2, every reduced KV cache type at tp 1 and 2.
CASES = [("bf16", "fp32", 1), ("bf16", "bf16", 2), ("fp16", "int8", 1), ("fp16", "fp32", 2),
         ("int8", "fp32", 1), ("int8", "int8", 2), ("int4", "bf16", 1), ("int4", "fp32", 2)]
# int4 on the tiny vision tower: groups of 32 (its blocks are 32 wide); the patch embedding's 1176 inputs are no
# multiple of 32, so it stays fp32.
VISUAL_QUANTIZE = {"int4": "{weights: int4, group_size: 32, skip: [patch_embed]}"}


@pytest.fixture(scope="session")
def quant_image(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("quant_image") / "img.png"
    random_image(150, 220, seed=4).save(path)
    return path


@pytest.fixture(scope="session")
def quant_visual(checkpoints, tmp_path_factory):
    """One visual artifact per weight format (tiny preset, one patch budget)."""
    root = tmp_path_factory.mktemp("quant_visual")
    built = {}

    def get(weights, compute="fp32"):
        if (weights, compute) not in built:
            name = f"visual_{weights}_{compute}"
            yaml = root / f"{name}.yaml"
            yaml.write_text(f"name: {name}\nkind: visual\nfrontend: {{max_patches: 256, patch_buckets: []}}\n"
                            f"backend: {{compute: {compute}}}\n"
                            f"quantize: {VISUAL_QUANTIZE.get(weights, '{weights: ' + weights + '}')}\n")
            built[weights, compute] = compile_artifact(yaml, checkpoints["tiny"], root)
        return built[weights, compute]

    return get


@pytest.mark.parametrize("weights,kv_cache,tp", CASES)
def test_tier_a_parity(checkpoints, quant_visual, quant_image, tmp_path, weights, kv_cache, tp):
    visual = quant_visual(weights)
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-prefill", 128,
                           "--max-context", 192, "--tp", tp, "--weights", weights, "--kv-cache", kv_cache,
                           *(["--group-size", 32] if weights == "int4" else []))
    manifest = json.loads((llm / "manifest.json").read_text())
    assert manifest["quantize"]["weights"] == weights and manifest["quantize"]["kv_cache"] == kv_cache
    assert manifest["embed_tokens"]["dtype"] == "bfloat16"
    assert set(manifest["quantized_layers"]) >= {"lm_head", "layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj"}
    stored = {"bf16": "BF16", "fp16": "F16", "int8": "I8", "int4": "U8"}[weights]
    from safetensors import safe_open

    from vlmc.runtime.artifact import load_params

    path = llm / "rank_0" / "params.safetensors"
    with safe_open(str(path), "pt") as f:  # the official reader takes vlmc's files
        assert f.get_slice("lm_head.weight").get_dtype() == stored and f.get_slice("norm.weight").get_dtype() == "F32"
    # loaded as stored: no fp32 copy of a quantized weight
    params = dict(zip(manifest["param_names"], load_params(path, manifest["param_names"])))
    assert str(params["lm_head.weight"].dtype) == {"bf16": "bfloat16", "fp16": "float16", "int8": "int8",
                                                   "int4": "uint8"}[weights]

    report = tmp_path / "report"
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", visual,
                "--image", quant_image, "--max-new-tokens", 8, "--report", report, check=False)
    data = json.loads((report / "parity.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert data["image_embedding_rel_error"][0] <= 1e-4 and data["greedy"]["identical_tokens"] == 8
    assert data["prefill_logits"]["rel_error"] <= 1e-4
    assert ("deploy model" in data["reference"]) == (kv_cache != "fp32")
    quality = data["quality"]
    print(f"tier B {weights} weights, {kv_cache} KV, tp {tp}:",
          {k: quality[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "top5_containment", "first_divergence")})
    assert quality["steps"] == 8 and 0 <= quality["kl_mean"] <= quality["kl_p99"] + 1e-12
    assert 0 <= quality["top1_agreement"] <= 1 and 0 <= quality["first_divergence"] <= 8
    assert "tier B" in (report / "report.md").read_text()
    if weights == "int4":  # round-to-nearest int4 on random weights: far from the unquantized model (tier B)
        assert quality["kl_mean"] > 1e-4


# bf16 GEMM inputs (backend.compute: bf16) with fp32 weights at tp 1, and with int8 weights and an int8 KV cache at
# tp 2 (its reference: the deploy model in PyTorch, bf16 inputs in the prompt step only); on both kernel paths.
@pytest.mark.parametrize("weights,kv_cache,tp,path", [("fp32", "fp32", 1, "mkl"), ("int8", "int8", 2, "fp32")])
def test_tier_a_parity_bf16_gemm_inputs(checkpoints, quant_visual, quant_image, tmp_path, monkeypatch, weights,
                                        kv_cache, tp, path):
    from vlmc.eval.parity import THRESHOLDS

    monkeypatch.setenv("VLMC_BF16_GEMM", path)  # the parity command runs in a child process: it inherits this
    visual = quant_visual(weights, "bf16")
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-prefill", 128,
                             "--max-context", 192, "--tp", tp, "--weights", weights, "--kv-cache", kv_cache,
                             "--compute", "bf16")
    for artifact in (visual, llm):
        assert json.loads((artifact / "manifest.json").read_text())["compute"] == "bf16"
    report = tmp_path / "report"
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", visual,
                "--image", quant_image, "--max-new-tokens", 8, "--report", report, check=False)
    data = json.loads((report / "parity.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert data["compute"] == {"visual": "bf16", "llm": "bf16"}
    limits = THRESHOLDS["bf16"]
    print(f"bf16 GEMM inputs, {weights} weights, {kv_cache} KV, tp {tp}, {path} path: image embedding",
          data["image_embedding_rel_error"], "prefill logits", data["prefill_logits"]["rel_error"],
          "decode logits (worst)", max(s["rel_error"] for s in data["decode_logits"]))
    assert data["image_embedding_rel_error"][0] <= limits["embedding_rel"]
    assert data["prefill_logits"]["rel_error"] <= limits["logits_rel"] and data["greedy"]["identical_tokens"] == 8
    assert ("deploy model" in data["reference"]) == (kv_cache != "fp32")
    assert "GEMM inputs: visual bf16, LLM prompt bf16" in (report / "report.md").read_text()
    out = generate_json("--model", llm, "--vit_model", visual, "--image", quant_image, "--prompt", "Describe.",
                        "--max-new-tokens", 2)
    assert (out["precision"]["compute"], out["precision"]["visual_compute"]) == ("bf16", "bf16")


# int8 decode GEMV inputs (backend.decode_compute: int8): int8 weights at tp 1 (reference: transformers with the
# effective weights, its int8/int4 layers quantizing their inputs in one-token forwards), int4 weights with an int8 KV
# cache at tp 2 (reference: the deploy model in PyTorch); their own thresholds, identical greedy tokens.
@pytest.mark.parametrize("weights,kv_cache,tp", [("int8", "fp32", 1), ("int4", "int8", 2)])
def test_tier_a_parity_int8_decode_inputs(checkpoints, quant_visual, quant_image, tmp_path, weights, kv_cache, tp):
    visual = quant_visual(weights)
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-prefill", 128,
                             "--max-context", 192, "--tp", tp, "--weights", weights, "--kv-cache", kv_cache,
                             "--decode-compute", "int8", *(["--group-size", 32] if weights == "int4" else []))
    assert json.loads((llm / "manifest.json").read_text())["decode_compute"] == "int8"
    # the decode graph calls the int8-input kernel for every quantized layer, the prompt graphs the fp32-input one
    import tvm
    from tvm import relax

    calls = {g: relax.VMExecutable(tvm.runtime.load_module(str(llm / f"{g}.so"))).as_text()
             for g in ("decode_1", "prefill_128")}
    assert calls["decode_1"].count("vlmc_qmatmul_a8") == calls["decode_1"].count("vlmc_qmatmul") > 0
    assert "vlmc_qmatmul_a8" not in calls["prefill_128"] and "vlmc_qmatmul" in calls["prefill_128"]
    report = tmp_path / "report"
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", visual,
                "--image", quant_image, "--max-new-tokens", 8, "--report", report, check=False)
    data = json.loads((report / "parity.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"int8 decode inputs, {weights} weights, {kv_cache} KV, tp {tp}: decode logits (worst)",
          max(s["rel_error"] for s in data["decode_logits"]), "tier B",
          {k: data["quality"][k] for k in ("kl_mean", "kl_p99", "top1_agreement", "first_divergence")})
    from vlmc.eval.parity import THRESHOLDS

    assert data["decode_compute"] == "int8" and data["greedy"]["identical_tokens"] == 8
    assert data["prefill_logits"]["rel_error"] <= 1e-4  # the prompt graphs keep fp32 inputs
    errors = sorted(s["rel_error"] for s in data["decode_logits"])
    assert errors[-1] <= THRESHOLDS["int8_decode_inputs"]["logits_rel"]
    assert errors[len(errors) // 2] <= 1e-4  # a rounding flip is an exception: most steps match to fp32 error
    assert ("deploy model" in data["reference"]) == (kv_cache != "fp32")
    assert "LLM decode int8" in (report / "report.md").read_text()
    out = generate_json("--model", llm, "--vit_model", visual, "--image", quant_image, "--prompt", "Describe.",
                        "--max-new-tokens", 2)
    assert out["precision"]["decode_compute"] == "int8"


# int8 GEMM inputs (backend.compute: int8): int8 per-channel weights in the visual and prompt graphs take inputs
# quantized per row (int8 x int8 GEMMs, AMX where the host has it), the other layers bf16; reference: transformers
# with the same layers' inputs quantized per row (per patch in the patch embedding) or rounded to bf16.
@pytest.mark.parametrize("path", ["amx", "fp32"])
def test_tier_a_parity_int8_gemm_inputs(checkpoints, quant_visual, quant_image, tmp_path, monkeypatch, path):
    from vlmc.eval.parity import THRESHOLDS

    monkeypatch.setenv("VLMC_INT8_GEMM", path)  # inherited by the parity command's process
    visual = quant_visual("int8", "int8")
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-prefill", 128,
                           "--max-context", 192, "--weights", "int8", "--compute", "int8")
    import tvm
    from tvm import relax

    calls = {g: Counter(re.findall(r"call\s+(vlmc_qmatmul\w*)", relax.VMExecutable(
        tvm.runtime.load_module(str(a / f"{g}.so"))).as_text())) for a, g in
        ((llm, "prefill_128"), (llm, "decode_1"), (visual, "visual"))}
    # every quantized layer of the prompt graphs takes int8 inputs but the lm_head (fp32 inputs: logits stay fp32),
    # every one of the visual graph; the decode graph keeps fp32 inputs
    assert calls["prefill_128"] == {"vlmc_qmatmul_i8": 8, "vlmc_qmatmul": 1}, calls
    assert set(calls["visual"]) == {"vlmc_qmatmul_i8"} and set(calls["decode_1"]) == {"vlmc_qmatmul"}, calls
    report = tmp_path / "report"
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", visual,
                "--image", quant_image, "--max-new-tokens", 8, "--report", report, check=False)
    data = json.loads((report / "parity.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert data["compute"] == {"visual": "int8", "llm": "int8"}
    limits = THRESHOLDS["int8"]
    print(f"int8 GEMM inputs, {path} path: image embedding", data["image_embedding_rel_error"], "prefill logits",
          data["prefill_logits"]["rel_error"], "decode logits (worst)",
          max(s["rel_error"] for s in data["decode_logits"]),
          "tier B", {k: data["quality"][k] for k in ("kl_mean", "kl_p99", "top1_agreement", "first_divergence")})
    assert data["image_embedding_rel_error"][0] <= limits["embedding_rel"]
    assert data["prefill_logits"]["rel_error"] <= limits["logits_rel"] and data["greedy"]["identical_tokens"] == 8
    assert "GEMM inputs: visual int8, LLM prompt int8" in (report / "report.md").read_text()


def test_bf16_gemm_inputs_round(quant_visual, quant_image):
    """The bf16 visual graph is not the fp32 one: its embeddings differ from the fp32 artifact's by about bf16's
    rounding (the rounding is applied, and no more than that)."""
    from vlmc.runtime.visual.runtime import VisualRuntime

    embeds = {}
    for compute in ("fp32", "bf16"):
        embeds[compute] = VisualRuntime(quant_visual("fp32", compute)).encode(str(quant_image)).embeddings
    rel = float(abs(embeds["bf16"] - embeds["fp32"]).max() / abs(embeds["fp32"]).max())
    assert 1e-3 < rel < 5e-2, rel
