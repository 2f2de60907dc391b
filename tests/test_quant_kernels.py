"""The compiled `vlmc_qmatmul` (low-precision weights) and `vlmc_cache_attention` (decode attention over a
low-precision KV cache) kernels of compile/kernels/kernels.c, called from a real compiled graph, against float64
references computed from the dequantized weights / cache.

Every case is a function of one module, so the whole file compiles a single library."""

import math
import zlib

import numpy as np
import pytest
import torch

TOL = 1e-5  # max abs error relative to max |reference|
MASKED = np.float32(-3.4028235e38)
M_VALUES = (1, 3, 5, 16, 17, 70)  # 5: passes of 2 and 3 rows of x

# (name, weight kind, N, K, G): G scale columns per row (1: per row), None for bf16/fp16
QMATMUL_CASES = [
    ("bf16_k1176", "bf16", 40, 1176, None),
    ("bf16_n600", "bf16", 600, 1176, None),  # the large-M path with several weight blocks
    ("fp16_k1176", "fp16", 200, 1176, None),
    ("int8_channel_k1176", "int8", 200, 1176, 1),
    ("int8_g32", "int8", 40, 256, 8),
    ("int8_g64", "int8", 200, 256, 4),
    ("int8_g24", "int8", 40, 1176, 49),  # groups that are not a multiple of 16: scalar tails in every group
    ("int4_channel", "int4", 200, 256, 1),
    ("int4_g32", "int4", 40, 256, 8),
    ("int4_g64", "int4", 200, 512, 8),
]

# vlmc_qmatmul_bf16 (bf16 GEMM inputs): (name, weight kind, N, K, G), float32 weights too; on both paths
BF16_INPUT_CASES = [
    ("fp32_n600", "fp32", 600, 1176, None),  # several weight blocks
    ("bf16_n600", "bf16", 600, 1176, None),
    ("fp16_k256", "fp16", 200, 256, None),
    ("int8_g64", "int8", 200, 256, 4),
    ("int4_g32", "int4", 200, 256, 8),
]
BF16_INPUT_M = (1, 17, 70)

# vlmc_qmatmul_a8 (int8 decode GEMV inputs): (name, weight kind, N, K, G); K % 64 != 0 and K % 32 != 0 (a short last
# activation block, a short last chunk of weight bytes), int4 K % 128 != 0
A8_CASES = [
    ("int8_channel_k1176", "int8", 200, 1176, 1),
    ("int8_channel_k4100", "int8", 40, 4100, 1),
    ("int8_g32", "int8", 40, 256, 8),
    ("int8_g64", "int8", 200, 320, 5),
    ("int8_g128", "int8", 40, 384, 3),
    ("int4_channel", "int4", 200, 352, 1),
    ("int4_g32", "int4", 40, 352, 11),
    ("int4_g64", "int4", 200, 512, 8),
    ("int4_g128", "int4", 40, 640, 5),
]
A8_M = (1, 3, 5, 16, 17)

# vlmc_qmatmul_i8 (int8 x int8 GEMMs, int8 weights with one scale per row): (N, K); N and K whole tiles and chunks,
# and not (a last weight tile read from a padded copy; K % 64 != 0: a weight tile's bytes past K meet zero inputs); K
# 13100 at M 70: two K blocks (the C tiles held between them)
I8_SHAPES = [(64, 256), (40, 1176), (200, 100), (33, 3420), (20, 13100)]
I8_M = (1, 17, 32, 70)

# vlmc_matmul_nt (float32 weights): M 2..16 runs the GEMV kernel (batched decode steps), other M the BLAS; (N, K)
F32_MATMUL_SHAPES = [(40, 1176), (600, 256), (37, 72)]  # K % 16 != 0: scalar tails; N not a multiple of the steps
F32_MATMUL_M = (1, 2, 3, 5, 16, 17, 70)

