"""Reduced-precision numerics, stored form, config and bad input (no compiled graphs: those are in
test_quant_parity.py and test_quant_kernels.py)."""


import numpy as np
import pytest
import torch
from compiled import vlmc

from vlmc.compile.quantize import (QuantizationError, QuantizedWeight, Scheme, dequantize, pack_int4, quantize,
                                   unpack_int4)


def _spec_quantize(w: np.ndarray, qmax: int, qmin: int, group: int):
    """The documented rule, written out in float32 numpy: per group s = max|w| / qmax,
    q = clamp(round_half_even(w / s), qmin, qmax)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group).astype(np.float32)
    s = (np.abs(g).max(-1) / np.float32(qmax)).astype(np.float32)
    q = np.clip(np.rint(g / np.where(s > 0, s, 1)[..., None]), qmin, qmax)
    return q.reshape(n, k).astype(np.int8), s


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", None)])
def test_integer_formats_follow_the_documented_rule(fmt, group):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 0, values 0
    w[5, :7] = [0.5, -0.5, 1.5, 2.5, -2.5, 1e-3, -1e-3]  # halfway cases round to even
    qmax, qmin = {"int8": (127, -127), "int4": (7, -8)}[fmt]
    q_ref, s_ref = _spec_quantize(w, qmax, qmin, group or 128)
    got = quantize(torch.from_numpy(w), fmt, group)
    assert np.array_equal(got.values.numpy(), q_ref) and np.array_equal(got.scale.numpy(), s_ref)
    weight, scale = got.stored()
    assert weight.dtype == (torch.uint8 if fmt == "int4" else torch.int8)
    assert weight.shape == (24, 64 if fmt == "int4" else 128)
    effective = dequantize(weight, scale).numpy()
    expected = q_ref.astype(np.float32) * np.repeat(s_ref, group or 128, axis=1)
    assert np.array_equal(effective, expected) and np.all(effective[3] == 0)


def test_int4_packing_layout_and_round_trip():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 4)  # [2, 64]
    packed = pack_int4(values)
    # block of 32: byte j = (q[j] + 8) | (q[16 + j] + 8) << 4
    row = values[0].numpy().astype(int) + 8
    assert packed[0, 0].item() == row[0] | (row[16] << 4) and packed[0, 17].item() == row[33] | (row[49] << 4)
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_float_formats_round_to_nearest_even(fmt):
    w = torch.randn(8, 40)
    q = quantize(w, fmt, None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
    assert q.values.dtype == dtype and q.scale is None
    assert torch.equal(dequantize(*q.stored()), w.to(dtype).float())


def test_scales_come_from_the_full_weight_and_groups_may_not_straddle_a_slice():
    w = torch.randn(16, 128)
    full = quantize(w, "int8", None)
    half = full.slice(1, 64, 64, name="down_proj")  # a row-parallel slice keeps the full row's scale
    assert torch.equal(half.scale, full.scale)
    assert torch.equal(dequantize(*half.stored()), dequantize(*full.stored())[:, 64:])
    grouped = quantize(w, "int4", 64)
    assert torch.equal(dequantize(*grouped.slice(1, 64, 64).stored()), dequantize(*grouped.stored())[:, 64:])
    with pytest.raises(QuantizationError, match="layers.0.mlp.down_proj at tp=4.*straddles groups of 64"):
        grouped.slice(1, 32, 32, name="layers.0.mlp.down_proj at tp=4")
    with pytest.raises(QuantizationError, match="group size 64 does not divide its input width 96"):
        quantize(torch.randn(4, 96), "int4", 64, name="blocks.0.mlp.down_proj")
    rows = QuantizedWeight.cat([full.slice(0, 0, 8), full.slice(0, 8, 8)])
    assert torch.equal(rows.values, full.values) and torch.equal(rows.scale, full.scale)


def test_skip_globs_match_deploy_names_and_fused_parts():
    scheme = Scheme("int8", skip=("lm_head", "layers.*.self_attn.k_proj"))
    assert scheme.skips("lm_head")
    assert scheme.skips("layers.1.self_attn.qkv_proj", ("layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj"))
    assert not scheme.skips("layers.1.mlp.down_proj")


def test_stored_sizes_of_the_language_model(checkpoints):
    """Weight bytes of the deploy model per scheme, against fp32 (the small preset: 512 wide)."""
    from vlmc.build_in.source_code import qwen2_5_vl as arch

    ck = checkpoints["small"]
    text = arch.load_config(ck).text_config

    def nbytes(scheme):
        model = arch.load_language_model(ck, text, scheme=scheme)
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    fp32 = nbytes(Scheme())
    ratios = {w: nbytes(Scheme(w, g)) / fp32 for w, g in (("bf16", None), ("int8", None), ("int4", 64))}
    assert ratios["bf16"] <= 0.51 and ratios["int8"] <= 0.27 and ratios["int4"] <= 0.16, ratios
    skipped = nbytes(Scheme("int8", skip=("lm_head",)))
    assert skipped > nbytes(Scheme("int8"))  # lm_head stays fp32


def test_int8_kv_rows_and_bf16_cache_rounding():
    from vlmc.runtime.llm.engine import quantize_rows, to_bf16_bits

    rows = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    rows[1, 2] = 0
    q, s = quantize_rows(rows)
    ref_q, ref_s = _spec_quantize(rows.reshape(-1, 64), 127, -127, 64)
    assert np.array_equal(q.reshape(-1, 64), ref_q) and np.array_equal(s.reshape(-1), ref_s.reshape(-1))
    bits = to_bf16_bits(rows)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(widened, torch.from_numpy(rows).to(torch.bfloat16).float().numpy())


# ------------------------------------------------------------------------------------------------------ config


def _load(tmp_path, text: str):
    from vlmc.compile.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_quantize_section_and_the_vendor_spellings(tmp_path):
    cfg = _load(tmp_path, "name: a\nkind: llm\nquantize: {weights: int4, kv_cache: bf16, skip: [lm_head]}\n")
    assert cfg.quantize.scheme() == Scheme("int4", None, "bf16", ("lm_head",)) and cfg.quantize.scheme().group == 64
    assert _load(tmp_path, "name: a\nkind: llm\nquantize: {weights: int8}\n").quantize.scheme().group is None
    vendor = _load(tmp_path, "name: a\nkind: llm\nbackend: {dtype: fp16}\nquantize: [w8a16, w16kv8]\n")
    assert vendor.quantize.weights == "int8" and vendor.quantize.kv_cache == "int8"  # quantize wins over dtype
    assert vendor.backend.dtype == "fp32"
    from vlmc.compile.config import config_hash

    native = _load(tmp_path, "name: a\nkind: llm\nquantize: {weights: bf16}\n")
    assert config_hash(_load(tmp_path, "name: a\nkind: llm\nbackend: {dtype: bf16}\n")) == config_hash(native)
    assert config_hash(native) != config_hash(_load(tmp_path, "name: a\nkind: llm\n"))
    assert _load(tmp_path, "name: a\nkind: visual\nbackend: {dtype: bf16}\n").quantize.weights == "bf16"


@pytest.mark.parametrize("yaml_text,flags,message", [
    ("name: a\nkind: llm\nquantize: {weights: int3}\n", [], "'quantize.weights'"),
    ("name: a\nkind: llm\nquantize: {weights: int8, group_size: 48}\n", [], "'quantize.group_size'"),
    ("name: a\nkind: llm\nquantize: {weights: bf16, group_size: 64}\n", [], "group_size applies to int8 and int4"),
    ("name: a\nkind: llm\nquantize: {weight: int8}\n", [], "unknown key 'quantize.weight'"),
    ("name: a\nkind: visual\nquantize: {kv_cache: int8}\n", [], "unknown key 'quantize.kv_cache'"),
    ("name: a\nkind: visual\nquantize: w16kv8\n", [], "only LLM configs have"),
    ("name: a\nkind: llm\nquantize: w4a4\n", [], "'w4a4' is not a known scheme"),
    ("name: a\nkind: visual\n", ["--kv-cache", "int8"], "--kv-cache applies to LLM configs"),
    ("name: a\nkind: llm\n", ["--weights", "int4", "--target", '{"kind": "cuda", "arch": "sm_90"}'],
     "int4 has no kernel for cuda targets"),
    ("name: a\nkind: llm\n", ["--weights", "int4", "--group-size", "128"], "does not divide its input width 64"),
    ("name: a\nkind: llm\n", ["--weights", "int4", "--group-size", "32", "--tp", "4"], "o_proj at tp=4"),
    ("name: a\nkind: llm\n", ["--decode-compute", "int8"], "the weights are fp32 (set quantize.weights: int8"),
    ("name: a\nkind: llm\n", ["--weights", "bf16", "--decode-compute", "int8"], "the weights are bf16"),
    ("name: a\nkind: llm\n", ["--weights", "int8", "--decode-compute", "int4"], "'backend.decode_compute'"),
    ("name: a\nkind: visual\n", ["--decode-compute", "int8"], "--decode-compute applies to LLM configs"),
    ("name: a\nkind: visual\nbackend: {decode_compute: int8}\n", [], "decode_compute applies to LLM configs"),
    ("name: a\nkind: llm\n", ["--weights", "int8", "--compute", "int8", "--tp", "2"],
     "backend.compute: int8 quantizes each row"),
    ("name: a\nkind: llm\n", ["--compute", "int4"], "'backend.compute'"),
    ("name: a\nkind: llm\n", ["--weights", "int4", "--compute", "int8"], "the weights are int4: use those"),
    ("name: a\nkind: visual\n", ["--weights", "int8", "--group-size", "32", "--compute", "int8"],
     "the weights are int8 in groups of 32"),
    ("name: a\nkind: llm\n", ["--weights", "int8", "--decode-compute", "int8", "--target",
                               '{"kind": "cuda", "arch": "sm_90"}'], "decode_compute: int8 has a kernel for CPU"),
])
def test_bad_quantize_input_is_one_line_and_writes_nothing(checkpoints, tmp_path, yaml_text, flags, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    proc = vlmc("compile", path, "--checkpoint", checkpoints["tiny"], "--workspace", tmp_path / "ws", *flags,
                check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ws" / "a").exists()
