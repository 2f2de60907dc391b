"""TVM 0.27 (Relax) backend for vlmc: export, import with weights as parameters, optimize (BLAS dispatch), build,
save/load and call compiled graphs.

Verified against: apache-tvm 0.27.0.post1 (apache-tvm-ffi 0.1.15), torch 2.13 (CPU), gcc 12.

Pitfalls / API changes in TVM 0.27 (all verified in this venv)
----------------------------------------------------------------
* StructInfo was renamed to *Type*:  relax.TensorStructInfo -> relax.TensorType,
  expr.struct_info -> expr.ty, and `out_sinfo=` -> `out_ty=` (call_tir / call_dps_packed;
  `R.call_dps_packed(name, args, out_ty)` -- pass the out type positionally or as out_ty).
* tvm.nd is gone: use tvm.runtime.tensor(np_array) (-> tvm.runtime.Tensor, has .numpy() and
  __dlpack__, so torch.from_dlpack works on it).   tvm.tir -> tvm.tirx.
  tvm.dlight -> tvm.s_tir.dlight; tvm.meta_schedule -> tvm.s_tir.meta_schedule.
  tvm.register_func -> tvm.register_global_func (== tvm_ffi.register_global_func).
* Import: tvm.relax.frontend.torch.from_exported_program(ep, keep_params_as_input=True) puts the
  weights into func attr "params"; tvm.relax.frontend.detach_params(mod) strips them and returns
  {"main": [Tensor, ...]} in the order of main's trailing parameters.  main has attr
  num_input = number of user inputs; params follow the user inputs.  Registered *buffers* are NOT
  parameters: they are baked in as constants.  The result is always a Tuple, even for a single
  output, unless unwrap_unit_return_tuple=True.
  nn.Linear imports as  permute_dims(W, [1, 0]) -> matmul(x, W^T) -> add(bias, y)
  (note: bias is the FIRST operand of add).
* tvm.compile(mod, target) with the default relax pipeline does LegalizeOps but NO fusion on CPU
  (relax.vm_build only picks the target-specific pipeline for GPU). Run
  relax.get_pipeline("zero") (LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR)
  under the target yourself first.
* Target: {"kind": "llvm", "mcpu": "native"} is accepted by Target() but LLVM 22 rejects it at
  codegen ("-mcpu=native is not valid ... using default -mcpu=generic") -> you silently get
  generic x86-64 code.  Resolve the host CPU with the global func
  "tvm.codegen.llvm.GetHostCPUName" (this is what tvm.target.Target.from_device(tvm.cpu()) does).
* The wheel has NO cblas/mkl/dnnl contrib (only contrib.random/sort), so relax BYOC
  partition_for_dnnl / "tvm.contrib.cblas.matmul" are unavailable -> we ship our own BLAS kernel.
* relax.Var.name_hint is gone -> Var.name.  VirtualMachine(..., profile=True) is gone -> use
  vm.set_instrument(fn(func, sym, before_run, ret, *args)) for per-op timing.
* tvm.s_tir.dlight.cpu.Reduction() is harmful on 0.27 (softmax 1x32000 0.2 ms -> 8 s); do not
  apply the stock DLight CPU rules.
* export_library(..., options=[...]) puts options BEFORE the objects on the gcc line, so "-lfoo"
  there is dropped by --as-needed; pass the library file itself in addons=[...] instead.
* CUDA targets (verified on an H100): a target without "arch" is silently sm_50 when no GPU is visible.
  tvm.compile keeps the CUDA *source* in the library; NVRTC (cuda-bindings; or nvcc with
  TVM_CUDA_COMPILE_MODE=nvcc) compiles it when the library is loaded, so building needs no GPU and
  loading needs the CUDA toolkit.  Kernels are built with --use_fast_math: powf(x, 2) is NaN for x < 0.
  The VM's Device has dlpack_device_type(), not device_type.
* Per-call costs (2-core box): VM call ~4 us; tvm.runtime.tensor(np) ~60 us and Tensor.numpy()
  ~23 us (copies) vs tvm_ffi.from_dlpack / np.from_dlpack ~1 us; indexing a returned tuple
  (tvm_ffi Array) ~3 us per element.
* VM extern-function lookup order: the executable's imported library modules first (a DSO module
  resolves name "foo" to the exported C symbol "__tvm_ffi_foo"), then the global registry.
  Lookup happens when the VirtualMachine is constructed, so Python-registered functions must
  exist before that.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.ir import Op
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch import from_exported_program

__all__ = [
    "BuildResult", "DispatchMatmulToBLAS", "compile_module", "export_module", "host_target", "import_exported",
    "optimize", "save_library", "save_params", "target_device",
]


# --------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------
def host_target(target: str | dict | tvm.target.Target = "llvm") -> tvm.target.Target:
    """Make a Target; "native"/missing mcpu on an llvm target is resolved to the host CPU."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target.strip() not in ("llvm", "cuda"):
            return tvm.target.Target(target)
        target = {"kind": target.strip()}
    target = dict(target)
    if target.get("kind") == "cuda":
        return _cuda_target(target)
    if target.get("kind") == "llvm" and target.get("mcpu", "native") == "native":
        target["mcpu"] = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
        target.setdefault("mtriple", tvm.get_global_func("tvm.codegen.llvm.GetDefaultTargetTriple")())
    if target.get("kind") == "llvm":
        # Reassociation lets LLVM vectorize float reductions (softmax, RMSNorm); no finite-math assumptions, since
        # masks carry very large negative values.
        for flag in ("fast-math-reassoc", "fast-math-contract", "fast-math-nsz", "fast-math-arcp"):
            target.setdefault(flag, True)
    return tvm.target.Target(target)


