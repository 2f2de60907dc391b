"""Deploy-friendly model definitions, one folder per architecture.

An architecture module provides MODEL_TYPES, write_checkpoint, load_config, host_spec, load_vision,
load_language_model, embedding_table, its SHARDING plan and `reference` (transformers as the reference
implementation, for parity checks). Adding a family means adding a folder here and a
line in ARCHITECTURES; the compiler and runtimes only use this interface.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

ARCHITECTURES = {"qwen2_5_vl": "vlmc.build_in.source_code.qwen2_5_vl",
                 "qwen2_vl": "vlmc.build_in.source_code.qwen2_vl",
                 "qwen3_vl": "vlmc.build_in.source_code.qwen3_vl",
                 "internvl": "vlmc.build_in.source_code.internvl",
                 "smolvlm": "vlmc.build_in.source_code.smolvlm",
                 "idefics3": "vlmc.build_in.source_code.idefics3"}


def get_architecture(name: str):
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(ARCHITECTURES[name])


def detect_architecture(checkpoint_dir: str | Path) -> str:
    """The architecture of a Hugging Face checkpoint, from config.json's model_type."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint folder (no config.json)")
    model_type = json.loads(path.read_text()).get("model_type")
    for name in ARCHITECTURES:
        if model_type in get_architecture(name).MODEL_TYPES:
            return name
    raise ValueError(f"{checkpoint_dir}: model_type {model_type!r} is not supported; "
                     f"supported: {', '.join(sorted(ARCHITECTURES))}")