# (name, cache dtype, B, H, Hk, S, D)
ATTENTION_CASES = [
    (f"{dtype}_{name}", dtype, *shape)
    for dtype in ("fp32", "bf16", "int8")
    for name, shape in [
        ("b1_h4k2_d64", (1, 4, 2, 1, 64)),
        ("b3_h2k2_d80", (3, 2, 2, 1, 80)),
        ("b1_h4k1_d128", (1, 4, 1, 1, 128)),  # one kv head: its keys in parts (one per thread), merged
        ("b3_h4k1_d128", (3, 4, 1, 1, 128)),
        ("b3_h4k2_d64_s3", (3, 4, 2, 3, 64)),
        ("b1_h4k1_d72_s3", (1, 4, 1, 3, 72)),  # head_dim not a multiple of 16
        ("b1_h4k1_d128_s3", (1, 4, 1, 3, 128)),  # the same, large enough to run on all threads
    ]
]
T = 48

_WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8", "int4": "uint8"}
_CACHE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


def _weight_shape(kind, n, k):
    return (n, k // 2) if kind == "int4" else (n, k)


def _x_shape(m, k):
    return (2, m // 2, k) if m == 70 else (m, k)  # one 3-D x: leading dims flattened


def _add_function(bb, name, extern, arg_types, out_shape):
    from tvm import relax

    params = [relax.Var(f"a{i}", relax.TensorType(shape, dtype)) for i, (shape, dtype) in enumerate(arg_types)]
    with bb.function(name, params):
        with bb.dataflow():
            out = bb.emit_output(relax.call_dps_packed(extern, params, relax.TensorType(out_shape, "float32")))
        bb.emit_func_output(out)


def _attention_types(dtype, b, h, hk, s, d, scales):
    cache = ((b, hk, T, d), _CACHE_DTYPES[dtype])
    new = ((b, hk, s, d), "float32")
    types = [((b, h, s, d), "float32"), cache, cache]
    if scales:
        types += [((b, hk, T), "float32")] * 2
    return types + [new, new, ((b, 1, s, T + s), "float32")]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """One compiled library holding every case as a function."""
    from tvm import relax

    from vlmc.compile import tvm_backend
    from vlmc.runtime.artifact import load_library

    bb = relax.BlockBuilder()
    _add_function(bb, "main", "vlmc_qmatmul", [((2, 64), "float32"), ((8, 64), "bfloat16")], (2, 8))  # load_library's
    for name, kind, n, k, g in QMATMUL_CASES:
        w = (_weight_shape(kind, n, k), _WEIGHT_DTYPES[kind])
        scale = [((n, g), "float32")] if g else []
        for m in M_VALUES:
            xs = _x_shape(m, k)
            _add_function(bb, f"{name}_m{m}", "vlmc_qmatmul", [(xs, "float32"), w, *scale], (*xs[:-1], n))
    for name, kind, n, k, g in BF16_INPUT_CASES:
        w = (_weight_shape(kind, n, k), _WEIGHT_DTYPES[kind])
        scale = [((n, g), "float32")] if g else []
        for m in BF16_INPUT_M:
            xs = _x_shape(m, k)
            _add_function(bb, f"bf16in_{name}_m{m}", "vlmc_qmatmul_bf16", [(xs, "float32"), w, *scale],
                          (*xs[:-1], n))
    for name, kind, n, k, g in A8_CASES:
        w = (_weight_shape(kind, n, k), _WEIGHT_DTYPES[kind])
        for m in A8_M:
            _add_function(bb, f"a8_{name}_m{m}", "vlmc_qmatmul_a8", [((m, k), "float32"), w, ((n, g), "float32")],
                          (m, n))
    for n, k in I8_SHAPES:
        for m in I8_M:
            _add_function(bb, f"i8_n{n}_k{k}_m{m}", "vlmc_qmatmul_i8", [((m, k), "float32"), ((n, k), "int8"),
                                                                       ((n, 1), "float32")], (m, n))
    _add_function(bb, "i8_grouped", "vlmc_qmatmul_i8", [((2, 64), "float32"), ((8, 64), "int8"), ((8, 2), "float32")],
                  (2, 8))
    _add_function(bb, "a8_bf16_weight", "vlmc_qmatmul_a8", [((2, 64), "float32"), ((8, 64), "bfloat16")], (2, 8))
    _add_function(bb, "a8_int8_g16", "vlmc_qmatmul_a8", [((2, 64), "float32"), ((8, 64), "int8"), ((8, 4), "float32")],
                  (2, 8))
    for n, k in F32_MATMUL_SHAPES:
        for m in F32_MATMUL_M:
            xs = _x_shape(m, k)
            _add_function(bb, f"f32_n{n}_k{k}_m{m}", "vlmc_matmul_nt", [(xs, "float32"), ((n, k), "float32")],
                          (*xs[:-1], n))
    # argument errors: a bf16 weight with a scale, an int8 weight without one
    _add_function(bb, "bf16_with_scale", "vlmc_qmatmul", [((2, 64), "float32"), ((8, 64), "bfloat16"),
                                                          ((8, 1), "float32")], (2, 8))
    _add_function(bb, "int8_without_scale", "vlmc_qmatmul", [((2, 64), "float32"), ((8, 64), "int8")], (2, 8))
    _add_function(bb, "fp32_weight", "vlmc_qmatmul", [((2, 64), "float32"), ((8, 64), "float32")], (2, 8))
    for name, dtype, b, h, hk, s, d in ATTENTION_CASES:
        _add_function(bb, f"attn_{name}", "vlmc_cache_attention",
                      _attention_types(dtype, b, h, hk, s, d, dtype == "int8"), (b, h, s, d))
    _add_function(bb, "attn_int8_without_scales", "vlmc_cache_attention",
                  _attention_types("int8", 1, 2, 2, 1, 64, False), (1, 2, 1, 64))
    _add_function(bb, "attn_bf16_with_scales", "vlmc_cache_attention",
                  _attention_types("bf16", 1, 2, 2, 1, 64, True), (1, 2, 1, 64))
    mod = bb.get()
    target = tvm_backend.host_target("llvm")
    path = tmp_path_factory.mktemp("quant_kernels") / "quant_kernels.so"
    tvm_backend.save_library(tvm_backend.compile_module(tvm_backend.optimize(mod, target), target), path)
    library = load_library(path, [])
    library.path = path
    return library


def _call(library, name, *args):
    """Call a function of the library with torch tensors (bf16 included), zero-copy through DLPack."""
    import tvm_ffi

    out = library.vm[name](*[tvm_ffi.from_dlpack(a.contiguous()) for a in args])
    return np.from_dlpack(out).copy()


def _check(out, ref):
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    scale = np.abs(ref).max()
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= TOL * scale, f"max abs error {err:.3g} = {err / scale:.3g} of max |ref| {scale:.3g}"


# ---- vlmc_qmatmul -------------------------------------------------------------------------------------------------
def pack_int4(q: np.ndarray) -> np.ndarray:
    """int [N, K] in [-8, 7] -> uint8 [N, K / 2]: block of 32 in 16 bytes, low nibble k0 + j, high nibble k0 + 16 + j."""
    n, k = q.shape
    u = (q + 8).astype(np.uint8).reshape(n, k // 32, 2, 16)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(n, k // 2)


def _weights(kind, n, k, g, rng):
    """(weight tensor, scale tensor or None, effective float64 weight [N, K])"""
    if kind in ("bf16", "fp16"):
        w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.1)
        w[:, -3:] = torch.tensor([3e-6, -6e-8, 6e-5])  # fp16 subnormals, in the scalar tail (K % 16 != 0)
        w = w.to(torch.bfloat16 if kind == "bf16" else torch.float16)
        return w, None, w.double().numpy()
    lim = 127 if kind == "int8" else 8
    q = rng.integers(-lim, 8 if kind == "int4" else 128, (n, k))
    scale = (rng.random((n, g)) * 0.02 + 0.001).astype(np.float32)
    effective = (q.astype(np.float32) * np.repeat(scale, k // g, axis=1)).astype(np.float64)  # one fp32 multiply
    stored = pack_int4(q) if kind == "int4" else q.astype(np.int8)
    return torch.from_numpy(stored), torch.from_numpy(scale), effective


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("case", QMATMUL_CASES, ids=[c[0] for c in QMATMUL_CASES])
def test_qmatmul(library, case, m):
    name, kind, n, k, g = case
    rng = np.random.default_rng(zlib.crc32(f"{name}_{m}".encode()))
    w, scale, effective = _weights(kind, n, k, g, rng)
    x = rng.standard_normal(_x_shape(m, k)).astype(np.float32)
    args = [torch.from_numpy(x), w] + ([scale] if scale is not None else [])
    out = _call(library, f"{name}_m{m}", *args)
    _check(out, x.astype(np.float64) @ effective.T)


@pytest.mark.parametrize("m", F32_MATMUL_M)
@pytest.mark.parametrize("shape", F32_MATMUL_SHAPES, ids=[f"n{n}_k{k}" for n, k in F32_MATMUL_SHAPES])
def test_f32_matmul(library, shape, m):
    n, k = shape
    rng = np.random.default_rng(zlib.crc32(f"f32_{n}_{k}_{m}".encode()))
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal(_x_shape(m, k)).astype(np.float32)
    out = _call(library, f"f32_n{n}_k{k}_m{m}", torch.from_numpy(x), torch.from_numpy(w))
    _check(out, x.astype(np.float64) @ w.astype(np.float64).T)


def test_int4_packing_layout(library):
    """Each nibble lands where the layout says: one weight set per call, every other weight zero."""
    n, k = 40, 256
    x = torch.from_numpy(np.arange(1, k + 1, dtype=np.float32)[None])  # x[k] = k + 1 identifies the input
    scale = torch.ones(n, 8)
    for pos in (0, 15, 16, 31, 32, 200):
        q = np.zeros((n, k), int)
        q[:, pos] = np.arange(n) % 15 - 7
        out = _call(library, "int4_g32_m1", x, torch.from_numpy(pack_int4(q)), scale)
        np.testing.assert_array_equal(out[0], (np.arange(n) % 15 - 7) * (pos + 1.0))


@pytest.mark.parametrize("fn, args", [
    ("bf16_with_scale", lambda: (torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.bfloat16), torch.ones(8, 1))),
    ("int8_without_scale", lambda: (torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8))),
    ("fp32_weight", lambda: (torch.zeros(2, 64), torch.zeros(8, 64))),  # bf16-input GEMMs only
])
def test_qmatmul_argument_errors(library, fn, args):
    with pytest.raises(Exception, match="vlmc_qmatmul"):
        _call(library, fn, *args())


# ---- vlmc_qmatmul_bf16 --------------------------------------------------------------------------------------------
def _bf16(a: np.ndarray) -> np.ndarray:
    """fp32 values rounded to bf16 (torch's nearest-even rounding), as float64"""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("path", ["mkl", "fp32"])
@pytest.mark.parametrize("m", BF16_INPUT_M)
@pytest.mark.parametrize("case", BF16_INPUT_CASES, ids=[c[0] for c in BF16_INPUT_CASES])
def test_qmatmul_bf16_inputs(library, monkeypatch, case, m, path):
    """Both inputs rounded to bf16, the products summed in fp32: the float64 product of the rounded inputs within
    fp32 accumulation error, on MKL's bf16 GEMM and on the widen-to-fp32 path (VLMC_BF16_GEMM picks; MKL's kernels
    run, slowly, on any x86 CPU)."""
    from vlmc.runtime.artifact import bf16_gemm_path

    monkeypatch.setenv("VLMC_BF16_GEMM", path)
    assert bf16_gemm_path(library.path) == path  # MKL opened
    name, kind, n, k, g = case
    rng = np.random.default_rng(zlib.crc32(f"bf16in_{name}_{m}".encode()))
    if kind == "fp32":
        w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.1)
        scale, effective = None, w.double().numpy()
    else:
        w, scale, effective = _weights(kind, n, k, g, rng)
    x = rng.standard_normal(_x_shape(m, k)).astype(np.float32)
    args = [torch.from_numpy(x), w] + ([scale] if scale is not None else [])
    out = _call(library, f"bf16in_{name}_m{m}", *args)
    ref = _bf16(x) @ _bf16(effective.astype(np.float32)).T
    _check(out, ref)
    # and the rounding is there: the unrounded product is further away than the accumulation error
    assert np.abs(out - x.astype(np.float64) @ effective.T).max() > 10 * TOL * np.abs(ref).max()


# ---- vlmc_qmatmul_a8 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["vnni", "portable"])
@pytest.mark.parametrize("m", A8_M)
@pytest.mark.parametrize("case", A8_CASES, ids=[c[0] for c in A8_CASES])
def test_qmatmul_int8_inputs(library, monkeypatch, case, m, path):
    """x quantized per block of 32 exactly as compile.quantize.int8_inputs says, then the product with the
    effective weight: within fp32 accumulation error of the float64 product, on the VNNI kernel and the portable
    one (M 17: x quantized, then vlmc_qmatmul's GEMM path)."""
    from vlmc.compile.quantize import int8_inputs

    monkeypatch.setenv("VLMC_INT8_GEMV", path)
    name, kind, n, k, g = case
    rng = np.random.default_rng(zlib.crc32(f"a8_{name}_{m}".encode()))
    w, scale, effective = _weights(kind, n, k, g, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :32] = 0  # a block whose scale is 0
    x[-1, 5] = 40.  # an outlier: its block's other inputs quantize coarsely
    out = _call(library, f"a8_{name}_m{m}", torch.from_numpy(x), w, scale)
    x_eff = int8_inputs(torch.from_numpy(x)).double().numpy()
    _check(out, x_eff @ effective.T)
    # and the quantization is there: the unquantized product is further away than the accumulation error
    assert np.abs(out - x.astype(np.float64) @ effective.T).max() > 10 * TOL * np.abs(out).max()


@pytest.mark.parametrize("fn, args, match", [
    ("a8_bf16_weight", lambda: (torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.bfloat16)), "int8 or uint8"),
    ("a8_int8_g16", lambda: (torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 4)),
     "multiple of 32"),
])
def test_qmatmul_int8_inputs_argument_errors(library, fn, args, match):
    with pytest.raises(Exception, match=match):
        _call(library, fn, *args())


