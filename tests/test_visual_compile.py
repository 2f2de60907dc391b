"""Visual graph: compile from the shipped YAML, encode through TVM, compare with transformers' vision tower."""

import json
import shutil

import numpy as np
import pytest
import torch
from compiled import BUILD, compile_artifact, vlmc
from conftest import random_image
from vlmc.build_in.source_code.qwen2_5_vl.reference import as_numpy, reference_inputs

# small: over 1024 patches, so full-attention blocks take the attention kernel's BLAS path (long key ranges)
BUDGETS = {"tiny": 512, "small": 1536}


@pytest.fixture(scope="session")
def visual_artifacts(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("visual_ws")
    return {p: compile_artifact("qwen2_5_vl_visual.yaml", checkpoints[p], ws / p, "--max-patches", BUDGETS[p])
            for p in ("tiny", "small")}


def test_recompile_reuses_artifact(checkpoints, visual_artifacts):
    path = visual_artifacts["tiny"]
    before = json.loads((path / "manifest.json").read_text())["created"]
    proc = vlmc("compile", BUILD / "qwen2_5_vl_visual.yaml", "--checkpoint", checkpoints["tiny"],
                "--workspace", path.parent, "--max-patches", BUDGETS["tiny"])
    assert "up to date" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(path)
    assert json.loads((path / "manifest.json").read_text())["created"] == before
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["patch_budget"] == 512 and sum(manifest["output_chunks"]) == manifest["hidden_size"]
    # Smaller budgets (quarters of it) are compiled too, so small images do not pay for the whole budget; the sizes in
    # test_encode_matches_transformers run in several of them.
    assert manifest["patch_buckets"] == [128, 256, 384, 512]
    assert all((path / f).is_file() for f in ("visual_128.so", "visual_256.so", "visual_384.so", "visual.so"))
    assert {"vlmc", "tvm", "torch", "transformers"} <= set(manifest["versions"])
    assert manifest["host"]["image"]["patch_size"] == 14


def test_changed_kernels_are_not_reused(visual_artifacts, tmp_path):
    """The native kernels are compiled into every graph library: an artifact built from other kernel sources is
    stale even when config, weights and vlmc version match."""
    from vlmc.compile.artifact import is_up_to_date, kernels_digest

    copy = shutil.copytree(visual_artifacts["tiny"], tmp_path / "artifact")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["versions"]["kernels"] == kernels_digest()
    digests = manifest["config_hash"], manifest["weights_fingerprint"]
    assert is_up_to_date(copy, *digests)
    manifest["versions"]["kernels"] = "0" * 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert not is_up_to_date(copy, *digests)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_encode_matches_transformers(checkpoints, visual_artifacts, tmp_path, preset):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints[preset]).eval()
    # Sizes from a few patches (heavy padding) to nearly the whole budget, odd aspect ratios included.
    for i, (h, w) in enumerate([(28, 28), (40, 300), (200, 300), (100, 700), (448, 640) if preset == "small"
                                else (250, 330)]):
        image = tmp_path / f"img{i}.png"
        random_image(h, w, seed=i).save(image)
        out = tmp_path / f"emb{i}.npy"
        vlmc("encode", "--vit_model", visual_artifacts[preset], "--image", image, "--out", out)
        ref = reference_inputs(checkpoints[preset], [random_image(h, w, seed=i)], "x", model=model)
        with torch.no_grad():
            hf = as_numpy(model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output)
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == hf.shape, (h, w)
        assert np.abs(got - hf).max() / np.abs(hf).max() <= 1e-4, (h, w)


