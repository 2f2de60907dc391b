"""Compile a checkpoint's vision tower into a fixed-shape graph: YAML -> deploy module -> torch.export -> TVM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..build_in.source_code import detect_architecture, get_architecture
from ..errors import VlmcError
from ..runtime.artifact import visual_graph_file
from .artifact import (Stages, library_versions, staging_folder, weights_fingerprint,
                       write_manifest)
from .config import VisualConfig, config_hash, resolve_checkpoint, resolve_chunks


def graph_signature(inputs: dict[str, torch.Tensor]) -> list[list]:
    """The manifest's description of a visual graph's inputs, in call order: [name, shape, dtype]."""
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in inputs.items()]


def compile_visual(cfg: VisualConfig, config_path: Path) -> Path:
    """Build the visual artifact; returns its folder."""
    from . import ops, tvm_backend

    checkpoint = resolve_checkpoint(cfg.frontend.checkpoint, config_path)
    out = Path(cfg.workspace.path) / cfg.name
    digest, weights = config_hash(cfg), weights_fingerprint(checkpoint)

    from .quantize import GRAPH_COMPUTE, QuantizationError, check_target, set_compute, weight_layout

    scheme = cfg.quantize.scheme()
    check_target(scheme, tvm_backend.host_target(cfg.backend.target).kind.name, cfg.backend.compute)  # fails now
    if cfg.frontend.onnx and (scheme.quantizes_weights or cfg.backend.compute != "fp32"):
        raise VlmcError(f"{config_path}: frontend.onnx exports fp32 graphs only; drop it or use quantize.weights: fp32 "
                        f"and backend.compute: fp32")
    stages = Stages(["load", "export", "import into TVM", "optimize", "build", "save"])
    buckets = cfg.frontend.buckets()
    budget = buckets[-1]  # patches, or tiles per call
    with stages.stage("load", f"{checkpoint}, weights {scheme.weights}"
                      + (f", {cfg.backend.compute} GEMMs" if cfg.backend.compute != "fp32" else "")):
        arch_name = detect_architecture(checkpoint)
        arch = get_architecture(arch_name)
        model_config = arch.load_config(checkpoint)
        spec = arch.host_spec(checkpoint, model_config)
        if spec.tiled != cfg.frontend.tiled:
            raise VlmcError(f"{config_path}: {checkpoint} is a {arch_name} checkpoint, whose budget is "
                            + ("frontend.max_tiles (--max-tiles), not a patch budget" if spec.tiled else
                               "frontend.max_patches (--max-patches), not tiles"))
        out_hidden = model_config.text_config.hidden_size  # image embeddings take the place of token embeddings
        chunks = resolve_chunks(cfg.backend, out_hidden)
        try:
            module = arch.load_vision(checkpoint, model_config, chunks, scheme)
        except QuantizationError as exc:
            raise VlmcError(f"cannot store the vision tower of {checkpoint} as {scheme.weights}: {exc}") from None
        if cfg.frontend.shape is not None:
            _check_shape(cfg, module.patch_dim, spec.vision.head_dim, config_path)
        if not spec.tiled and any(b % spec.vision.merge_unit for b in buckets):
            raise VlmcError(f"patch budgets {buckets} must be multiples of {spec.vision.merge_unit}")
    # The architecture declares its graph's inputs (names, shapes, dtypes) and output groups; the host computes
    # the inputs by name (runtime/cpu_ops/vision.py) and the runtime splits the outputs by the groups.
    inputs = {b: module.example_inputs(b) for b in buckets}
    target = tvm_backend.host_target(cfg.backend.target)
    unit = "tiles" if cfg.frontend.tiled else "patches"
    with stages.stage("export", f"torch.export, {len(buckets)} graphs: " + ", ".join(f"{b} {unit}" for b in buckets)):
        if cfg.frontend.onnx:
            ops.use_host_kernels(module, False)  # ONNX has no vlmc kernel: standard ops
            onnx_bytes, onnx_diff = _export_onnx(module, inputs[budget])
        ops.use_host_kernels(module, ops.uses_attention_kernel(target))
        set_compute(module, GRAPH_COMPUTE[cfg.backend.compute])
        exported = {b: tvm_backend.export_module(module, tuple(inputs[b].values())) for b in buckets}
        names = list(exported[budget].graph_signature.parameters)
    with stages.stage("import into TVM"):
        # One parameter set serves every budget (same module, same order), saved from the module itself.
        mods = {b: tvm_backend.import_exported(ep, ops.CUSTOM_CONVERTERS, with_params=False)[0]
                for b, ep in exported.items()}
    with stages.stage("optimize", "BLAS dispatch, fusion" if cfg.backend.blas else "fusion"):
        mods = {b: tvm_backend.optimize(m, target, blas=cfg.backend.blas) for b, m in mods.items()}
    with stages.stage("build", str(target.kind.name)):
        results = {b: tvm_backend.compile_module(m, target) for b, m in mods.items()}
    with stages.stage("save", str(out)), staging_folder(out) as tmp:
        for b, result in results.items():
            tvm_backend.save_library(result, tmp / visual_graph_file(b, budget))
        state = module.state_dict()
        tvm_backend.save_params([state[n] for n in names], names, tmp / "params.safetensors")
        if cfg.frontend.onnx:
            (tmp / "model.onnx").write_bytes(onnx_bytes)
        # Native grids: a patch budget and the per-budget graphs; tiles: the cap on an image's grid tiles and the
        # tile counts of the graphs (the largest is one call's)
        layout = ({"max_tiles": cfg.frontend.max_tiles, "tiles_per_call": budget, "tile_buckets": buckets,
                   "tokens_per_tile": spec.image.tokens_per_tile} if spec.tiled else
                  {"patch_budget": budget, "patch_buckets": buckets, "merge_unit": spec.vision.merge_unit})
        manifest = {
            "kind": "visual", "name": cfg.name, "arch": arch_name, "checkpoint": str(checkpoint), **layout,
            "patch_dim": module.patch_dim,
            "hidden_size": out_hidden, "output_chunks": chunks, "output_groups": module.output_groups,
            "dtype": cfg.backend.dtype, "compute": cfg.backend.compute,
            "quantize": scheme.to_dict(kv_cache=False), "quantized_layers": weight_layout(module),
            "weight_bytes": sum(t.numel() * t.element_size() for t in module.state_dict().values()),
            "target": str(target), "device": tvm_backend.target_device(target), "param_names": names,
            "graph_inputs": graph_signature(inputs[budget]),
            "versions": library_versions(), "config_hash": digest, "weights_fingerprint": weights,
            "host": spec.to_dict(), "compile_seconds": stages.times,
        }
        if cfg.frontend.onnx:
            manifest["onnx_max_abs_diff"] = onnx_diff
        write_manifest(tmp, manifest)
    return out


def _check_shape(cfg: VisualConfig, patch_dim: int, head_dim: int, config_path: Path) -> None:
    shape = cfg.frontend.shape
    if shape.pixel_values[1] != patch_dim:
        raise VlmcError(f"{config_path}: frontend.shape.pixel_values[1] is {shape.pixel_values[1]} but the "
                        f"checkpoint's patches have {patch_dim} values")
    for name in ("cos", "sin"):
        value = getattr(shape, name)
        if value is not None and value[1] != head_dim:
            raise VlmcError(f"{config_path}: frontend.shape.{name}[1] is {value[1]} but the checkpoint's vision "
                            f"head_dim is {head_dim}")


def _export_onnx(module, inputs: dict[str, torch.Tensor]) -> tuple[bytes, float]:
    """Export ONNX and check it with onnxruntime on random inputs; returns (bytes, max abs diff)."""
    import io
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    args = tuple(inputs.values())
    with warnings.catch_warnings():
        # the TorchScript exporter (what fixed-shape graphs need) warns that it is legacy and that shape checks are
        # traced as constants, which is what a fixed-shape graph means: not actionable
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, buf, input_names=list(inputs), dynamo=False)
    rng = np.random.default_rng(0)
    # random floats; integer inputs (key ranges: every patch attends to all) as the examples are
    feeds = [rng.standard_normal(a.shape).astype(np.float32) if a.is_floating_point() else a.numpy() for a in args]
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs the graph does not use
    got = session.run(None, {n: f for n, f in zip(inputs, feeds) if n in wanted})
    with torch.no_grad():
        ref = module(*(torch.from_numpy(f) for f in feeds))
    diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
    return buf.getvalue(), diff
