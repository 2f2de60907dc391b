"""The other Qwen families end to end through the same CLI: host ops against transformers' processor and
get_rope_index, compiled artifacts against transformers (vlmc eval parity: every visual output group, prefill and
decode logits, 32 greedy tokens) at tp 1, generate at tp 2, serve, encode, and the refusals that keep families apart."""

import json

import numpy as np
import pytest
from compiled import BUILD, assert_gemm_input_parity, compile_artifact, generate_json, llm_shape, vlmc
from conftest import random_image, write_video

FAMILIES = ["qwen2_vl", "qwen3_vl"]
PRESETS = ["tiny", "small"]


@pytest.fixture(scope="session")
def family_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family_images")
    paths = []
    for i, (h, w) in enumerate([(200, 300), (90, 400)]):
        paths.append(folder / f"img{i}.png")
        random_image(h, w, seed=20 + i).save(paths[-1])
    return paths


def _reference(arch):
    from vlmc.build_in.source_code import get_architecture

    return get_architecture(arch).reference


@pytest.mark.parametrize("num_images", [0, 2])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_preprocess_matches_the_reference(family_checkpoint, family_images, arch, preset, num_images):
    """vlmc's host steps (what `vlmc preprocess` writes; run in-process: the CLI is tested on Qwen2.5-VL)."""
    from PIL import Image
    from transformers import AutoTokenizer
    from vlmc.build_in.source_code import get_architecture
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt

    ck, images = family_checkpoint(arch, preset), [Image.open(p) for p in family_images[:num_images]]
    got = prepare_prompt(AutoTokenizer.from_pretrained(ck), get_architecture(arch).host_spec(ck), images, "Describe.")
    ref = _reference(arch).reference_inputs(ck, images, "Describe.")
    as_numpy = _reference(arch).as_numpy
    np.testing.assert_array_equal(got.input_ids, as_numpy(ref["input_ids"])[0])
    np.testing.assert_array_equal(got.position_ids, as_numpy(ref["position_ids"])[:, 0])
    assert got.rope_deltas == int(ref["rope_deltas"][0])
    if images:
        np.testing.assert_array_equal(got.image_grid_thw, as_numpy(ref["image_grid_thw"]))
        assert np.abs(got.pixel_values - as_numpy(ref["pixel_values"])).max() <= 1e-5


@pytest.mark.parametrize("num_images", [0, 2])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_parity_with_transformers(family_checkpoint, family_artifacts, family_images, tmp_path, arch, preset,
                                  num_images):
    """`vlmc eval parity`'s checks, in-process (one transformers import for all cases; the command itself is tested
    below and on Qwen2.5-VL)."""
    from vlmc.eval.parity import failures, run_parity

    visual, llm = family_artifacts(arch, preset)
    images = [str(p) for p in family_images[:num_images]]
    report = run_parity(family_checkpoint(arch, preset), str(llm), str(visual), images, "Describe the image.", 32)
    assert not failures(report), failures(report)
    assert report["greedy"]["identical_tokens"] == 32
    assert len(report.get("image_embedding_rel_error", [])) == num_images
    assert all(e <= 1e-4 for e in report.get("image_embedding_rel_error", []))


# tp 2 on both families' tiny presets and on Qwen3-VL's small one (tp 4 and the other presets run the same engine
# and sharding plan, tested on Qwen2.5-VL in test_generate.py)
@pytest.mark.parametrize("arch,preset,tp", [(a, "tiny", 2) for a in FAMILIES] + [("qwen3_vl", "small", 2)])
def test_generate_with_tensor_parallelism_equals_transformers(family_checkpoint, family_artifacts, family_images,
                                                              arch, preset, tp):
    from PIL import Image

    visual, llm = family_artifacts(arch, preset, tp=tp)
    ck = family_checkpoint(arch, preset)
    out = generate_json("--model", llm, "--vit_model", visual, "--image", family_images[0], "--prompt", "Describe.",
                        "--max-new-tokens", 32)
    reference = _reference(arch)
    model = reference.load_model(ck)
    ref = reference.reference_inputs(ck, [Image.open(family_images[0])], "Describe.", model=model)
    want = reference.generate_reference(model, ref, 32)
    # generate stops at EOS, the reference never does (min_new_tokens): compare what generate produced
    assert out["token_ids"] == want[:len(out["token_ids"])] and len(out["token_ids"]) > 0