def _cuda_target(target: dict) -> tvm.target.Target:
    """A CUDA target with an explicit arch and this machine's CPU as host.

    Without an arch TVM silently picks sm_50 when it sees no GPU; take the visible GPU's, else ask for one.
    """
    target = dict(target)
    if "arch" not in target:
        if not tvm.cuda(0).exist:
            raise ValueError("a CUDA target needs an arch when no GPU is visible, e.g. "
                             '{"kind": "cuda", "arch": "sm_90"}')
        target["arch"] = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    target.setdefault("max_shared_memory_per_block", 49152)  # dlight's tile sizes; 48 KiB needs no opt-in anywhere
    host = target.pop("host", "llvm")
    return tvm.target.Target(target, host_target(host))


def target_device(target) -> str:
    """Where a target's kernels run: "cuda" or "cpu" (recorded in artifacts, checked when they are loaded)."""
    return "cuda" if host_target(target).kind.name == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------
# BLAS dispatch (Relax pass + kernels)
# --------------------------------------------------------------------------------------------
# Extern names used in R.call_dps_packed; signature (a, b, out), float32, contiguous.
#   vlmc_matmul_nn: out = a @ b        vlmc_matmul_nt: out = a @ b^T (b stored [.., N, K])
# b 2-D: leading dims of a are flattened into M; b n-D: batch dims must equal a's (no broadcast).
_NN, _NT = "vlmc_matmul_nn", "vlmc_matmul_nt"


def _static_shape(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape]  # raises on symbolic dims
    except TypeError:
        return None


