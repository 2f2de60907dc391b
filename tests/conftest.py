import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Everything runs offline: transformers must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Built-in checkpoints for both presets, written once per test session."""
    from vlmc.build_in.source_code.qwen2_5_vl import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {preset: str(write_checkpoint(root / preset, preset=preset, seed=0)) for preset in ("tiny", "small")}


def random_image(height, width, seed=0, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)