def test_artifacts_of_two_families_are_not_mixed(family_artifacts, family_images, tmp_path):
    """A visual artifact of one family with an LLM artifact of another is refused naming both."""
    from vlmc.build_in.source_code.qwen2_5_vl import write_checkpoint

    ck = write_checkpoint(tmp_path / "ck25", "tiny")
    visual, _ = family_artifacts("qwen2_vl", "tiny")
    llm = compile_artifact("qwen2_5_vl_llm.yaml", ck, tmp_path / "ws", *llm_shape())
    proc = vlmc("generate", "--model", llm, "--vit_model", visual, "--image", family_images[0], "--prompt", "x",
                check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "qwen2_vl" in proc.stderr and "qwen2_5_vl" in proc.stderr


@pytest.mark.parametrize("yaml", ["qwen2_5_vl_visual.yaml", "qwen2_5_vl_llm.yaml"])
def test_a_yaml_of_one_family_refuses_a_checkpoint_of_another(family_checkpoint, tmp_path, yaml):
    proc = vlmc("compile", BUILD / yaml, "--checkpoint", family_checkpoint("qwen2_vl", "tiny"), "--workspace",
                tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "builds qwen2_5_vl" in proc.stderr and "qwen2_vl checkpoint" in proc.stderr
    assert "export" not in proc.stderr and not any(tmp_path.iterdir())


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    proc = vlmc("compile", BUILD / "qwen2_vl_llm.yaml", "--checkpoint", tmp_path, "--workspace", tmp_path / "ws",
                check=False)
    assert proc.returncode == 2 and "'llava' is not supported" in proc.stderr
    assert "qwen2_5_vl" in proc.stderr and "qwen2_vl" in proc.stderr


def test_parity_names_a_dropped_deepstack(family_checkpoint, family_artifacts, family_images, tmp_path):
    """A visual artifact whose deepstack features are gone (their mergers zeroed, everything else the same) fails
    parity on the 'deepstack' output group, while its main embeddings still pass."""
    import shutil

    from safetensors.torch import load_file, save_file

    ck = family_checkpoint("qwen3_vl", "tiny")
    dropped = tmp_path / "no_deepstack"
    shutil.copytree(ck, dropped)
    weights = load_file(dropped / "model.safetensors")
    zeroed = [k for k in weights if "deepstack_merger_list" in k]
    assert zeroed
    save_file({k: v.zero_() if k in zeroed else v for k, v in weights.items()}, dropped / "model.safetensors",
              metadata={"format": "pt"})
    visual = compile_artifact("qwen3_vl_visual.yaml", dropped, tmp_path / "ws", "--max-patches", 512)
    _, llm = family_artifacts("qwen3_vl", "tiny")
    proc = vlmc("eval", "parity", "--checkpoint", ck, "--model", llm, "--vit_model", visual, "--image",
                family_images[0], "--max-new-tokens", 8, "--report", tmp_path / "report", check=False)
    failures = json.loads(proc.stdout.strip().splitlines()[-1])["failures"]
    assert proc.returncode == 1
    assert any(f.startswith("visual output 'deepstack' of image 0") for f in failures), failures
    assert not any(f.startswith("image_embedding") for f in failures), failures


def test_serve_answers_like_generate(family_artifacts, family_images, tmp_path):
    """`vlmc serve` on a Qwen3-VL pair answers the openai client with `vlmc generate`'s greedy text, for an image
    and for an image with a video."""
    from test_serve import assert_serves_like_generate

    visual, llm = family_artifacts("qwen3_vl", "tiny")
    # with a video too: its timestamps and per-patch placeholders reach the LLM worker, deepstack at its tokens
    video = write_video(tmp_path / "clip.mp4", 9, 64, 96, fps=8)
    assert_serves_like_generate(llm, visual, family_images[1], video_path=video)


@pytest.mark.parametrize("arch", FAMILIES)
def test_encode_writes_every_output_group(family_checkpoint, family_artifacts, family_images, tmp_path, arch):
    """`vlmc encode`: the embeddings in --out, each other output group next to it, all within 1e-4 of the
    transformers tower."""
    from PIL import Image

    visual, _ = family_artifacts(arch, "tiny")
    out = tmp_path / "emb.npy"
    vlmc("encode", "--vit_model", visual, "--image", family_images[1], "--out", out)
    reference, ck = _reference(arch), family_checkpoint(arch, "tiny")
    ref = reference.reference_inputs(ck, [Image.open(family_images[1])], "x")
    want = reference.vision_outputs(reference.load_model(ck), ref["pixel_values"], ref["image_grid_thw"])
    for group, theirs in want.items():
        ours = np.load(out if group == "embeddings" else tmp_path / f"emb.{group}.npy")
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), group
    assert sorted(p.name for p in tmp_path.glob("emb*.npy")) == sorted(
        "emb.npy" if g == "embeddings" else f"emb.{g}.npy" for g in want)


@pytest.mark.parametrize("arch,compute", [(a, "bf16") for a in FAMILIES] + [("qwen3_vl", "int8")])
def test_parity_with_reduced_gemm_inputs(family_checkpoint, family_images, tmp_path, arch, compute):
    """backend.compute: bf16 on each family (Qwen3-VL: its deepstack mergers too), int8 on Qwen3-VL."""
    assert_gemm_input_parity(arch, family_checkpoint(arch, "tiny"), tmp_path, family_images[0], compute,
                             ("--max-patches", 512))
