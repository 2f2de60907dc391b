"""CUDA target without a GPU: the graph compiles to GPU-scheduled kernels, the artifact records its device, and
running it where it was not built for fails with one clear line."""

import json

from compiled import BUILD, compile_artifact, vlmc


def test_cuda_artifact_is_gpu_scheduled_and_refused_on_cpu(checkpoints, tmp_path):
    target = '{"kind": "cuda", "arch": "sm_90"}'  # explicit arch: no GPU to read it from
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-patches", 64,
                              "--target", target)
    manifest = json.loads((visual / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and '"arch":"sm_90"' in manifest["target"].replace(" ", "")
    # TVM keeps the CUDA source in the library (compiled at load): every kernel carries dlight's thread binding.
    code = (visual / "visual.so").read_bytes()
    kernels = code.count(b'extern "C" __global__')
    assert kernels > 10 and code.count(b"__launch_bounds__(") >= kernels
    assert b"powf(" not in code  # RMSNorm's x.pow(2) must be x * x: fast-math powf is NaN for negative x
    assert b"bool*" not in code  # TVM's CUDA codegen loads bool pairs as ushort2: masks must be float

    image = tmp_path / "img.png"
    from conftest import random_image

    random_image(56, 56).save(image)
    proc = vlmc("encode", "--vit_model", visual, "--image", image, "--out", tmp_path / "e.npy", check=False)
    assert proc.returncode == 2 and "was compiled for cuda" in proc.stderr and len(proc.stderr.splitlines()) == 1

    proc = vlmc("compile", BUILD / "qwen2_5_vl_llm.yaml", "--checkpoint", checkpoints["tiny"], "--workspace",
                tmp_path / "ws", "--tp", 2, "--target", target, check=False)
    assert proc.returncode == 2 and "supported on CPU targets only" in proc.stderr


def test_cuda_target_without_arch_or_gpu_is_a_clear_error(checkpoints, tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        return  # with a GPU the arch is read from it
    proc = vlmc("compile", BUILD / "qwen2_5_vl_visual.yaml", "--checkpoint", checkpoints["tiny"],
                "--workspace", tmp_path, "--max-patches", 64, "--target", "cuda", check=False)
    assert proc.returncode == 2 and "needs an arch" in proc.stderr


def test_reduced_precision_compiles_for_cuda(checkpoints, tmp_path):
    """Quantized weights and a bf16/int8 cache on a CUDA target: standard ops (dequantize fused into the matmul,
    no vlmc host kernel), GPU-scheduled; int4 has no CUDA kernel and is refused (test_quantize.py)."""
    target = '{"kind": "cuda", "arch": "sm_90"}'
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], tmp_path / "ws", "--max-prefill", 128,
                           "--max-context", 192, "--target", target, "--weights", "int8", "--kv-cache", "int8")
    manifest = json.loads((llm / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["quantize"]["weights"] == "int8"
    code = (llm / "decode_1.so").read_bytes()
    assert b"vlmc_qmatmul" not in code and b"vlmc_cache_attention" not in code
    assert code.count(b'extern "C" __global__') > 5
