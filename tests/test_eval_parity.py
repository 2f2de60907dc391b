"""`vlmc eval parity`: passes on matching artifacts (TVM and the ONNX export on onnxruntime), fails naming the stage
on a foreign visual artifact, and says so when an artifact has no ONNX export."""

import json

import pytest

from compiled import compile_artifact, vlmc


def test_parity_passes_and_catches_a_foreign_visual_artifact(checkpoints, tmp_path):
    from vlmc.build_in.source_code.qwen2_5_vl import write_checkpoint

    ws = tmp_path / "ws"
    image = tmp_path / "demo.png"
    from conftest import random_image

    random_image(150, 220, seed=4).save(image)
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["tiny"], ws / "own", "--max-patches", 256,
                              "--onnx")
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], ws / "own", "--max-prefill", 128,
                           "--max-context", 192)
    report = tmp_path / "report"
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", visual,
                "--image", image, "--max-new-tokens", 8, "--report", report, "--backend", "onnxruntime")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pass"] and summary["identical_tokens"] == 8
    assert summary["onnxruntime_embedding_rel_error"][0] <= 1e-4
    data = json.loads((report / "parity.json").read_text())
    assert data["image_embedding_rel_error"][0] <= 1e-4
    assert data["prefill_logits"]["top1_agree"] and len(data["decode_logits"]) == 7
    # tier B of an fp32 artifact: the unquantized model itself, at the fp32 noise floor
    quality = summary["quality"]
    assert quality["kl_mean"] < 1e-8 and quality["top1_agreement"] == 1.0 and quality["first_divergence"] == 8
    assert (report / "report.md").read_text().count("PASS") == 1 and (report / "logits_error.png").stat().st_size

    other = write_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    foreign = compile_artifact("qwen2_5_vl_visual.yaml", other, ws / "foreign", "--max-patches", 256)
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", foreign,
                "--image", image, "--max-new-tokens", 8, "--report", tmp_path / "bad", check=False)
    assert proc.returncode == 1
    assert "FAIL image_embedding[0]" in proc.stderr
    proc = vlmc("eval", "parity", "--checkpoint", checkpoints["tiny"], "--model", llm, "--vit_model", foreign,
                "--image", image, "--backend", "onnxruntime", "--report", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "has no ONNX export" in proc.stderr and "--onnx" in proc.stderr


def test_bench_json_reports_both_sides_and_ratios(checkpoints, tmp_path):
    # The small preset with the bench's default image (448x448: 1024 patches, 256 image tokens).
    ws = tmp_path / "ws"
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["small"], ws, "--max-patches", 1024)
    # tp 2: the decode steps' cache lengths are set on every rank
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["small"], ws, "--max-prefill", 384,
                           "--max-context", 512, "--batch-size", 2, "--tp", 2)
    proc = vlmc("bench", "--checkpoint", checkpoints["small"], "--model", llm, "--vit_model", visual,
                "--new-tokens", 8, "--repeats", 1, "--json", "--plot", tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("bench ratios (small preset):", report["ratio_vlmc_over_transformers"])  # shown with pytest -s
    # 5 prefill lengths and decode batches 1 and 2
    assert report["compile_seconds"]["llm"]["graphs"] == 7 and report["compile_seconds"]["visual"]["build"] > 0
    for side in ("transformers", "vlmc"):
        assert all(report[side][k] > 0 for k in ("vision_encode_s", "ttft_s", "decode_tokens_per_s",
                                                  "decode_step_short_s", "decode_step_long_s",
                                                  "decode_step_streams_s", "peak_rss_mib"))
        assert report[side]["decode_tokens_per_s_streams"] == 2 / report[side]["decode_step_streams_s"]
    assert report["inputs"]["streams"] == 2
    ratios = report["ratio_vlmc_over_transformers"]
    assert abs(ratios["ttft_s"] - report["vlmc"]["ttft_s"] / report["transformers"]["ttft_s"]) < 1e-9
    assert report["memory_read_bandwidth_gb_s"] > 0 and report["decode_floor_s"] > 0
    # fp32: vlmc's greedy tokens are transformers' own; both report their load time; no peers were asked for
    assert report["tokens_equal_to_transformers"] == {"transformers": 8, "vlmc": 8}
    assert report["transformers"]["load_s"] > 0 and report["vlmc"]["load_s"] > 0 and report["peers"] == {}


@pytest.mark.parametrize("flags, message", [
    (["--peers", "tensorrt"], "unknown runtime 'tensorrt'"),
    (["--peers", "openvino:int3"], "openvino has no variant 'int3'"),
    (["--peers", "llamacpp,llamacpp:f32"], "lists a runtime twice"),
    (["--peers", "openvino", "--device", "cuda"], "use it with --device cpu"),
    # this Python has no openvino-genai: named, with where the install steps are
    (["--peers", "openvino"], "cannot import its packages (ModuleNotFoundError: No module named 'openvino_genai')"),
])
def test_bench_peers_bad_input_is_one_line(tmp_path, flags, message):
    proc = vlmc("bench", "--checkpoint", tmp_path, "--model", tmp_path, "--vit_model", tmp_path, *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