# ---- vlmc_qmatmul_i8 ----------------------------------------------------------------------------------------------
def _amx_int8() -> bool:
    flags = open("/proc/cpuinfo").read()
    return " amx_int8 " in flags and " amx_tile " in flags


@pytest.mark.parametrize("path", ["amx", "fp32"])
@pytest.mark.parametrize("m", I8_M)
@pytest.mark.parametrize("shape", I8_SHAPES, ids=[f"n{n}_k{k}" for n, k in I8_SHAPES])
def test_qmatmul_int8_rows(library, monkeypatch, shape, m, path):
    """x quantized per row exactly as compile.quantize.int8_rows says, then the product with the effective weight:
    within fp32 rounding of the float64 product, on AMX tiles (where the host has them; asserted, so a host with
    AMX that falls back fails) and on the fallback (VLMC_INT8_GEMM=fp32)."""
    from vlmc.compile.quantize import int8_rows
    from vlmc.runtime.artifact import int8_gemm_path

    monkeypatch.setenv("VLMC_INT8_GEMM", path)
    want = path if path == "fp32" or _amx_int8() else "fp32"
    assert int8_gemm_path(library.path) == want
    n, k = shape
    rng = np.random.default_rng(zlib.crc32(f"i8_{n}_{k}_{m}".encode()))
    w, scale, effective = _weights("int8", n, k, 1, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[-1, 5] = 40.  # an outlier: its row's other inputs quantize coarsely
    if m > 1:
        x[0] = 0  # a row whose scale is 0
    out = _call(library, f"i8_n{n}_k{k}_m{m}", torch.from_numpy(x), w, scale)
    x_eff = int8_rows(torch.from_numpy(x)).double().numpy()
    _check(out, x_eff @ effective.T)
    assert m == 1 or not out[0].any()
    # and the quantization is there: the unquantized product is further away than the accumulation error
    assert np.abs(out - x.astype(np.float64) @ effective.T).max() > 10 * TOL * np.abs(out).max()


def test_qmatmul_int8_rows_refuses_grouped_scales(library):
    with pytest.raises(Exception, match="one scale per row"):
        _call(library, "i8_grouped", torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2))


