"""Run llama.cpp's own convert_hf_to_gguf.py (argv[1]) with its remaining arguments, under the peer's Python, with
two adaptations for vlmc's random-weight checkpoints that leave real checkpoints untouched:
- the tokenizer's pre-tokenizer is recognised by a hash of its output on a test text; a random checkpoint's small
  vocabulary has an unknown hash while it uses its family's rules (Qwen2's for every Qwen-VL): the converter's
  refusal becomes "qwen2";
- the tensor-name map is built for `depth` blocks, and the Qwen2.5-VL merger's `mlp.2` is matched like a block
  index: a vision tower shallower than 3 blocks would leave it unmapped, so the map covers at least 64 blocks."""

import runpy
import sys
from pathlib import Path

converter = Path(sys.argv[1]).resolve()
sys.argv = [str(converter), *sys.argv[2:]]
sys.path.insert(0, str(converter.parent))
sys.path.insert(1, str(converter.parent / "gguf-py"))

import gguf  # noqa: E402

name_map = gguf.get_tensor_name_map
gguf.get_tensor_name_map = lambda arch, blocks: name_map(arch, max(blocks, 64))

from conversion import base  # noqa: E402

vocab_base_pre = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer) -> str:
    try:
        return vocab_base_pre(self, tokenizer)
    except NotImplementedError:
        return "qwen2"


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(str(converter), run_name="__main__")