def test_image_over_budget_is_resized_to_fit(visual_artifacts, tmp_path):
    image = tmp_path / "big.png"
    random_image(900, 1600).save(image)
    out = tmp_path / "big.npy"
    proc = vlmc("encode", "--vit_model", visual_artifacts["tiny"], "--image", image, "--out", out)
    assert "resized to fit" in proc.stdout
    tokens = np.load(out).shape[0]
    assert 0 < tokens <= BUDGETS["tiny"] // 4


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_artifacts_and_configs(checkpoints, visual_artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(visual_artifacts["tiny"], broken)
    params = broken / "params.safetensors"
    original = params.read_bytes()
    data = bytearray(original)
    data[-100] ^= 0xFF
    params.write_bytes(bytes(data))
    image = tmp_path / "a.png"
    random_image(64, 64).save(image)
    _one_line_error(vlmc("encode", "--vit_model", broken, "--image", image, "--out", tmp_path / "o.npy",
                         check=False), "params.safetensors", "corrupted")
    params.write_bytes(original)
    (broken / "visual.so").unlink()
    _one_line_error(vlmc("encode", "--vit_model", broken, "--image", image, "--out", tmp_path / "o.npy",
                         check=False), "visual.so", "missing")
    _one_line_error(vlmc("encode", "--vit_model", tmp_path / "nothing", "--image", image, "--out",
                         tmp_path / "o.npy", check=False), "does not exist")

    base = (BUILD / "qwen2_5_vl_visual.yaml").read_text()
    cases = {
        "typo.yaml": (base.replace("max_patches:", "max_patchs:"), ["typo.yaml", "max_patchs", "allowed"]),
        "n17.yaml": (base.replace("max_patches: 1024", "max_patches: 1000"), ["multiple of 16"]),
        "chunks.yaml": (base.replace("output_chunks: auto", "output_chunks: [30, 30]"), ["add up", "64"]),
        "buckets.yaml": (base.replace("patch_buckets: null", "patch_buckets: [100, 2048]"),
                         ["patch bucket 100", "multiple of 16"]),
    }
    for name, (text, needles) in cases.items():
        cfg = tmp_path / name
        cfg.write_text(text)
        _one_line_error(vlmc("compile", cfg, "--checkpoint", checkpoints["tiny"], "--workspace", tmp_path / "ws",
                             check=False), *needles)
    _one_line_error(vlmc("compile", BUILD / "qwen2_5_vl_visual.yaml", "--checkpoint", checkpoints["tiny"],
                         "--max-patches", "100", check=False), "multiple of 16")


def test_onnx_export_checked_with_onnxruntime(checkpoints, tmp_path):
    cfg = tmp_path / "onnx.yaml"
    cfg.write_text((BUILD / "qwen2_5_vl_visual.yaml").read_text().replace("onnx: false", "onnx: true"))
    proc = vlmc("compile", cfg, "--checkpoint", checkpoints["tiny"], "--workspace", tmp_path / "ws",
                "--max-patches", 256)
    artifact = tmp_path / "ws" / "qwen2_5_vl_visual"
    assert proc.stdout.strip().splitlines()[-1] == str(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (artifact / "model.onnx").stat().st_size > 0
    assert manifest["onnx_max_abs_diff"] <= 1e-4


def test_params_load_exactly_and_refuse_a_truncated_file(tmp_path):
    from vlmc.compile import tvm_backend
    from vlmc.runtime.artifact import load_params

    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 5)).astype(np.float32), np.arange(7, dtype=np.int64),
              np.float32(2.5).reshape(()), rng.standard_normal((0, 4)).astype(np.float32),
              rng.standard_normal((2, 3)).astype(np.float16)]
    names = [f"p{i}" for i in range(len(params))]
    path = tmp_path / "params.safetensors"
    tvm_backend.save_params(params, names, path)
    loaded = load_params(path, names[::-1])  # any order, by name
    for want, got in zip(params[::-1], loaded):
        assert got.numpy().dtype == want.dtype and np.array_equal(got.numpy(), want)
    path.write_bytes(path.read_bytes()[:-8])  # the last tensor in the file loses its end
    with pytest.raises(OSError, match="file ends inside tensor"):
        load_params(path, names)


def test_mkl_blas_option_matches_transformers(checkpoints, tmp_path):
    """VLMC_BLAS=mkl links torch's MKL instead of numpy's OpenBLAS; its thread setting once crashed the first
    matmul (the Fortran entry takes a pointer). Built and run with it, the tower equals transformers'."""
    import os
    import subprocess
    import sys

    from transformers import Qwen2_5_VLForConditionalGeneration

    env = dict(os.environ, VLMC_BLAS="mkl")
    run = [sys.executable, "-m", "vlmc"]
    proc = subprocess.run([*run, "compile", BUILD / "qwen2_5_vl_visual.yaml", "--checkpoint", checkpoints["tiny"],
                           "--workspace", tmp_path, "--max-patches", "256"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = proc.stdout.strip().splitlines()[-1]
    random_image(100, 150, seed=4).save(tmp_path / "img.png")
    proc = subprocess.run([*run, "encode", "--vit_model", artifact, "--image", tmp_path / "img.png", "--out",
                           tmp_path / "emb.npy"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints["tiny"]).eval()
    ref = reference_inputs(checkpoints["tiny"], [random_image(100, 150, seed=4)], "x", model=model)
    with torch.no_grad():
        hf = as_numpy(model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output)
    got = np.load(tmp_path / "emb.npy")
    assert np.abs(got - hf).max() / np.abs(hf).max() <= 1e-4


def test_loads_check_quick_hashes_and_verify_reads_everything(tmp_path):
    """A load checks each file's size and first and last MiB; `vlmc verify` (and --verify) reads whole files, so a
    flipped byte in the middle of a large file is caught there."""
    from vlmc.compile.artifact import write_manifest
    from vlmc.errors import VlmcError
    from vlmc.runtime.artifact import read_manifest

    folder = tmp_path / "art"
    folder.mkdir()
    data = bytearray(np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    (folder / "params.safetensors").write_bytes(bytes(data))
    write_manifest(folder, {"kind": "visual"})
    proc = vlmc("verify", folder)
    assert "all hashes match" in proc.stdout
    data[len(data) // 2] ^= 0xFF
    (folder / "params.safetensors").write_bytes(bytes(data))
    read_manifest(folder, kind="visual")  # the quick check does not read the middle
    with pytest.raises(VlmcError, match="params.safetensors is corrupted"):
        read_manifest(folder, kind="visual", verify=True)
    _one_line_error(vlmc("verify", folder, check=False), "params.safetensors", "corrupted")
    data[len(data) // 2] ^= 0xFF
    data[-10] ^= 0xFF
    (folder / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(VlmcError, match="corrupted"):
        read_manifest(folder, kind="visual")