# ---- vlmc_cache_attention -----------------------------------------------------------------------------------------
def _attention_inputs(dtype, b, h, hk, s, d, rng):
    """Inputs (torch tensors, in call order) and the dequantized caches (float64 [B, Hk, T, D]) and lengths. Cache
    slots past a row's length hold NaN (fp32/bf16) or a NaN scale (int8): reading one would show in the output."""
    lengths = rng.integers(0, T + 1, b)
    lengths[0] = T  # a full cache
    if b > 1:
        lengths[1] = 0  # an empty one
    stale = np.arange(T)[None, :] >= lengths[:, None]  # [B, T]
    q = rng.standard_normal((b, h, s, d)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((b, hk, s, d)).astype(np.float32) for _ in range(2))
    caches, scales, dequantized = [], [], []
    for _ in range(2):
        values = rng.standard_normal((b, hk, T, d)).astype(np.float32)
        if dtype == "int8":
            qi = rng.integers(-127, 128, (b, hk, T, d)).astype(np.int8)
            sc = (rng.random((b, hk, T)) * 0.02 + 0.005).astype(np.float32)
            dequantized.append((qi.astype(np.float32) * sc[..., None]).astype(np.float64))
            sc[np.broadcast_to(stale[:, None, :], sc.shape)] = np.nan
            caches.append(torch.from_numpy(qi))
            scales.append(torch.from_numpy(sc))
        else:
            cache = torch.from_numpy(values)
            if dtype == "bf16":
                cache = cache.to(torch.bfloat16)
            dequantized.append(cache.double().numpy().copy())
            cache[torch.from_numpy(np.broadcast_to(stale[:, None, :], (b, hk, T)).copy())] = float("nan")
            caches.append(cache)
    mask = np.zeros((b, 1, s, T + s), np.float32)
    mask[:, 0, :, :T][np.broadcast_to(stale[:, None, :], (b, s, T))] = MASKED
    mask[:, 0, :, T:][:, np.triu(np.ones((s, s), bool), 1)] = MASKED  # causal among the new positions
    args = [torch.from_numpy(q), *caches, *scales, torch.from_numpy(k_new), torch.from_numpy(v_new),
            torch.from_numpy(mask)]
    return args, (q, k_new, v_new, mask, *dequantized)