@relax.expr_functor.mutator
class _MatmulRewriter(relax.PyExprMutator):
    """matmul(a, b) / matmul(a, permute_dims(w)) on static float32 -> call_dps_packed(BLAS)."""

    _matmul = Op.get("relax.matmul")
    _permute = Op.get("relax.permute_dims")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != self._matmul:
            return call
        a, b = call.args
        sa, sb, so = _static_shape(a.ty), _static_shape(b.ty), _static_shape(call.ty)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            return call
        if not (a.ty.dtype == b.ty.dtype == call.ty.dtype == "float32"):
            return call
        if len(sb) > 2 and (len(sa) != len(sb) or sa[:-2] != sb[:-2]):
            return call  # batch broadcasting: leave it to TVM
        name = _NN
        # Fold a transpose of b's last two axes into the BLAS call (nn.Linear: W^T) so the
        # permute_dims becomes dead and is removed (no per-call transpose of the weights).
        if isinstance(b, relax.Var):
            bound = self.lookup_binding(b)
            if isinstance(bound, relax.Call) and bound.op == self._permute:
                nd = len(sb)
                axes = bound.attrs.axes
                axes = list(range(nd))[::-1] if axes is None else [int(x) for x in axes]
                if axes == list(range(nd - 2)) + [nd - 1, nd - 2]:
                    b, name = bound.args[0], _NT
        return relax.call_dps_packed(name, [a, b], out_ty=call.ty)


