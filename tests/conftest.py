import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Everything runs offline: transformers must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from compiled import compile_artifact, llm_shape, visual_budget, vlmc  # noqa: E402  (tests/ is on the path now)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Built-in checkpoints for both presets, written once per test session."""
    from vlmc.build_in.source_code.qwen2_5_vl import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {preset: str(write_checkpoint(root / preset, preset=preset, seed=0)) for preset in ("tiny", "small")}


@pytest.fixture(scope="session")
def qwen_artifacts(checkpoints, tmp_path_factory):
    """Qwen2.5-VL artifacts compiled once per session: a visual one per preset, LLM ones at several tp."""
    ws = tmp_path_factory.mktemp("llm_ws")
    out = {}
    for preset in ("tiny", "small"):
        out[preset, "visual"] = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints[preset], ws / preset,
                                                 "--max-patches", 512)
        for tp in ((1, 2, 4) if preset == "tiny" else (1, 2)):
            out[preset, tp] = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints[preset], ws / preset / f"tp{tp}",
                                               "--tp", tp, *llm_shape())
    return out


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("family_checkpoints"), {}

    def get(arch, preset):
        if (arch, preset) not in made:
            out = root / f"{arch}_{preset}"
            vlmc("checkpoint", "tiny", "--arch", arch, out, "--preset", preset)
            made[arch, preset] = str(out)
        return made[arch, preset]
    return get


@pytest.fixture(scope="session")
def family_artifacts(family_checkpoint, tmp_path_factory):
    """Compiled once per (family, preset, tp): a visual artifact and the LLM artifacts."""
    root, built = tmp_path_factory.mktemp("family_ws"), {}

    def get(arch, preset, tp=1):
        ck, ws = family_checkpoint(arch, preset), root / f"{arch}_{preset}"
        if (arch, preset, "visual") not in built:
            built[arch, preset, "visual"] = compile_artifact(f"{arch}_visual.yaml", ck, ws, *visual_budget())
        if (arch, preset, tp) not in built:
            built[arch, preset, tp] = compile_artifact(f"{arch}_llm.yaml", ck, ws / f"tp{tp}", "--tp", tp,
                                                       *llm_shape())
        return built[arch, preset, "visual"], built[arch, preset, tp]
    return get


def random_image(height, width, seed=0, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def write_video(path, num_frames, height, width, fps=10, codec="mpeg4", seed=0):
    """A video of moving random texture through PyAV's encoder (`codec`: mpeg4, libx264, libvpx-vp9, gif, ...)."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(num_frames):
            frame = np.roll(base, (i * 5, i * 3), axis=(0, 1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