def attention_reference(q, k_new, v_new, mask, k_cache, v_cache):
    """float64; keys masked at <= -1e30 weigh exactly 0 (a row with every key masked gives zeros)."""
    b, h, s, d = q.shape
    group = h // k_new.shape[1]
    keys = np.repeat(np.concatenate([k_cache, k_new.astype(np.float64)], axis=2), group, axis=1)  # [B, H, T+S, D]
    values = np.repeat(np.concatenate([v_cache, v_new.astype(np.float64)], axis=2), group, axis=1)
    valid = mask > -1e30  # [B, 1, S, T+S]
    keys, values = np.where(np.isnan(keys), 0, keys), np.where(np.isnan(values), 0, values)
    scores = np.einsum("bhsd,bhjd->bhsj", q.astype(np.float64), keys) / math.sqrt(d) + mask
    scores = np.where(valid, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    p = np.where(valid, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    total = p.sum(axis=-1, keepdims=True)
    return np.einsum("bhsj,bhjd->bhsd", p / np.where(total > 0, total, 1), values)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_cache_attention(library, case):
    name, dtype, b, h, hk, s, d = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    args, ref_inputs = _attention_inputs(dtype, b, h, hk, s, d, rng)
    out = _call(library, f"attn_{name}", *args)
    _check(out, attention_reference(*ref_inputs))


def test_cache_attention_fully_masked_rows_are_zero(library):
    name, dtype, b, h, hk, s, d = next(c for c in ATTENTION_CASES if c[0] == "int8_b3_h4k2_d64_s3")
    args, ref_inputs = _attention_inputs(dtype, b, h, hk, s, d, np.random.default_rng(5))
    args[-1][2] = float(MASKED)  # every key of batch row 2
    args[-1][0, 0, 1] = float("-inf")  # one position of batch row 0
    out = _call(library, f"attn_{name}", *args)
    assert np.all(out[2] == 0) and np.all(out[0, :, 1] == 0)
    _check(out, attention_reference(*ref_inputs[:3], args[-1].numpy(), *ref_inputs[4:]))


@pytest.mark.parametrize("fn, scales", [("attn_int8_without_scales", False), ("attn_bf16_with_scales", True)])
def test_cache_attention_argument_errors(library, fn, scales):
    dtype = torch.int8 if fn.startswith("attn_int8") else torch.bfloat16
    args = [torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, T, 64, dtype=dtype), torch.zeros(1, 2, T, 64, dtype=dtype)]
    args += [torch.ones(1, 2, T)] * (2 if scales else 0)
    args += [torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64), torch.zeros(1, 1, 1, T + 1)]
    with pytest.raises(Exception, match="vlmc_cache_attention"):
        _call(library, fn, *args)
