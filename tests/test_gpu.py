"""CUDA target on a real GPU: the tiny preset compiled for CUDA matches transformers on the same GPU.

CI has no GPU: every test here skips at collection (no checkpoint written, nothing compiled) unless TVM sees a
CUDA device.
"""

import json

import pytest
from compiled import compile_artifact, generate_json, vlmc


def _cuda_visible() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except (ImportError, OSError, RuntimeError):  # no TVM, or a TVM without its CUDA runtime: no GPU here
        return False


pytestmark = pytest.mark.skipif(not _cuda_visible(), reason="no CUDA device visible to TVM (tvm.cuda(0).exist)")


@pytest.fixture(scope="module")
def cuda_artifacts(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("cuda_ws")
    target = ["--target", '{"kind": "cuda"}']  # arch: the visible GPU's
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["tiny"], ws, "--max-patches", 256, *target)
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], ws, "--max-prefill", 128,
                           "--max-context", 192, *target)
    return visual, llm


def _assert_gpu_parity(checkpoint, llm, visual, tmp_path):
    """`vlmc eval parity --device cuda` passes with all 8 greedy tokens identical."""
    from conftest import random_image

    image = tmp_path / "demo.png"
    random_image(150, 220, seed=4).save(image)
    proc = vlmc("eval", "parity", "--checkpoint", checkpoint, "--model", llm, "--vit_model", visual,
                "--image", image, "--max-new-tokens", 8, "--report", tmp_path / "report", "--device", "cuda")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pass"] and summary["identical_tokens"] == 8, summary


def test_cuda_parity_with_transformers_on_the_same_gpu(checkpoints, cuda_artifacts, tmp_path):
    visual, llm = cuda_artifacts
    assert json.loads((visual / "manifest.json").read_text())["device"] == "cuda"
    _assert_gpu_parity(checkpoints["tiny"], llm, visual, tmp_path)


def test_cuda_generate_and_device_mismatch(checkpoints, cuda_artifacts, tmp_path):
    from conftest import random_image

    visual, llm = cuda_artifacts
    image = tmp_path / "demo.png"
    random_image(120, 160, seed=2).save(image)
    out = generate_json("--model", llm, "--vit_model", visual, "--image", image, "--prompt", "Describe it.",
                        "--max-new-tokens", 6, "--device", "cuda:0")
    assert out["completion_tokens"] >= 1
    proc = vlmc("encode", "--vit_model", visual, "--image", image, "--out", tmp_path / "e.npy", check=False)
    assert proc.returncode == 2 and "compiled for cuda" in proc.stderr


@pytest.mark.parametrize("weights,kv_cache", [("int8", "int8"), ("bf16", "bf16"), ("fp16", "fp32")])
def test_cuda_reduced_precision_tier_a(checkpoints, tmp_path, weights, kv_cache):
    """Reduced precision on the GPU: dequantize + matmul scheduled by dlight, the cache widened in the graph."""
    target = ["--target", '{"kind": "cuda"}', "--weights", weights]
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["tiny"], tmp_path, "--max-patches", 256, *target)
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path, "--max-prefill", 128,
                           "--max-context", 192, "--kv-cache", kv_cache, *target)
    _assert_gpu_parity(checkpoints["tiny"], llm, visual, tmp_path)