@tvm.transform.module_pass(opt_level=0, name="DispatchMatmulToBLAS")
class DispatchMatmulToBLAS:
    """Rewrite R.matmul (incl. the permute_dims+matmul of nn.Linear) into BLAS extern calls.

    Bias add is intentionally NOT fused: it stays a Relax op, so FuseOps fuses it with the
    following elementwise ops (bias+gelu etc.), which costs the same memory pass as a beta=1 GEMM.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rw = _MatmulRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        mod = rw.builder_.finalize()
        return relax.transform.DeadCodeElimination()(mod)  # drop now-unused permute_dims


# --- (b) native kernels: compile/kernels/kernels.c (BLAS matmuls, segment attention) ---------------------------
KERNELS_C = Path(__file__).parent / "kernels" / "kernels.c"


def _blas_link_info(blas: str) -> tuple[str, Path]:
    """(-D define, BLAS shared library) for the chosen BLAS."""
    if blas == "openblas":  # numpy's wheel always bundles scipy-openblas (ILP64)
        libs = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas64_*.so"))
        if not libs:
            raise RuntimeError("numpy has no bundled scipy-openblas")
        return "VLMC_BLAS_OPENBLAS64", libs[0]
    if blas == "mkl":  # torch CPU (x86) wheels statically contain MKL and export sgemm_/sgemv_
        return "VLMC_BLAS_FORTRAN", _torch_cpu_library()
    raise ValueError(f"unknown blas {blas!r}")


def _torch_cpu_library() -> Path:
    return Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


def _compile_kernel(blas: str, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """Compile the C kernel to a cached PIC object.

    Returns (addons, link options) for export_library.  The BLAS .so goes into *addons* (i.e.
    after the objects on the link line): tvm.support.cc puts `options` BEFORE the objects, so
    a `-lfoo` there is dropped by Debian gcc's default --as-needed -> "undefined symbol" at load.
    The rpath makes model.so find the BLAS at load time (ties it to this venv's location).
    """
    define, blas_lib = _blas_link_info(blas)
    inc = Path(tvm_ffi.__file__).parent / "include"
    source = KERNELS_C.read_text()
    # Native code for this host (the artifact is built where it runs); fast-math minus finite-math, because the
    # attention kernel relies on -inf.
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast", "-fPIC", f"-D{define}", f"-I{inc}",
             f'-DVLMC_MKL_LIB="{_torch_cpu_library()}"']  # MKL's bf16 GEMM, opened on first use (kernels.c)
    key = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("VLMC_CACHE", Path(tempfile.gettempdir()) / "vlmc_kernels"))
    cache.mkdir(parents=True, exist_ok=True)
    obj = cache / f"vlmc_blas_{blas}_{key}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        cc = os.environ.get("CC", "gcc")
        subprocess.run([cc, *flags, "-c", str(KERNELS_C), "-o", str(tmp)], check=True)
        os.replace(tmp, obj)  # atomic w.r.t. concurrent builds
    return [str(obj), str(blas_lib)], ["-fopenmp", f"-Wl,-rpath,{blas_lib.parent}"]


# --------------------------------------------------------------------------------------------
# Build result
# --------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    """What build() returns: the VM executable plus what export_library must link in."""

    executable: relax.VMExecutable
    target: tvm.target.Target
    blas: str | None
    addons: list[str] = field(default_factory=list)  # extra object files (BLAS kernel)
    link_options: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Compile stages (used by compile/visual.py and compile/llm.py) and the runtime side
# --------------------------------------------------------------------------------------------
def export_module(module: torch.nn.Module, example_args: tuple[torch.Tensor, ...]):
    """torch.export with static shapes (no dynamic_shapes): every graph is compiled for one shape."""
    with torch.no_grad():
        return torch.export.export(module.eval(), tuple(example_args))


def import_exported(exported, custom_convert_map: dict | None = None, with_params: bool = True):
    """ExportedProgram -> (IRModule with weights as trailing params, param arrays, param names). Several graphs of one
    module share their parameters: `with_params=False` skips copying them out again (empty list)."""
    mod = from_exported_program(exported, keep_params_as_input=True, custom_convert_map=custom_convert_map)
    mod, params = detach_params(mod)
    func = mod["main"]
    names = [p.name for p in func.params[int(func.attrs["num_input"]):]]
    return mod, [p.numpy() for p in params.get("main", [])] if with_params else [], names


def _fast_math_pass():
    """relax FastMathTransform (exp, erf, tanh, softmax -> TVM's polynomial versions) extended to sigmoid and GELU.

    LLVM cannot vectorize calls to libm's expf, so every SiLU/GELU/softmax element costs a scalar call; the
    polynomial forms are plain arithmetic that vectorizes (relative error ~1e-7, within every parity threshold).
    """
    from tvm import topi
    from tvm.relax.transform.fast_math import FastMathCodeGenerator

    @relax.expr_functor.mutator
    class _FastMath(FastMathCodeGenerator._cls):
        def visit_call_(self, call):
            name = getattr(call.op, "name", "")
            if name == "relax.sigmoid":
                return self.builder_.call_te(lambda x: 1.0 / (1.0 + topi.fast_exp(topi.negative(x))), call.args[0])
            if name == "relax.nn.softmax":  # topi's fast_softmax does not schedule on CPU: max, fast exp, sum, divide
                def softmax(x, axis=int(call.attrs.axis)):
                    e = topi.fast_exp(x - topi.max(x, axis=axis, keepdims=True))
                    return e / topi.sum(e, axis=axis, keepdims=True)

                return self.builder_.call_te(softmax, call.args[0])
            if name == "relax.nn.gelu":
                return self.builder_.call_te(
                    lambda x: x * (0.5 + 0.5 * topi.fast_erf(x * 0.7071067811865476)), call.args[0])
            return super().visit_call_(call)

    @tvm.transform.module_pass(opt_level=0, name="VlmcFastMath")
    def fast_math(mod, _ctx):
        mutator = _FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return fast_math


@relax.expr_functor.mutator
class _SquareRewriter(relax.PyExprMutator):
    """power(x, 2) -> x * x."""

    _power = Op.get("relax.power")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == self._power and isinstance(call.args[1], tvm.ir.expr.Constant):
            value = call.args[1].value
            exponent = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            if exponent.size == 1 and float(exponent.reshape(())) == 2.0:
                return relax.op.multiply(call.args[0], call.args[0])
        return call


@tvm.transform.module_pass(opt_level=0, name="SquareToMultiply")
class SquareToMultiply:
    """Rewrite power(x, 2) (RMSNorm's x.pow(2)) into x * x.

    TVM builds CUDA kernels with --use_fast_math, where powf(x, 2) becomes exp2(2 * log2(x)): NaN for every
    negative x, so every RMSNorm turned the whole graph into NaN.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rw = _SquareRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return rw.builder_.finalize()


class ParallelCPUSchedule:
    """dlight-style rule for CPU targets: inline elementwise producers, then run each remaining block's spatial loops
    on the thread pool and leave the innermost contiguous loop to LLVM's vectorizer. TVM's default lowering runs
    every fused kernel on one core; dlight's stock CPU rules are slower still on 0.27 (see above).

    Kernels with less than `min_work` iterations stay serial: a thread-pool launch costs more than they do.
    """

    def __init__(self, min_work: int = 16384):
        self.min_work = min_work

    def apply(self, func, target, tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not isinstance(func, tvm.tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            try:
                extents = [int(sch.get(loop).extent) for loop in loops]
            except TypeError:  # symbolic extent
                continue
            if not loops or int(np.prod(extents)) < self.min_work:
                continue
            kinds = info.dom_kind()
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            other = [loop for loop, kind in zip(loops, kinds) if kind != "S"]
            if not spatial:
                continue
            sch.reorder(*spatial, *other)
            if not other and len(spatial) > 1:
                spatial = spatial[:-1]  # keep the innermost axis whole for vectorization
            outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            sch.parallel(outer)
        return sch


def optimize(mod: tvm.IRModule, target, blas: bool = True) -> tvm.IRModule:
    """BLAS dispatch of matmuls (CPU), op decomposition, legalization, fusion and default CPU schedules."""
    target = host_target(target)
    passes = []
    if blas and target.kind.name == "llvm":
        passes.append(DispatchMatmulToBLAS())  # before LegalizeOps, which would lower matmul to TIR
    # x * x instead of power(x, 2): exact on every target, fuses on CPU, and avoids CUDA fast-math's NaN powf.
    passes += [SquareToMultiply(), relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if target.kind.name == "llvm":
        passes.append(_fast_math_pass())
    passes.append(relax.get_pipeline("zero"))
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
        from tvm.s_tir import dlight as dl

        if target.kind.name == "llvm":
            mod = dl.ApplyDefaultSchedule(ParallelCPUSchedule())(mod)
        else:  # GPU kernels need thread bindings
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return mod


def compile_module(mod: tvm.IRModule, target) -> BuildResult:
    """Lower an optimized module to a VM executable (memory planning, codegen)."""
    target = host_target(target)
    if target.kind.name == "llvm":
        ex = tvm.compile(mod, target)
    else:
        # optimize() already fused and scheduled the kernels (dlight); the GPU default pipeline would run
        # FuseOps/FuseTIR over scheduled kernels again, so only lower and finalize here.
        # TVM 0.27 stores the CUDA source in the library; NVRTC (or nvcc) compiles it when the library is loaded.
        from tvm.relax.backend.cuda import pipeline as gpu

        lower = tvm.transform.Sequential(gpu.dataflow_lower_passes(target) + gpu.finalize_passes(target))
        with target:
            ex = tvm.compile(mod, target, relax_pipeline=lower)
    # The kernels library is linked into every CPU graph: attention needs it even without BLAS dispatch. OpenBLAS
    # (numpy's) by default: measured here, MKL's OpenMP GEMV/small GEMMs made decode steps 10x slower; VLMC_BLAS=mkl
    # (torch's, where its CPU wheel has it) is there to compare on other hosts.
    kind = os.environ.get("VLMC_BLAS", "openblas") if target.kind.name == "llvm" else None
    addons, link = _compile_kernel(kind) if kind else ([], [])
    return BuildResult(ex, target, kind, addons, link)


def save_library(result: BuildResult, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    result.executable.export_library(str(path), addons=result.addons or None, options=result.link_options or None)


def save_params(params: Sequence, names: Sequence[str], path: str | os.PathLike) -> None:
    """Write parameters (numpy arrays or torch tensors of any dtype, bf16 included) to a safetensors file."""
    from ..runtime.safetensors_io import write

    write(path, dict(zip(names, params)))
