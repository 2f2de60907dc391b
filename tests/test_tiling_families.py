"""The tiling families (InternVL with Qwen2 or Qwen3 text, SmolVLM with Qwen3 text, Idefics3 with Llama text) end
to end: host tiling and prompt expansion against transformers' PIL processors, compiled artifacts against
transformers (eval parity: image embeddings, prefill and decode logits, 32 greedy tokens), generate at tp 2,
serve, encode, tile caps and the refusals of the other kind of budget."""

import json

import numpy as np
import pytest
from compiled import BUILD, assert_gemm_input_parity, compile_artifact, generate_json, llm_shape, vlmc
from conftest import random_image

# (architecture, text model); each on both presets, Idefics3 on the tiny one
VARIANTS = [("internvl", "qwen2"), ("internvl", "qwen3"), ("smolvlm", "qwen3")]
CASES = [(a, t, p) for a, t in VARIANTS for p in ("tiny", "small")] + [("idefics3", "llama", "tiny")]
SMALL_MAX_TILES = 2  # small presets compile for 2 grid tiles: real tile sizes, a short test, and the cap exercised


@pytest.fixture(scope="session")
def tiled_checkpoint(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("tiled_checkpoints"), {}

    def get(arch, text, preset):
        if (arch, text, preset) not in made:
            out = root / f"{arch}_{text}_{preset}"
            vlmc("checkpoint", "tiny", "--arch", arch, out, "--preset", preset, "--text", text)
            made[arch, text, preset] = str(out)
        return made[arch, text, preset]
    return get


@pytest.fixture(scope="session")
def tiled_artifacts(tiled_checkpoint, tmp_path_factory):
    """Compiled once per (family, text, preset, tp)."""
    root, built = tmp_path_factory.mktemp("tiled_ws"), {}

    def get(arch, text, preset, tp=1):
        ck, ws = tiled_checkpoint(arch, text, preset), root / f"{arch}_{text}_{preset}"
        if (arch, text, preset, "visual") not in built:
            cap = ["--max-tiles", SMALL_MAX_TILES] if preset == "small" else []
            built[arch, text, preset, "visual"] = compile_artifact(f"{arch}_visual.yaml", ck, ws, *cap)
        if (arch, text, preset, tp) not in built:
            prefill = 1024 if preset == "small" else 256  # small: 256 tokens per InternVL tile
            built[arch, text, preset, tp] = compile_artifact(f"{arch}_llm.yaml", ck, ws / f"tp{tp}", "--tp", tp,
                                                             *llm_shape(prefill, prefill + 64))
        return built[arch, text, preset, "visual"], built[arch, text, preset, tp]
    return get


# wide, tall, smaller than a tile, square, extreme (20:1)
SIZES = [(130, 200), (400, 40), (20, 30), (64, 64), (30, 600)]


@pytest.fixture(scope="session")
def tiled_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiled_images")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        paths.append(folder / f"img{i}.png")
        random_image(h, w, seed=40 + i).save(paths[-1])
    return paths


def _arch(name):
    from vlmc.build_in.source_code import get_architecture

    return get_architecture(name)


# one case per family and preset: the host steps do not depend on the text model
@pytest.mark.parametrize("arch,text,preset", [c for c in CASES if c[:2] != ("internvl", "qwen3")])
def test_tiling_and_prompt_match_the_processor(tiled_checkpoint, tiled_images, arch, text, preset):
    """Host tiles, layouts, ids and positions for 0, 1 and 2 images of every shape, with and without a tile cap,
    against transformers' PIL processor and the processor's expansion (run in-process; the CLI below)."""
    from PIL import Image
    from transformers import AutoTokenizer
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt

    ck = tiled_checkpoint(arch, text, preset)
    spec, reference = _arch(arch).host_spec(ck), _arch(arch).reference
    tokenizer, model = AutoTokenizer.from_pretrained(ck), reference.load_model(ck)
    images = [Image.open(p) for p in tiled_images]
    prompts = [[], [images[0]], [images[1], images[2]], [images[3]], [images[4], images[0]]]
    for cap in (None, 1, 3):
        for group in prompts:
            got = prepare_prompt(tokenizer, spec, group, "Describe.", budget=cap)
            ref = reference.reference_inputs(ck, group, "Describe.", model=model, max_tiles=cap)
            np.testing.assert_array_equal(got.input_ids, reference.as_numpy(ref["input_ids"])[0])
            np.testing.assert_array_equal(got.position_ids, reference.as_numpy(ref["position_ids"])[:, 0])
            assert got.rope_deltas == 0
            if group:
                np.testing.assert_array_equal(got.image_grid_thw, reference.as_numpy(ref["image_grid_thw"]))
                theirs = reference.as_numpy(ref["pixel_values"]).reshape(got.pixel_values.shape)
                assert np.abs(got.pixel_values - theirs).max() <= 1e-5
                if cap is not None:
                    assert all(t <= cap + 1 for t in got.image_grid_thw[:, 0])


def test_preprocess_command_writes_the_tiles(tiled_checkpoint, tiled_images, tmp_path):
    ck = tiled_checkpoint("internvl", "qwen2", "tiny")
    out = tmp_path / "p.npz"
    proc = vlmc("preprocess", "--checkpoint", ck, "--image", tiled_images[0], "--prompt", "x", "--out", out,
                "--max-tiles", 2)
    data = np.load(out)
    assert data["pixel_values"].shape == (3, 3, 56, 56)  # 2 tiles + thumbnail
    assert data["image_grid_thw"].tolist() == [[3, 1, 2]] and "3 tiles" in proc.stdout
    proc = vlmc("preprocess", "--checkpoint", ck, "--image", tiled_images[0], "--prompt", "x", "--out", out,
                "--max-pixels", 1000, check=False)
    assert proc.returncode == 2 and "tiles" in proc.stderr and "Traceback" not in proc.stderr


# tiny: no image and two; small: one (a small InternVL image is 768 tokens at the cap of 2 tiles + thumbnail)
PARITY = [(*case, n) for case in CASES for n in ((1,) if case[2] == "small" else (0, 2))]


@pytest.mark.parametrize("arch,text,preset,num_images", PARITY)
def test_parity_with_transformers(tiled_checkpoint, tiled_artifacts, tiled_images, arch, text, preset, num_images):
    """`vlmc eval parity`'s checks in-process (the command itself below): embeddings within 1e-4, logits within
    the fp32 thresholds, 32 greedy tokens identical."""
    from vlmc.eval.parity import failures, run_parity

    visual, llm = tiled_artifacts(arch, text, preset)
    images = [str(p) for p in tiled_images[:num_images]]
    report = run_parity(tiled_checkpoint(arch, text, preset), str(llm), str(visual), images, "Describe the image.", 32)
    assert not failures(report), failures(report)
    assert report["greedy"]["identical_tokens"] == 32
    assert report["host"]["input_ids_equal"] and report["host"].get("image_grid_thw_equal", True)
    assert len(report.get("image_embedding_rel_error", [])) == num_images
    assert all(e <= 1e-4 for e in report.get("image_embedding_rel_error", []))


@pytest.mark.parametrize("arch,text,preset", [(a, t, "tiny") for a, t in VARIANTS] + [("internvl", "qwen3", "small")])
def test_generate_with_tensor_parallelism_equals_transformers(tiled_checkpoint, tiled_artifacts, tiled_images,
                                                              arch, text, preset):
    from PIL import Image

    visual, llm = tiled_artifacts(arch, text, preset, tp=2)
    ck = tiled_checkpoint(arch, text, preset)
    out = generate_json("--model", llm, "--vit_model", visual, "--image", tiled_images[1], "--prompt", "Describe.",
                        "--max-new-tokens", 32)
    reference = _arch(arch).reference
    model = reference.load_model(ck)
    cap = {"max_tiles": SMALL_MAX_TILES} if preset == "small" else {}
    ref = reference.reference_inputs(ck, [Image.open(tiled_images[1])], "Describe.", model=model, **cap)
    want = reference.generate_reference(model, ref, 32)
    assert out["token_ids"] == want[:len(out["token_ids"])] and len(out["token_ids"]) > 0
    image = out["images"][0]
    assert image["tiles"] == int(ref["image_grid_thw"][0, 0]) and image["fitted_to_budget"] == (preset == "small")


def test_parity_command_and_encode(tiled_checkpoint, tiled_artifacts, tiled_images, tmp_path):
    """The CLI: `vlmc eval parity` passes on SmolVLM; `vlmc encode` writes InternVL's embeddings within 1e-4 of
    get_image_features and says how the image was cut, with the tiles in one graph call or in several."""
    from PIL import Image

    ck = tiled_checkpoint("smolvlm", "qwen3", "tiny")
    visual, llm = tiled_artifacts("smolvlm", "qwen3", "tiny")
    proc = vlmc("eval", "parity", "--checkpoint", ck, "--model", llm, "--vit_model", visual, "--image",
                tiled_images[0], "--max-new-tokens", 8, "--report", tmp_path / "report")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["pass"]

    # the 7 tiles of a 6x1 image (and its thumbnail) in one call, and in calls of 2, 2, 2 and 1 tiles
    ck = tiled_checkpoint("internvl", "qwen2", "tiny")
    visual, _ = tiled_artifacts("internvl", "qwen2", "tiny")
    yaml = tmp_path / "two_per_call.yaml"
    yaml.write_text((BUILD / "internvl_visual.yaml").read_text().replace("tiles_per_call: null", "tiles_per_call: 2"))
    by_two = compile_artifact(yaml, ck, tmp_path / "ws")
    assert json.loads((by_two / "manifest.json").read_text())["tile_buckets"] == [1, 2]
    reference = _arch("internvl").reference
    ref = reference.reference_inputs(ck, [Image.open(tiled_images[1])], "x")
    theirs = reference.vision_outputs(reference.load_model(ck), ref["pixel_values"])["embeddings"]
    for artifact in (visual, by_two):
        out = tmp_path / "emb.npy"
        proc = vlmc("encode", "--vit_model", artifact, "--image", tiled_images[1], "--out", out)
        assert "6x1 tiles" in proc.stdout
        ours = np.load(out)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_serve_answers_like_generate(tiled_artifacts, tiled_images):
    """`vlmc serve` on an InternVL pair answers the openai client with `vlmc generate`'s greedy text."""
    from test_serve import assert_serves_like_generate

    visual, llm = tiled_artifacts("internvl", "qwen3", "tiny")
    assert_serves_like_generate(llm, visual, tiled_images[0])


def test_budgets_of_the_other_kind_are_refused(tiled_checkpoint, tiled_artifacts, tmp_path):
    """A patch budget for a tiling model, tiles for a native-resolution one, and pixel bounds on a tiling
    server: each a clear error before any work."""
    from vlmc.build_in.source_code.qwen2_5_vl import write_checkpoint

    ck = tiled_checkpoint("internvl", "qwen2", "tiny")
    proc = vlmc("compile", BUILD / "internvl_visual.yaml", "--checkpoint", ck, "--workspace", tmp_path,
                "--max-patches", 256, check=False)
    assert proc.returncode == 2 and "max_tiles" in proc.stderr and "Traceback" not in proc.stderr
    qwen = write_checkpoint(tmp_path / "qwen", "tiny")
    proc = vlmc("compile", BUILD / "internvl_visual.yaml", "--checkpoint", qwen, "--workspace", tmp_path,
                check=False)
    assert proc.returncode == 2 and "builds internvl" in proc.stderr
    proc = vlmc("compile", BUILD / "qwen2_5_vl_visual.yaml", "--checkpoint", qwen, "--workspace", tmp_path,
                "--max-tiles", 4, check=False)
    assert proc.returncode == 2 and "max_tiles" in proc.stderr and "Traceback" not in proc.stderr
    visual, llm = tiled_artifacts("internvl", "qwen2", "tiny")
    proc = vlmc("serve", "--model", llm, "--vit_model", visual, "--port", 0, "--max_pixels", 10000, check=False,
                timeout=120)
    assert proc.returncode == 2 and "tiles" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("arch,text,compute", [("internvl", "qwen2", "bf16"), ("smolvlm", "qwen3", "bf16"),
                                               ("smolvlm", "qwen3", "int8")])
def test_parity_with_reduced_gemm_inputs(tiled_checkpoint, tiled_images, tmp_path, arch, text, compute):
    """backend.compute: bf16 on the tiling families (their projector / connector included); int8 on SmolVLM (its
    patch convolution quantized per patch in the reference)."""
    assert_gemm_input_parity(arch, tiled_checkpoint(arch, text, "tiny"), tmp_path, tiled_images[0], compute)
