"""vlmc's host ops against transformers' image processor, tokenizer and get_rope_index on the same checkpoint."""

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image
from vlmc.build_in.source_code.qwen2_5_vl.reference import as_numpy, reference_inputs

# (height, width): tiny ones below min_pixels, odd sizes, extreme aspect ratios, ones above max_pixels.
SIZES = [(20, 20), (15, 33), (28, 28), (57, 900), (200, 300), (333, 517), (1000, 60), (37, 2000), (500, 499)]


def _compare(checkpoint, images, text, min_pixels=None, max_pixels=None):
    from transformers import AutoTokenizer
    from vlmc.build_in.source_code.qwen2_5_vl import host_spec
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt

    spec = host_spec(checkpoint)
    ours = prepare_prompt(AutoTokenizer.from_pretrained(checkpoint), spec, images, text,
                          image_config=spec.image.with_pixels(min_pixels, max_pixels))
    ref = reference_inputs(checkpoint, images, text, min_pixels, max_pixels)
    np.testing.assert_array_equal(ours.input_ids, as_numpy(ref["input_ids"])[0])
    np.testing.assert_array_equal(ours.position_ids, as_numpy(ref["position_ids"])[:, 0])
    assert ours.rope_deltas == int(ref["rope_deltas"][0])
    if images:
        np.testing.assert_array_equal(ours.image_grid_thw, as_numpy(ref["image_grid_thw"]))
        assert np.abs(ours.pixel_values - as_numpy(ref["pixel_values"])).max() <= 1e-5
    return ours


@pytest.mark.parametrize("size", SIZES)
def test_single_image_matches_reference(checkpoints, size):
    _compare(checkpoints["tiny"], [random_image(*size, seed=sum(size))], "What is in the picture?",
             max_pixels=200_000)


def test_pixel_bounds_and_many_images(checkpoints):
    images = [random_image(90, 160, 1), random_image(400, 90, 2, "RGBA"), random_image(30, 45, 3, "L")]
    for count in (1, 2, 3):
        _compare(checkpoints["tiny"], images[:count], "Compare these.")
    ours = _compare(checkpoints["small"], images, "Compare these.", min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 30)
    assert all(h * w <= 4 * 30 and h * w >= 4 * 8 for _, h, w in ours.image_grid_thw)
    _compare(checkpoints["tiny"], [], "Text only, no image.")


def test_preprocess_cli_matches_reference(checkpoints, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    random_image(123, 321, 5).save(a)
    random_image(640, 480, 6).save(b, quality=90)
    buf = io.BytesIO()
    random_image(70, 50, 7).save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = tmp_path / "out.npz"
    cmd = [sys.executable, "-m", "vlmc", "preprocess", "--checkpoint", checkpoints["small"], "--image", str(a),
           "--image", f"file://{b}", "--image", data_uri, "--prompt", "Describe all three.", "--out", str(out),
           "--max-pixels", "150000"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    from PIL import Image

    images = [Image.open(a), Image.open(b), Image.open(io.BytesIO(buf.getvalue()))]
    ref = reference_inputs(checkpoints["small"], images, "Describe all three.", max_pixels=150000)
    np.testing.assert_array_equal(got["image_grid_thw"], as_numpy(ref["image_grid_thw"]))
    np.testing.assert_array_equal(got["input_ids"], as_numpy(ref["input_ids"])[0])
    np.testing.assert_array_equal(got["position_ids"], as_numpy(ref["position_ids"])[:, 0])
    assert int(got["rope_deltas"]) == int(ref["rope_deltas"][0])
    assert np.abs(got["pixel_values"] - as_numpy(ref["pixel_values"])).max() <= 1e-5


@pytest.mark.parametrize("size", [(10, 10), (1, 40), (3, 500)])
def test_images_smaller_than_a_patch_are_scaled_up_as_the_reference_does(checkpoints, size):
    """transformers 5.x's smart_resize scales an image below one patch up to min_pixels (10x10 -> 56x56)."""
    from vlmc.runtime.cpu_ops.image import ImageConfig, image_to_patches

    image = random_image(*size)
    ref = reference_inputs(checkpoints["tiny"], [image], "x")
    pixels, grid = image_to_patches(image, ImageConfig.from_checkpoint(checkpoints["tiny"]))
    np.testing.assert_array_equal([grid], as_numpy(ref["image_grid_thw"]))
    assert np.abs(pixels - as_numpy(ref["pixel_values"])).max() <= 1e-5


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such file"),
    ("text", "not a readable image"),
    ("data_uri", "not valid base64"),
    ("aspect", "aspect ratio"),
])
def test_bad_images_fail_with_a_clear_message(checkpoints, tmp_path, kind, reason):
    if kind == "missing":
        image = str(tmp_path / "nope.png")
    elif kind == "text":
        image = str(tmp_path / "notes.png")
        (tmp_path / "notes.png").write_text("not an image")
    elif kind == "data_uri":
        image = "data:image/png;base64,@@@not-base64@@@"
    elif kind == "aspect":
        image = str(tmp_path / "wide.png")
        random_image(14, 14 * 201).save(image)
    proc = subprocess.run([sys.executable, "-m", "vlmc", "preprocess", "--checkpoint", checkpoints["tiny"],
                           "--image", image, "--prompt", "x", "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    assert image[:40] in proc.stderr
