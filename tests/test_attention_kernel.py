"""The compiled `vlmc_segment_attention` kernel against the same op in standard PyTorch ops, on every path it has:
window tiles, long shared ranges and causal runs through BLAS, short causal runs in tiles, left padding (empty
ranges), grouped-query heads and a head_dim that is not a multiple of the kernel's 16-float vectors."""

import numpy as np
import pytest
import torch

N, HEADS, KV_HEADS, HEAD_DIM = 300, 4, 2, 72


class Attend(torch.nn.Module):
    def forward(self, q, k, v, ranges):
        from vlmc.compile.ops import segment_attention

        return segment_attention(q, k, v, ranges)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from vlmc.compile import ops, tvm_backend
    from vlmc.runtime.artifact import load_library

    inputs = (torch.zeros(N, HEADS, HEAD_DIM), torch.zeros(N, KV_HEADS, HEAD_DIM), torch.zeros(N, KV_HEADS, HEAD_DIM),
              torch.zeros(N, 2, dtype=torch.int32))
    mod, params, _ = tvm_backend.import_exported(tvm_backend.export_module(Attend(), inputs), ops.CUSTOM_CONVERTERS)
    target = tvm_backend.host_target("llvm")
    path = tmp_path_factory.mktemp("attention") / "attention.so"
    tvm_backend.save_library(tvm_backend.compile_module(tvm_backend.optimize(mod, target), target), path)
    return load_library(path, params)


def _causal(first: int) -> np.ndarray:
    from vlmc.runtime.cpu_ops.masks import prompt_key_ranges

    return prompt_key_ranges(N - first, N)


def _windows(size: int) -> np.ndarray:
    starts = np.arange(N) // size * size
    return np.stack([starts, np.minimum(starts + size, N)], axis=1)


RANGES = {
    "prompt, left padded (causal run in BLAS blocks)": lambda: _causal(37),
    "short prompt (causal rows in tiles)": lambda: _causal(N - 40),
    "windows of 50 keys (tiles)": lambda: _windows(50),
    "a 260-key window shared by 260 rows (BLAS) and a short one": lambda: _windows(260),
    "full attention over 280 keys, padding rows empty": lambda: np.concatenate(
        [np.tile([0, 280], (280, 1)), np.zeros((N - 280, 2), int)]),
    "arbitrary ranges": lambda: np.sort(np.random.default_rng(1).integers(0, N + 1, (N, 2)), axis=1),
    "a causal run that starts with an empty range": lambda: np.stack([np.full(N, 5), 5 + np.arange(N) % 200], 1),
}


@pytest.mark.parametrize("case", list(RANGES))
def test_kernel_matches_standard_ops(compiled, case):
    from vlmc.compile.ops import segment_attention_decomposed

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((N, h, HEAD_DIM)).astype(np.float32) for h in (HEADS, KV_HEADS, KV_HEADS))
    ranges = RANGES[case]().astype(np.int32)
    out = compiled(q, k, v, ranges)[0]
    expected = segment_attention_decomposed(*(torch.from_numpy(x) for x in (q, k, v, ranges))).numpy()
    empty = ranges[:, 1] <= ranges[:, 0]
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
